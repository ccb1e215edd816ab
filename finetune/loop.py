"""The training loop of `ferry finetune`: :func:`fit`, one loop to step through.

Everything an interrupted run needs in order to continue lives in one ``state`` dict, made by
:func:`initial_state`: the model, the optimizer, the schedule, the fp16 gradient scaler, the best
weights so far, and the counters of :data:`finetune.state.COUNTERS` (the last finished epoch, the
best metric and its epoch, the early-stopping counters, the history and the time spent). After
every epoch but the last, :func:`fit` saves it with :func:`finetune.state.save`, together with
every rank's RNG states; ``--resume`` puts it back with :func:`finetune.state.restore`, and the
resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from finetune import batching, distributed
from finetune import state as resume_state
from finetune.args import FinetuneArgs
from finetune.distributed import Dist
from finetune.recipe import Setup, printer

LOG_EVERY = 10  # micro-steps between progress-bar loss updates (each one syncs with the device)


def initial_state(run: Setup, args: FinetuneArgs, dist: Dist) -> dict[str, Any]:
    """The state before the first epoch: AdamW and its schedule over every optimizer step of the run."""
    import torch

    from finetune.modeling import param_groups

    batches_per_epoch = math.ceil(len(batching.shard(range(len(run.train_labels)), dist.rank, dist.world_size, pad=True)) / args.batch_size)
    total_steps = math.ceil(batches_per_epoch / args.grad_accum_steps) * args.epochs
    # Fused AdamW (one kernel over all parameters) where PyTorch has it: CPU and CUDA.
    optimizer = torch.optim.AdamW(
        param_groups(run.net, args.weight_decay), lr=args.learning_rate, fused=dist.device.type in ("cpu", "cuda")
    )
    # The parameters that thaw later are in the optimizer from the start (AdamW skips parameters
    # without a gradient), so the schedule covers them; they train from epoch --unfreeze-after + 1.
    for p in run.unfreeze:
        p.requires_grad_(False)
    return {
        "model": run.net,
        "optimizer": optimizer,
        "scheduler": _schedule(optimizer, args.scheduler, round(args.warmup_ratio * total_steps), total_steps),
        "scaler": torch.amp.GradScaler("cuda") if args.precision == "fp16" else None,
        "best": None,  # the best epoch's weights (on the CPU)
        "epoch": 0,  # the last finished epoch
        "best_metric": -1.0,
        "best_epoch": 0,
        "bad_epochs": 0,  # epochs since the metric last improved within the phase
        "phase_best": -1.0,  # the best metric of the current phase (frozen, then unfrozen)
        "history": [],  # one row per epoch: train loss, learning rate, speed, validation metrics
        "loss_log": [],  # [fractional epoch, batch loss], every LOG_EVERY batches
        "train_seconds": 0.0,
        "train_cpu_seconds": 0.0,
        "trained_samples": 0,
    }


def _schedule(optimizer: Any, kind: str, warmup: int, total: int) -> Any:
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1))


def _no_hook(epoch: int) -> None:
    """The default ``after_epoch`` of :func:`fit`: nothing."""


def fit(
    run: Setup, state: dict[str, Any], args: FinetuneArgs, dist: Dist, staging: Path,
    after_epoch: Callable[[int], None] = _no_hook,
) -> dict[str, Any]:
    """Train the epochs after ``state["epoch"]``: validate each, keep the best weights, stop early.

    After every epoch but the last, the state is saved in ``staging`` and ``after_epoch(epoch)`` is
    called. Returns ``state``; its ``epoch`` is the last one run (below ``args.epochs`` when the
    run stopped early).
    """
    say = printer(args.quiet or not dist.main)
    ident = resume_state.identity(args, run.data.sources, dist.world_size)
    first = state["epoch"] + 1
    for epoch in range(first, args.epochs + 1):
        if run.unfreeze and epoch == max(args.unfreeze_after + 1, first):
            for p in run.unfreeze:
                p.requires_grad_(True)
            if epoch == args.unfreeze_after + 1:  # not on a resume inside the unfrozen phase
                state["phase_best"], state["bad_epochs"] = -1.0, 0
            say(f"epoch {epoch}: the top {args.unfreeze_top} stages are trainable from now on", file=sys.stderr)
        row = train_epoch(run, state, args, dist, epoch)
        val = run.evaluate("validation")
        done = f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f}"
        speed = f"({row['train_samples_per_second']:.1f} samples/s)"
        if val is not None:
            row.update(val)
            metric = val[args.metric]
            say(f"{done}, validation accuracy {val['accuracy']:.4f}, macro-F1 {val['macro_f1']:.4f} {speed}")
        else:
            metric = float(epoch)  # no validation data: the last epoch is the best
            say(f"{done} {speed}")
        state["history"].append(row)
        state["epoch"] = epoch
        if metric > state["best_metric"]:
            state["best_metric"], state["best_epoch"] = metric, epoch
            state["best"] = resume_state.cpu_copy(run.net.state_dict())
        # Patience counts within a phase: unfreezing starts a new one (its first epochs may dip).
        if metric > state["phase_best"]:
            state["phase_best"], state["bad_epochs"] = metric, 0
        else:
            state["bad_epochs"] += 1
        if args.patience and state["bad_epochs"] >= args.patience and epoch < args.epochs:
            say(f"stopping early: no {args.metric} improvement for {state['bad_epochs']} epochs; best epoch {state['best_epoch']}")
            break
        if epoch < args.epochs:
            rng = distributed.rng_states(dist, run.task.generators)  # every rank takes part
            if dist.main:
                resume_state.save(staging, state, rng, ident)
            distributed.barrier(dist)
            after_epoch(epoch)
    return state


def train_epoch(run: Setup, state: dict[str, Any], args: FinetuneArgs, dist: Dist, epoch: int) -> dict[str, Any]:
    """One pass over this rank's training batches, in an order that depends only on (seed, epoch).
    Returns the epoch's row of the history: mean loss over all ranks, learning rate, speed."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    model, task, scaler = run.model, run.task, state["scaler"]
    task.train_mode(model)
    order = batching.shard(batching.epoch_order(len(run.train_labels), args.seed, epoch), dist.rank, dist.world_size, pad=True)
    batches = batching.batch_indices(order, args.batch_size, task.lengths, args.seed, epoch)
    bar = tqdm(
        total=len(batches), desc=f"epoch {epoch}/{args.epochs}", unit="batch", file=sys.stderr,
        disable=args.quiet or not dist.main, dynamic_ncols=True, mininterval=1.0,
    )
    loss_sum = torch.zeros((), device=dist.device)
    started, cpu_started, seen = time.perf_counter(), time.process_time(), 0
    for i, index in enumerate(batches):
        group_start = i - i % args.grad_accum_steps
        group_size = min(args.grad_accum_steps, len(batches) - group_start)
        last_of_group = i == group_start + group_size - 1
        y = run.train_labels[index].to(dist.device, non_blocking=True)
        sync = model.no_sync() if dist.active and not last_of_group else contextlib.nullcontext()
        with sync:
            loss = F.cross_entropy(task.forward(model, index).float(), y)
            (scaler.scale(loss / group_size) if scaler else loss / group_size).backward()
        if last_of_group:
            _optimizer_step(run.net, state, args.max_grad_norm)
        loss_sum += loss.detach()
        seen += len(index)
        if (i + 1) % LOG_EVERY == 0 or i + 1 == len(batches):
            current = loss.item()  # the only host sync in the loop, every LOG_EVERY batches
            state["loss_log"].append([epoch - 1 + (i + 1) / len(batches), current])
            rate = seen * dist.world_size / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{current:.4f}", samples_s=f"{rate:.1f}", refresh=False)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    state["train_seconds"] += seconds
    state["train_cpu_seconds"] += time.process_time() - cpu_started
    state["trained_samples"] += seen * dist.world_size
    loss_total, loss_count = distributed.reduce_sum(dist, [float(loss_sum), float(len(batches))])
    return {
        "epoch": epoch, "split": "validation", "train_loss": loss_total / max(loss_count, 1),
        "lr": state["scheduler"].get_last_lr()[0], "seconds": round(seconds, 3),
        "train_samples_per_second": round(seen * dist.world_size / max(seconds, 1e-9), 2),
    }


def _optimizer_step(net: Any, state: dict[str, Any], max_grad_norm: float) -> None:
    """Unscale (fp16), clip, step the optimizer and the schedule, clear the gradients."""
    import torch

    optimizer, scaler = state["optimizer"], state["scaler"]
    if scaler:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    state["scheduler"].step()
    optimizer.zero_grad(set_to_none=True)

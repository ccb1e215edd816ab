"""`ferry finetune`: fine-tune a pretrained encoder for sequence or image classification.

:func:`finetune` is the recipe in order: check the input, read and split the data
(:func:`finetune.recipe.load_data`), build the model, its training inputs and ``evaluate``
(:func:`finetune.recipe.setup`), train (:func:`finetune.loop.fit`), test the best epoch's weights
and write the checkpoint. What differs between ``--task`` values lives in the task's object in
:mod:`finetune.recipe`; the options are grouped in :mod:`finetune.args`.
The run keeps its per-epoch resume state in ``.<output>.incomplete``, writes the checkpoint in a
staging directory renamed to ``<output>`` only when complete (so an interrupted run never leaves a
directory that looks done), and deletes the resume state only after that. The run holds a lock
on ``<output>``, so a second run on it fails at once.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path
from typing import Any

from ferry.config import to_dict
from ferry.errors import ConfigError
from ferry.files import atomic_dir, check_output_dir, clean_stale, discard, library_versions, now_iso, output_lock, resolve, staging_dir
from finetune import checkpoint as ckpt
from finetune import distributed, loop, modeling, recipe
from finetune import state as resume_state
from finetune.args import FinetuneArgs


def after_epoch(epoch: int) -> None:
    """Called once an epoch's resume state is saved. Tests replace it to simulate an interrupt."""


def finetune(args: FinetuneArgs) -> int:
    """Fine-tune ``args.model`` on ``args.train`` and write a checkpoint to ``args.output``."""
    import torch

    from finetune.metrics import format_report

    started = time.perf_counter()
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    dist = distributed.setup()
    held = contextlib.ExitStack()
    try:
        say = recipe.printer(args.quiet or not dist.main)
        output = Path(args.output)
        staging = staging_dir(output, "incomplete")  # the resume state
        inputs = [p for p in (modeling.local_path(args.model), *(_local(x) for x in (args.train, args.validation, args.test))) if p]
        check_output_dir(output, args.overwrite, inputs)
        if dist.main:
            held.enter_context(output_lock(output))
            clean_stale(output)

        task = recipe.task_recipe(args, dist)
        data = recipe.load_data(args, task, quiet=args.quiet or not dist.main)
        # --resume: the settings and data must be those of the interrupted run (checked before any heavy work).
        info = None
        if args.resume:
            info = resume_state.check(staging, output, resume_state.identity(args, data.sources, dist.world_size))
        run = recipe.setup(args, dist, task, data)
        state = loop.initial_state(run, args, dist)
        if info is not None:
            resume_state.restore(state, staging, info, dist, task.generators)
            say(f"resuming {output} after epoch {info['epoch']} of {args.epochs}", file=sys.stderr)
        elif dist.main:
            if staging.exists():
                say(f"note: discarding the interrupted run in {staging} (pass --resume to continue it)", file=sys.stderr)
                discard(staging, output)
            staging.mkdir(parents=True)
        distributed.barrier(dist)

        state = loop.fit(run, state, args, dist, staging, after_epoch=after_epoch)

        # The best epoch's weights are the checkpoint; test them.
        if state["best"] is not None and state["best_epoch"] != state["epoch"]:
            run.net.load_state_dict(state["best"])
        test = run.evaluate("test")
        wall = time.perf_counter() - started
        timing = _timing(state, run.feature_seconds, wall)
        if dist.main:
            _write(output, inputs, args, run, state, test, timing, dist.world_size)
            discard(staging, output)  # the resume state, only once the checkpoint is published
        distributed.barrier(dist)

        if test is not None:
            say(format_report(test, f"test set ({test['examples']} examples, best epoch {state['best_epoch']}):"))
            if dist.main:
                print(f"test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} on {test['examples']} examples")
        if dist.main:
            print(f"checkpoint: {output} (wall {wall:.1f} s, training {timing['train_samples_per_second']:.1f} samples/s)")
        return 0
    finally:
        held.close()
        distributed.teardown(dist)


def _timing(state: dict[str, Any], feature_seconds: float, wall: float) -> dict[str, Any]:
    """The manifest's timing block."""
    return {
        "wall_seconds": round(wall, 2), "train_seconds": round(state["train_seconds"], 2),
        # --freeze all: the one pass of the frozen base over the training and validation texts
        "feature_seconds": round(feature_seconds, 2),
        # CPU seconds of this process (all its threads) in the training loop: less sensitive
        # than wall time to other processes sharing the machine
        "train_cpu_seconds": round(state["train_cpu_seconds"], 2),
        "train_samples": state["trained_samples"],
        # the frozen base's one pass counts as training time, so the rate compares across freeze modes
        "train_samples_per_second": round(state["trained_samples"] / max(state["train_seconds"] + feature_seconds, 1e-9), 2),
    }


def _write(output: Path, inputs: list[Path], args: FinetuneArgs, run: recipe.Setup, state: dict[str, Any], test: dict[str, Any] | None,
           timing: dict[str, Any], world_size: int) -> None:
    """Write the checkpoint (rank 0): the model, its tokenizer or processor, the data it keeps, the
    history, the training curve and the manifest."""
    history, best_epoch = state["history"], state["best_epoch"]
    best_val = next((h for h in history if h["epoch"] == best_epoch and "accuracy" in h), None)
    metrics = {
        "metric": args.metric, "best_epoch": best_epoch, "epochs_run": state["epoch"],
        "stopped_early": state["epoch"] < args.epochs,
        "validation": {k: best_val[k] for k in ("accuracy", "macro_f1", "examples", "per_class", "confusion_matrix")} if best_val else None,
        "test": test,
    }
    manifest = {
        "task": args.task,
        "base_model": {"given": args.model, "resolved": run.source},
        "data": run.data.sources,
        "split": run.data.split,
        "labels": run.data.labels,
        "settings": to_dict(args),
        "transfer": run.transfer,
        "metrics": metrics,
        "timing": timing,
        "versions": library_versions("torch", "transformers", "safetensors", "tokenizers"),
        "created": now_iso(),
        "world_size": world_size,
    }
    rows = history + ([{"epoch": best_epoch, "split": "test", **test}] if test else [])
    with atomic_dir(output, args.overwrite, inputs) as checkpoint_dir:
        _write_history(checkpoint_dir / ckpt.HISTORY, rows)
        _plot_curve(checkpoint_dir / ckpt.CURVE, state["loss_log"], history, args.metric, best_epoch)
        ckpt.write_checkpoint(checkpoint_dir, run.net, run.processor, manifest, heldout=run.data.test,
                              calibration=_calibration(run.data.train, args), validation=run.data.validation)


def _local(path: str | None) -> Path | None:
    if not path:
        return None
    p = resolve(path)
    return p if p.exists() else None


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

"""`ferry parity`: re-check an artifact's variants against the PyTorch checkpoint they came from.

The verb and the loader of an artifact's source model (a checkpoint, or an ensemble's
members); the reference inputs are the task's (:func:`text_reference`, :func:`image_reference`),
the gates and the measurements themselves export/parity.py's.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from export.image import build_image_reference, heldout_pixels, image_size
from export.parity import (
    FAIL, GateArgs, Progress, Reference, build_reference, load_labelled_data, load_source, parity_table, progress_bar,
    pytorch_accuracy, run_parity, use_threads,
)
from ferry.tasks import IMAGE, TEXT, task_named
from ferry.config import opt
from ferry.errors import CheckpointError, FerryError
from runtime.artifact import check_valid_artifact_dir


@dataclasses.dataclass
class ParityArgs(GateArgs):
    """Options of `ferry parity`."""

    artifact: str | None = opt(None, "artifact directory written by ferry export", positional=True)
    checkpoint: str | None = opt(None, "the PyTorch checkpoint to compare with (default: the artifact's source)")
    data: str | None = opt(None, "labelled data to compare on (default: the checkpoint's heldout.jsonl)")
    text_column: str = opt("text", "text column of --data")
    label_column: str = opt("label", "label column of --data")
    variants: list[str] = opt([], "variants to check (default: all in the artifact)")
    device: str = opt("auto", "where ONNX Runtime runs: fp16 needs cuda", choices=("auto", "cpu", "cuda"))
    report: str | None = opt(None, "also write the results to this JSON file")


def load_artifact_source(artifact: Any, checkpoint: str | None, hint: str = "") -> tuple[Any, Any, Any, str]:
    """(Checkpoint, PyTorch model, tokenizer or None, its name) that an artifact was exported from.

    ``checkpoint`` (the --checkpoint flag) wins; else an ensemble artifact's members
    (combined as in the graph), else the manifest's source checkpoint.

    Raises:
        CheckpointError: no source recorded, or it is gone; ``hint`` adds an alternative flag.
    """
    ensemble_spec = None if checkpoint else artifact.manifest.get("ensemble")
    if ensemble_spec:
        from export.ensemble import load_ensemble

        ckpt, model, tokenizer = load_ensemble(ensemble_spec)
        return ckpt, model, tokenizer, "ensemble of " + ", ".join(m["checkpoint"] for m in ensemble_spec["members"])
    source = checkpoint or (artifact.manifest.get("source") or {}).get("checkpoint")
    if not source or not Path(source).is_dir():
        found = f"source checkpoint {source} of {artifact.path} not found" if source else f"{artifact.path}: the manifest names no source checkpoint"
        raise CheckpointError(f"{found}; pass --checkpoint DIR{hint}")
    image = task_named(artifact.task).image
    ckpt, model, tokenizer = load_source(source, "--checkpoint" if checkpoint else "source checkpoint", tokenizer=not image)
    return ckpt, model, tokenizer, str(source)


def text_reference(args: ParityArgs, artifact: Any, ckpt: Any, model: Any, tokenizer: Any, progress: Progress | None) -> Reference:
    """PyTorch's logits on random tokens and the labelled texts (--data, else the checkpoint's held-out split)."""
    labelled = load_labelled_data(artifact.labels, ckpt.heldout, args.data, args.text_column, args.label_column, args.parity_max_examples)
    return build_reference(model, tokenizer, artifact.labels, labelled, artifact.max_length, artifact.manifest["inputs"],
                           batch_sizes=args.parity_batch_sizes, seq_lengths=args.parity_seq_lengths, seed=args.seed,
                           progress=progress)


def image_reference(args: ParityArgs, artifact: Any, ckpt: Any, model: Any, tokenizer: Any, progress: Progress | None) -> Reference:
    """PyTorch's logits on random pixels and the labelled images (--data, else the checkpoint's held-out
    split), preprocessed as the artifact's processor says (``tokenizer``: None, images have none)."""
    from runtime.pixels import load_processor

    processor = load_processor(artifact.path)
    height, width = image_size(processor)
    heldout = heldout_pixels(ckpt.heldout, artifact.labels, processor, args.data, args.parity_max_examples)
    return build_image_reference(model, artifact.labels, heldout, height, width, batch_sizes=args.parity_batch_sizes,
                                 seed=args.seed, progress=progress)


# The parity inputs of each task
REFERENCES = {TEXT: text_reference, IMAGE: image_reference}


def parity(args: ParityArgs) -> int:
    """Re-check an artifact's variants against the PyTorch checkpoint they came from."""
    from export.writer import quiet_libraries
    from ferry.files import write_json

    artifact = check_valid_artifact_dir(args.artifact)
    names = artifact.select(args.variants)
    quiet_libraries()
    ckpt, model, tokenizer, _ = load_artifact_source(artifact, args.checkpoint)
    if ckpt.labels and ckpt.labels != artifact.labels:
        raise CheckpointError(f"{ckpt.path}: labels {ckpt.labels} differ from the artifact's {artifact.labels}; pass the checkpoint it was exported from")
    progress = None if args.quiet else progress_bar
    use_threads(args.threads)
    ref = REFERENCES[task_named(artifact.task)](args, artifact, ckpt, model, tokenizer, progress)
    paths = {n: artifact.variants[n].path for n in names}
    results = run_parity(paths, ref, args.gates(), threads=args.threads, seed=args.seed, device=args.device, progress=progress)
    shown = {}
    for name, res in results.items():
        info = dict(artifact.variants[name].info)
        shown[name] = {**info, "status": res["status"], "parity": res}
    print(parity_table(shown, pytorch_accuracy(shown)))
    for name, res in results.items():
        print(f"  {name}: {res['status']} ({res.get('reason', '')})")
    if args.report:
        out = Path(args.report)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, {"artifact": str(artifact.path), "checkpoint": str(ckpt.path), "variants": results})
        except OSError as e:
            raise FerryError(f"--report {args.report}: cannot write ({e.strerror})") from None
    failed = [n for n, r in results.items() if r["status"] == FAIL]
    if failed:
        print(f"ferry parity: error: {', '.join(failed)} failed the parity gate", file=sys.stderr)
        return 1
    return 0


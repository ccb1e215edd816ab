"""`ferry evaluate CHECKPOINT --data FILE`: metrics of a checkpoint on any labelled file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ferry.config import opt, positive
from ferry.errors import DataError
from ferry.files import library_versions, now_iso, write_json


@dataclasses.dataclass
class EvaluateArgs:
    """Options of `ferry evaluate`."""

    checkpoint: str | None = opt(None, "checkpoint directory written by ferry finetune", positional=True)
    data: str | None = opt(None, "labelled data: .csv/.tsv/.jsonl/.parquet or a <label>/*.txt directory "
                           "(default: the checkpoint's held-out test split)")
    text_column: str = opt("text", "column holding the text")
    image_column: str = opt("image", "image checkpoints: column holding the image path (or give a <label>/<image> directory)")
    label_column: str = opt("label", "column holding the label")
    batch_size: int = opt(64, "examples per batch", check=positive)
    max_length: int | None = opt(None, "tokens per text (default: the checkpoint's training setting)", check=positive)
    decode_errors: str = opt("error", "non-UTF-8 bytes: refuse, or replace with U+FFFD", choices=("error", "replace"))
    empty_texts: str = opt("drop", "null or empty texts: drop with a warning, or refuse", choices=("drop", "error"))
    output: str | None = opt(None, "also write the metrics to this JSON file")
    quiet: bool = opt(False, "print only the accuracy line")


def evaluate(args: EvaluateArgs) -> int:
    """Predict every example of ``args.data`` with the checkpoint and report the metrics."""
    from finetune.batching import predict_logits
    from finetune.checkpoint import IMAGE, check_valid_checkpoint_dir, load_model, load_tokenizer
    from finetune.data import load_labelled
    from finetune.metrics import classification_report, format_report

    ckpt = check_valid_checkpoint_dir(args.checkpoint)
    image = ckpt.task == IMAGE
    data = args.data
    if data is None:
        if ckpt.heldout is None:
            where = ckpt.path / ("heldout" if image else "heldout.jsonl")
            raise DataError(f"CHECKPOINT {args.checkpoint} has no held-out split ({where}); pass --data FILE")
        data = str(ckpt.heldout)
    if image:
        from finetune.images import load_labelled_images

        examples = load_labelled_images(data, args.image_column, args.label_column, "--data")
    else:
        examples = load_labelled(
            data, args.text_column, args.label_column, args.decode_errors, args.empty_texts, "--data", args.quiet
        )
    label_id = {label: i for i, label in enumerate(ckpt.labels)}
    unknown = sorted({y for y in examples.labels if y not in label_id})
    if unknown:
        raise DataError(
            f"--data {data}: label '{unknown[0]}' is not one of the checkpoint's labels ({', '.join(ckpt.labels)})"
        )
    from finetune.distributed import set_threads

    set_threads()
    model = load_model(ckpt)
    max_length = args.max_length or ckpt.max_length
    if image:
        import torch

        from finetune.imagemodel import image_logits, pixel_tensor
        from runtime.pixels import load_processor

        pixels = pixel_tensor(examples.texts, load_processor(ckpt.path))
        logits = image_logits(model, pixels, args.batch_size, torch.device("cpu")).numpy()
        max_length = None
    else:
        logits = predict_logits(model, load_tokenizer(ckpt.path), examples.texts, args.batch_size, max_length)
    rep = classification_report([label_id[y] for y in examples.labels], logits.argmax(-1), ckpt.labels)
    if not args.quiet:
        print(format_report(rep, f"{data} ({rep['examples']} examples):"))
    print(f"accuracy {rep['accuracy']:.4f}, macro-F1 {rep['macro_f1']:.4f} on {rep['examples']} examples")
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise DataError(f"--output {out} is a directory; give a .json file path")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {
            "checkpoint": str(ckpt.path), "manifest_sha256": ckpt.manifest_sha256, "data": examples.source,
            "max_length": max_length, "metrics": rep, "versions": library_versions("torch", "transformers"),
            "created": now_iso(),
        })
    return 0

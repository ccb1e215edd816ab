"""The checkpoint format, written by `ferry finetune` and read by every later stage.

A checkpoint is a valid Hugging Face directory (``save_pretrained``, safetensors only) plus:

- ``ferry.json``: stage, base model, data files (sha256, rows), split seed, every
  hyperparameter, metrics, library versions, time; written last, so a directory without
  it is not a complete checkpoint;
- ``heldout.jsonl``: the test split (``{"text", "label"}`` per line), so export can
  measure accuracy without asking for data again; for an image checkpoint the ``heldout/``
  directory (``<label>/<file>`` copies of the test images) instead;
- ``calibration.jsonl``: a sample of the training texts, for static quantization; for an image
  checkpoint the ``calibration/`` directory of training images;
- ``validation.jsonl``: the validation split (same format as ``heldout.jsonl``), on which export
  chooses which MatMuls int8-static keeps in fp32 (never on the test split); for an image
  checkpoint the ``validation/`` directory of validation images, on which export chooses
  which convolutions int8-static keeps in fp32;
- ``metrics.jsonl`` and ``training_curve.png``: the training history.

An image checkpoint (``ferry.json`` ``task`` is ``image-classification``) holds
``preprocessor_config.json`` (ViTImageProcessor keys) instead of tokenizer files, and
``settings.image_size``.

Any Hugging Face sequence- or image-classification directory (no ``ferry.json``) is accepted too;
it then has no held-out data of its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ferry.tasks import IMAGE_TASK, TEXT_TASK
from ferry.errors import CheckpointError, FerryError, first_line
from ferry.files import MANIFEST, read_json_object, read_manifest, sha256_file, write_json

STAGE = "finetune"
TEXT = TEXT_TASK
IMAGE = IMAGE_TASK
TASKS = (TEXT, IMAGE)
HELDOUT = "heldout.jsonl"
CALIBRATION = "calibration.jsonl"
VALIDATION = "validation.jsonl"
HELDOUT_DIR = "heldout"
CALIBRATION_DIR = "calibration"
VALIDATION_DIR = "validation"
PROCESSOR_FILE = "preprocessor_config.json"
HISTORY = "metrics.jsonl"
CURVE = "training_curve.png"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spm.model", "sentencepiece.bpe.model")
MAKE_ONE = "ferry finetune --output DIR makes one"


@dataclasses.dataclass
class Checkpoint:
    """A checked checkpoint directory."""

    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any]
    labels: list[str]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    @property
    def task(self) -> str:
        """``text-classification`` or ``image-classification``: from ferry.json, else the architecture."""
        return task_of(self.config, self.manifest)

    @property
    def heldout(self) -> Path | None:
        """The test split: ``heldout.jsonl`` (text) or the ``heldout/`` image folder."""
        if self.task == IMAGE:
            d = self.path / HELDOUT_DIR
            return d if d.is_dir() else None
        p = self.path / HELDOUT
        return p if p.is_file() else None

    @property
    def calibration(self) -> Path | None:
        """Training samples for static quantization: ``calibration.jsonl`` or ``calibration/``."""
        if self.task == IMAGE:
            d = self.path / CALIBRATION_DIR
            return d if d.is_dir() else None
        p = self.path / CALIBRATION
        return p if p.is_file() else None

    @property
    def validation(self) -> Path | None:
        """The validation split: ``validation.jsonl`` (text) or the ``validation/`` image folder
        (None when the run had none, or for a checkpoint written before text kept it)."""
        if self.task == IMAGE:
            d = self.path / VALIDATION_DIR
            return d if d.is_dir() else None
        p = self.path / VALIDATION
        return p if p.is_file() else None

    @property
    def image_size(self) -> int | None:
        """The square side an image model was trained at (settings.image_size, else the processor's)."""
        if self.task != IMAGE:
            return None
        size = self.manifest.get("settings", {}).get("image_size")
        if size:
            return int(size)
        proc = self.path / PROCESSOR_FILE
        if proc.is_file():
            from runtime.pixels import load_processor

            return int(load_processor(proc)["size"]["height"])
        return None

    @property
    def manifest_sha256(self) -> str | None:
        p = self.path / MANIFEST
        return sha256_file(p) if p.is_file() else None

    @property
    def max_length(self) -> int:
        return int(self.manifest.get("settings", {}).get("max_length") or 512)


def check_valid_checkpoint_dir(path: str | Path, flag: str = "CHECKPOINT") -> Checkpoint:
    """Check a checkpoint directory before any work; name what is missing and the fix."""
    p = Path(path)
    if not p.is_dir():
        incomplete = p.parent / f".{p.name}.incomplete"
        if incomplete.is_dir():
            raise CheckpointError(
                f"{flag} {path}: the fine-tuning run that writes it did not finish; rerun it with --resume"
            )
        raise CheckpointError(f"{flag} {path}: no such directory; {MAKE_ONE}")
    config_path = p / "config.json"
    missing = f"{flag} {path}: no config.json, so this is not a model checkpoint; {MAKE_ONE}"
    if not config_path.is_file():
        raise CheckpointError(missing)
    config = read_json_object(config_path, missing, error=CheckpointError)
    if problem := config_problem(config):
        raise CheckpointError(f"{config_path}: {problem}; re-save the model with save_pretrained, or {MAKE_ONE}")
    archs = config.get("architectures") or []
    if not any(a.endswith(("ForSequenceClassification", "ForImageClassification")) for a in archs):
        raise CheckpointError(
            f"{flag} {path}: config.json describes {', '.join(archs) or 'no architecture'}, "
            f"not a sequence or image classifier; {MAKE_ONE}"
        )
    has_weights = (p / WEIGHTS).is_file() or (p / "model.safetensors.index.json").is_file()
    if not has_weights:
        if (p / "pytorch_model.bin").is_file():
            raise CheckpointError(
                f"{flag} {path}: only pytorch_model.bin (pickle) weights; ferry loads safetensors only: "
                "re-save with save_pretrained(..., safe_serialization=True)"
            )
        raise CheckpointError(f"{flag} {path}: no {WEIGHTS}; {MAKE_ONE}")
    manifest: dict[str, Any] = {}
    if (p / MANIFEST).exists():
        manifest = read_manifest(p)
        if problem := manifest_problem(manifest):
            raise CheckpointError(f"{flag} {path}: {MANIFEST} {problem}; the checkpoint is damaged, run ferry finetune again")
        if manifest.get("stage") != STAGE:
            raise CheckpointError(f"{flag} {path}: {MANIFEST} was written by '{manifest.get('stage')}', not by ferry finetune")
        if manifest.get("task", TEXT) not in TASKS:
            raise CheckpointError(f"{flag} {path}: {MANIFEST} task '{manifest.get('task')}' is not one of {', '.join(TASKS)}")
    task = task_of(config, manifest)
    if task != task_of(config, {}):
        raise CheckpointError(f"{flag} {path}: {MANIFEST} says {task} but config.json describes {', '.join(archs)}")
    if task == IMAGE:
        if not (p / PROCESSOR_FILE).is_file():
            raise CheckpointError(f"{flag} {path}: no {PROCESSOR_FILE}; save the image processor beside the model")
        from runtime.pixels import load_processor

        try:
            load_processor(p / PROCESSOR_FILE)
        except FerryError as e:
            raise CheckpointError(str(e)) from None
    elif not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{flag} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer beside the model")
    id2label = config.get("id2label") or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else []
    return Checkpoint(p, config, manifest, labels)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with the types of the ferry.json keys later stages read (None: nothing)."""
    if "stage" not in m:
        return "has no 'stage'"
    if not isinstance(m["stage"], str):
        return "'stage' must be a string"
    if "task" in m and not isinstance(m["task"], str):
        return "'task' must be a string"
    for key in ("settings", "files"):
        if key in m and not isinstance(m[key], dict):
            return f"'{key}' must be a JSON object"
    for key in ("max_length", "image_size"):
        value = m.get("settings", {}).get(key)
        if value is not None and not _positive_int(value):
            return f"'settings.{key}' must be a positive integer, not {value!r}"
    labels = m.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(y, str) for y in labels)):
        return "'labels' must be a list of strings"
    for name, info in m.get("files", {}).items():
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)):
            return f"'files.{name}' must be a JSON object with a 'sha256' string"
    return None


def config_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the types of config.json's architectures and id2label (None: nothing)."""
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        return "'architectures' must be a list of strings"
    id2label = config.get("id2label")
    if id2label is None:
        return None
    if not isinstance(id2label, dict):
        return "'id2label' must be a JSON object"
    for key in id2label:
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10):
            return f"'id2label' key {key!r} is not an integer"
    if sorted(int(k) for k in id2label) != list(range(len(id2label))):
        return "'id2label' keys must be 0, 1, ... N-1"
    return None


def task_of(config: dict[str, Any], manifest: dict[str, Any]) -> str:
    """The task of a checkpoint: ferry.json's ``task``, else from config.json's architectures."""
    if manifest.get("task"):
        return str(manifest["task"])
    archs = config.get("architectures") or []
    return IMAGE if any(a.endswith("ForImageClassification") for a in archs) else TEXT


def write_checkpoint(
    staging: Path,
    model: Any,
    tokenizer: Any,
    manifest: dict[str, Any],
    heldout: Any | None = None,
    calibration: Any | None = None,
    validation: Any | None = None,
) -> None:
    """Write a complete checkpoint into ``staging``; the manifest goes last.

    Args:
        model: a transformers PreTrainedModel for sequence or image classification.
        tokenizer: its tokenizer; for an image model the processor dict
            (:func:`runtime.pixels.processor_dict`), written as preprocessor_config.json.
        manifest: the manifest body; ``stage`` and ``files`` are filled in here (an image
            manifest carries ``task`` and ``settings.image_size``).
        heldout, calibration: :class:`finetune.data.Examples` to store beside the model; for an
            image model, :class:`finetune.images.ImageExamples`, copied as ``<label>/<file>`` trees.
        validation: the validation split, written as ``validation.jsonl`` (or the ``validation/`` tree).
    """
    from finetune.data import write_jsonl

    model.save_pretrained(staging, safe_serialization=True)
    image = manifest.get("task") == IMAGE
    if image:
        write_json(staging / PROCESSOR_FILE, tokenizer)
    else:
        tokenizer.save_pretrained(staging)
    stored = [(heldout, HELDOUT, HELDOUT_DIR), (calibration, CALIBRATION, CALIBRATION_DIR), (validation, VALIDATION, VALIDATION_DIR)]
    for examples, jsonl, folder in stored:
        if examples is None:
            continue
        if image:
            from finetune.images import copy_image_tree

            copy_image_tree(examples, staging / folder)
        else:
            write_jsonl(staging / jsonl, examples)
    files = {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(staging.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    write_json(staging / MANIFEST, {"stage": STAGE, **manifest, "files": files})


def load_model(ckpt: Checkpoint, **kwargs: Any) -> Any:
    """The PyTorch model of a checkpoint, from safetensors only (sequence or image classification)."""
    if ckpt.task == IMAGE:
        from transformers import AutoModelForImageClassification as Auto

        from finetune.efficientnet_lite import register

        register()
    else:
        from transformers import AutoModelForSequenceClassification as Auto

    try:
        return Auto.from_pretrained(ckpt.path, use_safetensors=True, **kwargs)
    except Exception as e:  # safetensors and transformers raise many types for damaged files
        first = first_line(e)
        weights = sorted(Path(ckpt.path).glob("*.safetensors"))
        where = ", ".join(str(w) for w in weights) if weights else f"{ckpt.path} (no .safetensors file)"
        raise CheckpointError(f"{where}: cannot load the model weights ({first}); the file may be corrupted") from None


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        first = first_line(e)
        raise CheckpointError(f"{path}: cannot load the tokenizer ({first})") from None

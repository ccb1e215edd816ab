"""The serving runtime: one artifact variant behind an engine (ONNX Runtime or OpenVINO), for either task.

:class:`Runtime` is what both tasks share: the variant to serve (on a CPU, the start-up choice
of runtime/choose.py), the sha256 check of what it opens, the CUDA fallback, batch invariance,
readiness and /info. What one item is and how a batch of them becomes the model's inputs is the
task's part, chosen by ``ferry.tasks.task_named(artifact.task)`` in :data:`INPUTS`:

- :class:`TextInputs`: the artifact's tokenizer (runtime/tokens.py); a batch is grouped by token
  length and each group padded only to its own longest text, so short texts don't pay for long ones;
- :class:`ImageInputs`: the artifact's preprocessor_config.json (runtime/pixels.py); a batch is
  preprocessed pixels ``[N, 3, H, W]``.

No PyTorch and no transformers on this path; the softmax is numpy. A variant whose answers
depend on the batch (dynamic int8: ONNX Runtime computes activation scales per batch) is run one
item per inference call, which makes every answer equal to the answer given alone.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ferry.errors import ArtifactError, DataError, FerryError
from ferry.tasks import IMAGE, TEXT, task_named
from runtime import choose as choosing
from ferry.files import MANIFEST
from runtime.artifact import UNVERIFIED, Artifact, Variant, check_valid_artifact_dir
from runtime.choose import Choice
from runtime.engines import CPU, CUDA, Engine, available_providers, choose_providers, engine_installed, open_engine, softmax
from runtime.engines import gpu_present as session_gpu_present
from runtime.hardware import read_cpu
from runtime.pixels import PROCESSOR_FILE, processor_from_bytes
from runtime.tokens import collate, encode, length_groups, load_tokenizer, pad_id

# BentoML's dispatcher (max_batch_size is counted in texts) and the refusal budget per device.
# max_batch_tokens: the padded tokens of one model batch (benchmarks/batch_tokens.py measures
# the engine per batch shape). CPU (AMD EPYC, AVX2, demo fp32, 1 thread as a worker runs it):
# tokens/s is flat from about 128 padded tokens up (84-100% of the best from 8 x 16 to
# 128 x 128; 512-token texts 74-90%), so a bigger group buys no throughput, only memory and
# the wait of every text in it: 4,096 runs a full 32-text batch of texts up to 128 tokens as
# one call and 512-token texts by 8. GPU: text-embeddings-inference's default, not measured here.
DEVICE_DEFAULTS = {
    "cpu": {"max_batch_size": 32, "max_latency_ms": 10_000, "max_batch_tokens": 4096},
    "cuda": {"max_batch_size": 128, "max_latency_ms": 2_000, "max_batch_tokens": 16_384},
}


DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass
class Batch:
    """One batch of items: how the engine runs it (built by the task's inputs), then its answers."""

    groups: list[list[int]]  # the items of each inference call
    feeds: list[dict[str, np.ndarray]] = dataclasses.field(repr=False)  # each call's model inputs
    truncated: list[bool] | None = None  # per text: cut at max_length (images: None)
    tokens: list[int] | None = None  # per text: its tokens after truncation (images: None)
    padded_tokens: int | None = None  # tokens the model runs, padding included (images: None)
    probs: np.ndarray | None = None  # [n, labels] float64 in input order, once run

    @property
    def runs(self) -> int:
        """Inference calls made."""
        return len(self.groups)


class TextInputs:
    """The text task's part of a runtime: the artifact's tokenizer; a batch of texts grouped by token length."""

    names = ("input_ids", "attention_mask", "token_type_ids")  # the model inputs it feeds

    def __init__(self, tokenizer: Any, max_length: int, pad: int):
        self.tokenizer, self.max_length, self.pad_id = tokenizer, max_length, pad

    @classmethod
    def of(cls, artifact: Artifact) -> TextInputs:
        tokenizer = load_tokenizer(artifact, artifact.max_length)
        return cls(tokenizer, artifact.max_length, pad_id(tokenizer))

    def batch(self, texts: Sequence[str], input_names: Sequence[str], max_group: int | None, max_tokens: int | None) -> Batch:
        """``texts`` in length groups of at most ``max_group`` texts and ``max_tokens`` padded tokens."""
        return self.group(encode(self.tokenizer, texts), input_names, max_group, max_tokens)

    def group(self, encodings: Sequence[Any], input_names: Sequence[str], max_group: int | None, max_tokens: int | None) -> Batch:
        """Texts already tokenized by :attr:`tokenizer` (its encodings) in length groups, as :meth:`batch` makes them."""
        lengths = [len(e.ids) for e in encodings]
        groups = length_groups(lengths, max_group, max_tokens=max_tokens)
        feeds = [collate([encodings[i].ids for i in g], self.pad_id, input_names, type_ids=[encodings[i].type_ids for i in g])
                 for g in groups]
        padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
        return Batch(groups, feeds, [len(e.overflowing) > 0 for e in encodings], lengths, padded)

    def run_ids(self, engine: Engine, ids: list[list[int]]) -> np.ndarray:
        """Logits of token id lists (single-sentence inputs: token types 0) padded into one batch:
        how the start-up choice times and re-checks a variant on the artifact's reference texts."""
        return engine.run(collate(ids, self.pad_id, engine.input_names))

    def warm_up_items(self) -> list[str]:
        """A short and a long text (truncated at max_length)."""
        return ["warm-up", "warm-up " * self.max_length]

    def info(self) -> dict[str, Any]:
        return {"max_length": self.max_length}


class ImageInputs:
    """The image task's part of a runtime: the artifact's preprocessor_config.json (serve/http.py decodes
    a request's images with it); a batch is preprocessed pixels ``[N, 3, H, W]`` in order."""

    names = ("pixel_values",)
    # No reference token ids: an image artifact is served with its export-time default variant, with no
    # start-up choice and no re-check here.
    run_ids = None

    def __init__(self, processor: dict[str, Any], image_size: dict[str, int] | None):
        self.processor, self.image_size = processor, image_size

    @classmethod
    def of(cls, artifact: Artifact) -> ImageInputs:
        path = artifact.path / PROCESSOR_FILE
        if not path.is_file():
            raise ArtifactError(f"{path}: no such file; an image artifact needs its {PROCESSOR_FILE}")
        try:  # from the bytes checked against the manifest's files map
            processor = processor_from_bytes(artifact.read_verified(PROCESSOR_FILE), path)
        except DataError as e:
            raise ArtifactError(str(e)) from None
        return cls(processor, artifact.manifest.get("image_size"))

    def batch(self, pixels: Any, input_names: Sequence[str], max_group: int | None, max_tokens: int | None) -> Batch:
        """``pixels`` (``[N, 3, H, W]``, or a list of ``[3, H, W]``) in runs of at most ``max_group``
        images, in order; ``max_tokens`` does not apply to images."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        n = len(pixels)
        step = max_group or n or 1
        starts = range(0, n, step)
        return Batch([list(range(s, min(s + step, n))) for s in starts], [{"pixel_values": pixels[s : s + step]} for s in starts])

    def warm_up_items(self) -> np.ndarray:
        """Two black images at the model's size."""
        size = self.image_size or {}
        return np.zeros((2, 3, int(size.get("height", 224)), int(size.get("width", 224))), dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {"image_size": self.image_size}


INPUTS = {TEXT: TextInputs, IMAGE: ImageInputs}


def task_inputs(artifact: Artifact) -> TextInputs | ImageInputs:
    """The inputs of ``artifact``'s task, loaded and checked (its tokenizer or its image processor).

    Raises:
        ArtifactError: a task ferry does not know, or a missing or damaged tokenizer or processor.
    """
    try:
        task = task_named(artifact.task)
    except FerryError as e:
        raise ArtifactError(f"{artifact.path / MANIFEST}: {e}") from None
    return INPUTS[task].of(artifact)


def resolve_device(device: str = "auto", available: Sequence[str] | None = None, gpu_present: bool | None = None) -> str:
    """"cpu" or "cuda" for a requested device ("auto", "cpu", "cuda").

    "auto" is "cuda" only when ONNX Runtime has the CUDA provider and a GPU is present.

    Raises:
        FerryError: an unknown device, or "cuda" without the CUDA provider or a GPU.
    """
    if device not in DEVICES:
        raise FerryError(f"--device {device!r} is not one of: {', '.join(DEVICES)}")
    available = available_providers() if available is None else list(available)
    if device == "cpu":
        return "cpu"
    providers = choose_providers(device, available)  # raises for cuda without the provider
    present = session_gpu_present() if gpu_present is None else gpu_present
    if device == "cuda":
        if not present:  # asking ORT anyway only adds its own error lines before ours
            raise FerryError("--device cuda: no NVIDIA GPU or driver is visible here; use --device cpu (or auto)")
        return "cuda"
    return "cuda" if CUDA in providers and present else "cpu"


def select_variant(artifact: Artifact, name: str | None, device: str, notes: list[str] | None = None) -> Variant:
    """The variant to serve: ``name``, or the artifact's default for the device (GPU: fp16 when exported).

    Raises:
        ArtifactError: an unknown variant, or one that failed its parity gate.
    """
    notes = [] if notes is None else notes
    if name is None and device == "cuda":
        gpu_default = (artifact.manifest.get("default_variant") or {}).get("gpu")
        v = artifact.variant(gpu_default) if gpu_default else artifact.variant(None, "cpu")
    else:
        v = artifact.variant(name, "cpu")
    if not v.servable:
        servable = ", ".join(n for n, x in artifact.variants.items() if x.servable) or "none"
        raise ArtifactError(f"{artifact.path}: variant '{v.name}' failed its parity gate and is not served; servable variants: {servable}")
    if v.status == UNVERIFIED:
        notes.append(f"variant '{v.name}' is unverified: its parity with PyTorch was not measured")
    if device == "cpu" and v.info.get("precision") == "fp16":
        notes.append(f"variant '{v.name}' is fp16, which is slow on CPU; the int8 or fp32 variant suits CPU")
    return v


def check_startup(path: str | Path, variant: str | None, device: str) -> Variant:
    """What the server checks before it starts workers: artifact and manifest, every file its files
    map lists, variant, model sha256, the task's inputs (tokenizer or image processor)."""
    artifact = check_valid_artifact_dir(path)
    artifact.verify_files()
    v = select_variant(artifact, variant, resolve_device(device))
    v.verify()
    task_inputs(artifact)
    return v


def open_verified(
    variant: Variant, device: str, threads: int | None, optimization: str, available: Sequence[str],
    factory: Callable[..., Any] | None = None, tensorrt: bool = False,
) -> Engine:
    """Open ``variant`` in its engine from the bytes checked against the manifest, so what runs is
    what was hashed; an engine that opens the file by path (OpenVINO, TensorRT, a graph with
    external data, a test's session factory) has the file checked again once it is open.

    Raises:
        ArtifactError: a model file whose sha256 differs from the manifest (the runtime then refuses to start).
    """
    data = variant.read_verified()
    spec = variant.spec
    engine = open_engine(variant.path, spec.engine, spec.precision, device, threads, optimization, available,
                         session_factory=factory, tensorrt=tensorrt, model_bytes=data)
    if not getattr(engine, "loaded_from_bytes", False):
        variant.verify()
    return engine


class Runtime:
    """The task's inputs + an engine for one artifact variant, text or image.

    Args:
        artifact: the artifact directory (``ferry export`` output).
        variant: a variant name, or None: on a CPU the start-up choice (text artifacts with
            reference logits), else the artifact's default for the chosen device.
        device: "auto" (CUDA when usable, else CPU), "cpu" or "cuda".
        threads: engine intra-op threads (None: the engine's own default).
        optimization: graph optimization level (disable, basic, extended, all).
        max_group: most items per inference call (None: no cap beyond length grouping).
        max_tokens: most padded tokens per inference call of texts (None: no budget); a longer text runs alone.
        available: the ONNX Runtime provider list, faked in tests.
        gpu_present: whether a GPU is present, faked in tests (None: look for one).
        session_factory: builds an ONNX Runtime session (tests pass a fake); defaults to runtime.engines.create_session.
        enforce_invariance: run a variant measured as batch-dependent (ferry.json's
            ``batch_invariant: false``) one item per inference call, so that each answer
            equals the answer alone; False trades that for batched throughput.
        choose: make the start-up choice (or re-check a named variant here) where the task can.

    Raises:
        ArtifactError: a bad artifact, an unservable variant, or a model file whose sha256
            differs from the manifest (the runtime then refuses to start).
    """

    def __init__(
        self,
        artifact: str | Path | Artifact,
        variant: str | None = None,
        device: str = "auto",
        threads: int | None = None,
        optimization: str = "all",
        max_group: int | None = None,
        max_tokens: int | None = None,
        available: Sequence[str] | None = None,
        gpu_present: bool | None = None,
        session_factory: Callable[..., Any] | None = None,
        enforce_invariance: bool = True,
        choose: bool = True,
    ):
        self.artifact = artifact if isinstance(artifact, Artifact) else check_valid_artifact_dir(artifact)
        self.inputs = task_inputs(self.artifact)
        self.task = task_named(self.artifact.task)
        self.choose_at_start = choose and self.inputs.run_ids is not None
        self.threads = threads
        self.optimization = optimization
        self.max_group = max_group
        self.max_tokens = max_tokens
        self.labels = self.artifact.labels
        available = available_providers() if available is None else list(available)
        self._open_variant(variant, device, available, session_factory, gpu_present)
        self.io_binding = getattr(self.engine, "io_binding", False)
        self.input_names = list(self.engine.input_names)
        unknown = [n for n in self.input_names if n not in self.inputs.names]
        if unknown:
            raise ArtifactError(f"{self.variant.path}: model inputs {unknown} are not {self.task.name} inputs")
        # True, False, or None when export could not measure it (fp16 without a GPU)
        self.batch_invariant_variant: bool | None = self.variant.info.get("batch_invariant")
        # One item per call makes a batch-dependent variant answer exactly as when alone.
        self.one_per_run = enforce_invariance and self.batch_invariant_variant is False
        self._ready = threading.Event()

    # --- opening the variant ----------------------------------------------------------
    def _open_variant(
        self, variant: str | None, device: str, available: Sequence[str], factory: Callable[..., Any] | None,
        gpu_present: bool | None = None,
    ) -> None:
        """Device, variant choice, sha256 check, CUDA fallback: sets ``device``, ``notes``, ``variant``,
        ``engine``, ``provider``, ``fallback``, ``choice`` and ``local_parity``."""
        self.notes: list[str] = self.artifact.integrity_notes()  # warnings for the caller to show (the server logs them)
        self.device = resolve_device(device, available, gpu_present)
        self.fallback: str | None = None
        self.choice: Choice | None = None
        self.local_parity: dict[str, Any] | None = None
        engine = None
        if variant is None and self.device == "cpu" and self.choose_at_start:
            self.choice = self._choose(available, factory)
            variant = self.choice.variant
            engine = self.choice.engines.get(str(variant))
            self.local_parity = self.choice.local.get(str(variant))
        self.variant = select_variant(self.artifact, variant, self.device, self.notes)
        self.engine = engine or self._open(factory, available)
        self.provider = self.engine.provider
        if self.device == "cpu" and self.choice is None and self.choose_at_start:
            self._recheck_here()
        if self.device == "cuda" and self.provider != CUDA:
            # ORT lists CUDA but could not use it (no driver, no cuDNN): serve on CPU, with the CPU variant.
            self.fallback = f"CUDA provider listed but unusable, fell back to {self.provider}"
            if device == "cuda":
                raise FerryError(f"--device cuda: ONNX Runtime could not use the GPU ({self.fallback}); use --device cpu")
            self.device = "cpu"
            self.variant = select_variant(self.artifact, variant, "cpu", self.notes)
            self.engine = self._open(factory, [CPU])
            self.provider = self.engine.provider

    def _choose(self, available: Sequence[str], factory: Callable[..., Any] | None) -> Choice:
        """The start-up choice among the CPU variants (runtime/choose.py)."""
        names, skipped = choosing.candidates(self.artifact, read_cpu(), engine_installed)
        fallback = (self.artifact.manifest.get("default_variant") or {}).get("cpu")

        def open_variant(name: str) -> Engine:
            return open_verified(self.artifact.variants[name], "cpu", self.threads, self.optimization, available, factory)

        return choosing.choose(self.artifact, names, skipped, open_variant, self.inputs.run_ids, choosing.load_reference(self.artifact), fallback)

    def _recheck_here(self) -> None:
        """A variant named by --variant is re-checked here too; one that fails is not served."""
        ref = choosing.load_reference(self.artifact)
        if ref is None:
            return
        verdict = choosing.recheck(lambda ids: self.inputs.run_ids(self.engine, ids), ref, choosing.gates_of(self.variant),
                                   deadline=time.perf_counter() + choosing.BUDGET_S)
        if verdict["status"] != "pass" and self.variant.info.get("batch_invariant") is False and verdict["reason"].startswith("answers change"):
            verdict["status"] = "pass"  # a batch-dependent variant: served one text per call (--batch-invariance)
        self.local_parity = verdict
        if verdict["status"] != "pass":
            raise ArtifactError(f"{self.artifact.path}: variant '{self.variant.name}' fails its gate on this machine "
                                f"({verdict['reason']}); serve another --variant")

    def _open(self, factory: Callable[..., Any] | None, available: Sequence[str]) -> Engine:
        return open_verified(self.variant, self.device, self.threads, self.optimization, available, factory,
                             tensorrt=self.variant.name.endswith("-tensorrt"))

    # --- facts ---------------------------------------------------------------------
    @property
    def batch_invariant(self) -> bool | None:
        """Whether served answers are independent of batch mates (None: not measured)."""
        return True if self.one_per_run else self.batch_invariant_variant

    @property
    def batch_invariance(self) -> str:
        if self.one_per_run:
            return f"one {self.task.input} per inference call (the variant's answers depend on its batch)"
        return {True: "the variant is batch-invariant", False: "not enforced: answers depend on the batch",
                None: "not measured for this variant"}[self.batch_invariant_variant]

    def describe(self) -> str:
        fb = f" ({self.fallback})" if self.fallback else ""
        here = f", here {self.local_parity['status']}" if self.local_parity else ""
        return (
            f"serving {self.artifact.path} variant '{self.variant.name}' "
            f"({self.variant.engine} {self.variant.info.get('precision', '?')}, parity {self.variant.status}{here}) on {self.provider}{fb}, "
            f"threads {self.threads or 'auto'}, optimization {self.optimization}; batch invariance: {self.batch_invariance}"
        )

    def info(self) -> dict[str, Any]:
        """The /info body: the model, its labels, the variant and where it runs, batch invariance, readiness."""
        m = self.artifact.manifest
        v = self.variant
        return {
            "model": {
                "artifact": str(self.artifact.path),
                "model_type": (m.get("source") or {}).get("model_type"),
                "source_checkpoint": (m.get("source") or {}).get("checkpoint"),
                "task": m.get("task"),
                "ensemble": None if not m.get("ensemble") else {
                    "combine": m["ensemble"]["combine"],
                    "members": [x["checkpoint"] for x in m["ensemble"]["members"]],
                },
            },
            "labels": self.labels,
            **self.inputs.info(),
            "variant": v.name,
            "engine": v.engine,
            "precision": v.info.get("precision"),
            "sha256": v.info.get("sha256"),
            "provider": self.provider,
            "device": self.device,
            "fallback": self.fallback,
            "threads": self.threads,
            "parity": {"status": v.status, **(v.info.get("parity") or {})},
            "parity_here": self.local_parity,
            "choice": self.choice.as_dict() if self.choice else None,
            "cpu": read_cpu().as_dict(),
            "variants": {n: x.status for n, x in self.artifact.variants.items()},
            "io_binding": self.io_binding,
            "optimization": self.optimization,
            "batch_invariant": self.batch_invariant,
            "batch_invariant_variant": self.batch_invariant_variant,
            "batch_invariance": self.batch_invariance,
            "ready": self.ready,
        }

    # --- inference -----------------------------------------------------------------
    def run_batch(self, items: Any) -> Batch:
        """Probabilities for ``items`` (texts, or preprocessed images) in their order, in the
        inference calls the task's inputs group them into."""
        return self._infer(self.inputs.batch(items, self.input_names, 1 if self.one_per_run else self.max_group, self.max_tokens))

    def run_encoded(self, encodings: Sequence[Any]) -> Batch:
        """:meth:`run_batch` on texts the caller has already tokenized with ``inputs.tokenizer`` (the
        tokenizer's encodings): the same groups and the same answers, without tokenizing twice."""
        return self._infer(self.inputs.group(encodings, self.input_names, 1 if self.one_per_run else self.max_group, self.max_tokens))

    def _infer(self, batch: Batch) -> Batch:
        probs = np.zeros((sum(map(len, batch.groups)), len(self.labels)), dtype=np.float64)
        for group, feed in zip(batch.groups, batch.feeds):
            logits = self.engine.run(feed)
            if logits.shape != (len(group), len(self.labels)):
                raise ArtifactError(
                    f"{self.variant.path}: logits of shape {logits.shape}, expected {(len(group), len(self.labels))} "
                    "(labels in ferry.json do not match the model)"
                )
            probs[group] = softmax(logits)
        batch.probs = probs
        return batch

    def format(self, probs: np.ndarray, truncated: bool | None, return_all_scores: bool = False) -> dict[str, Any]:
        """One item's answer: ``{"label", "score"}``, ``"truncated"`` for a text, ``"scores"`` for every label when asked."""
        best = int(np.argmax(probs))
        out: dict[str, Any] = {"label": self.labels[best], "score": float(probs[best])}
        if truncated is not None:
            out["truncated"] = bool(truncated)
        if return_all_scores:
            out["scores"] = {label: float(p) for label, p in zip(self.labels, probs)}
        return out

    def classify(self, items: Any, return_all_scores: bool = False) -> list[dict[str, Any]]:
        """Per item: ``{"label", "score"}`` (+ ``"truncated"`` for a text, ``"scores"`` for every label)."""
        if not len(items):
            return []
        b = self.run_batch(items)
        truncated = b.truncated or [None] * len(b.probs)
        return [self.format(p, t, return_all_scores) for p, t in zip(b.probs, truncated)]

    # --- readiness -------------------------------------------------------------------
    def warm_up(self) -> None:
        """One inference on the task's warm-up items (a short and a long text, or two images); the runtime is ready after it."""
        self.run_batch(self.inputs.warm_up_items())
        self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

"""The serving runtime: one artifact variant behind a tokenizer and an engine (ONNX Runtime or OpenVINO).

No PyTorch and no transformers on this path: the tokenizer is the artifact's
``tokenizer.json`` loaded with the ``tokenizers`` library (the same Rust tokenizer that
transformers' fast tokenizers wrap, so the ids are identical, without importing
transformers, which takes seconds and may pull in torch), and the softmax is numpy.

A batch is grouped by token length and each group is padded only to its own longest
text, so short texts don't pay for long ones. A variant whose answers depend on the
batch (dynamic int8: ONNX Runtime computes activation scales per batch) is run one text
per inference call, which makes every answer equal to the answer given alone.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtime.artifact import UNVERIFIED, Artifact, Variant, check_valid_artifact_dir
from runtime import choose as choosing
from runtime.choose import Choice
from runtime.engines import CPU, CUDA, Engine, available_providers, choose_providers, engine_installed, open_engine, softmax
from runtime.engines import gpu_present as session_gpu_present
from runtime.hardware import read_cpu
from ferry.tasks import IMAGE_TASK
from ferry.errors import ArtifactError, FerryError, first_line

TOKENIZER_FILE = "tokenizer.json"
DEVICES = ("auto", "cpu", "cuda")
# A length group closes when padding it to its longest text would add more than this
# fraction of padding tokens to its real tokens.
PAD_SLACK = 0.25


@dataclasses.dataclass
class Batch:
    """The raw result of one batch: probabilities in input order and per-text facts."""

    probs: np.ndarray  # [n, labels] float64
    truncated: list[bool]
    tokens: list[int]  # tokens per text after truncation
    padded_tokens: int  # tokens the model actually ran, padding included
    runs: int  # inference calls made


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



def length_groups(
    lengths: Sequence[int], max_group: int | None = None, slack: float = PAD_SLACK, max_tokens: int | None = None,
) -> list[list[int]]:
    """Indices grouped by token length: each group is padded to its own longest text.

    Indices are sorted by length; a group closes when it holds ``max_group`` texts, when
    padding it to the next text's length would exceed ``slack`` of its real tokens, or when
    its padded tokens would pass ``max_tokens`` (a text longer than that forms its own group).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        full = max_group is not None and len(current) >= max_group
        wasteful = current and n * (len(current) + 1) > (real + n) * (1 + slack)
        over = max_tokens is not None and n * (len(current) + 1) > max_tokens
        if current and (full or wasteful or over):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        groups.append(current)
    return groups


def load_tokenizer(artifact: Artifact, max_length: int) -> Any:
    """The artifact's tokenizer.json, truncating to ``max_length``, never padding; built from the
    bytes checked against the manifest's files map (when it has one)."""
    from tokenizers import Tokenizer

    path = artifact.path / TOKENIZER_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{artifact.path}: no {TOKENIZER_FILE}; the serving runtime needs a fast tokenizer, re-export from a "
            "checkpoint saved with a fast tokenizer"
        )
    data = artifact.read_verified(TOKENIZER_FILE)
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises a plain Exception for a damaged file
        raise ArtifactError(f"{path}: cannot load the tokenizer ({first_line(e)})") from None
    tok.no_padding()
    tok.enable_truncation(max_length)
    check_vocabulary(artifact, tok)
    return tok


def check_vocabulary(artifact: Artifact, tok: Any) -> None:
    """Refuse a tokenizer that emits ids past the model's embedding table (every text using them would fail)."""
    import json

    if not (artifact.path / "config.json").is_file():
        return  # no config.json: nothing to compare with
    try:
        vocab_size = int(json.loads(artifact.read_verified("config.json")).get("vocab_size") or 0)
    except (ValueError, TypeError, AttributeError):
        return  # no usable config.json: nothing to compare with
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if vocab_size and top >= vocab_size:
        raise ArtifactError(
            f"{artifact.path / TOKENIZER_FILE}: token ids go up to {top} but config.json's vocab_size is {vocab_size}; "
            "the tokenizer does not match the model, re-export from the checkpoint"
        )


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
    map lists, variant, model sha256, tokenizer (or image processor)."""
    artifact = check_valid_artifact_dir(path)
    artifact.verify_files()
    v = select_variant(artifact, variant, resolve_device(device))
    v.verify()
    if artifact.task == IMAGE_TASK:
        from runtime.pixels import PROCESSOR_FILE, processor_from_bytes

        try:
            processor_from_bytes(artifact.read_verified(PROCESSOR_FILE), artifact.path / PROCESSOR_FILE)
        except FerryError as e:
            raise ArtifactError(str(e)) from None
    else:
        load_tokenizer(artifact, artifact.max_length)
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


class VariantSession:
    """Opens one artifact variant in its engine: device, variant choice, sha256 check, CUDA fallback.

    Shared by :class:`Runtime` (text) and ``serve.image.ImageRuntime``; sets ``device``, ``notes``,
    ``variant``, ``engine``, ``provider`` and ``fallback``. Needs ``artifact``, ``threads``, ``optimization``.
    """

    artifact: Artifact
    threads: int | None
    optimization: str

    def _open_variant(
        self, variant: str | None, device: str, available: Sequence[str], factory: Callable[..., Any] | None,
        gpu_present: bool | None = None,
    ) -> None:
        self.notes: list[str] = self.artifact.integrity_notes()  # warnings for the caller to show (the server logs them)
        self.device = resolve_device(device, available, gpu_present)
        self.fallback: str | None = None
        self.choice: Choice | None = None
        self.local_parity: dict[str, Any] | None = None
        engine = None
        if variant is None and self.device == "cpu":
            self.choice = self._choose(available, factory)
            if self.choice is not None:
                variant = self.choice.variant
                engine = self.choice.engines.get(str(variant))
                self.local_parity = self.choice.local.get(str(variant))
        self.variant = select_variant(self.artifact, variant, self.device, self.notes)
        self.engine = engine or self._open(factory, available)
        self.provider = self.engine.provider
        if self.device == "cpu" and self.choice is None:
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

    def _choose(self, available: Sequence[str], factory: Callable[..., Any] | None) -> Choice | None:
        """The start-up choice among CPU variants (None: this runtime does not choose; the manifest's default)."""
        return None

    def _recheck_here(self) -> None:
        """Re-check a named variant on this machine (nothing to do for a runtime without reference data)."""

    def variant_info(self) -> dict[str, Any]:
        """The /info fields of the open variant and where it runs."""
        v = self.variant
        return {
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
        }

    def _open(self, factory: Callable[..., Any] | None, available: Sequence[str]) -> Engine:
        return open_verified(self.variant, self.device, self.threads, self.optimization, available, factory,
                             tensorrt=self.variant.name.endswith("-tensorrt"))


class Runtime(VariantSession):
    """Tokenizer + engine for one artifact variant.

    Args:
        artifact: the artifact directory (``ferry export`` output).
        variant: a variant name, or None for the artifact's default on the chosen device.
        device: "auto" (CUDA when usable, else CPU), "cpu" or "cuda".
        threads: ONNX Runtime intra-op threads (None: one per physical core).
        optimization: graph optimization level (disable, basic, extended, all).
        max_group: most texts per inference call (None: no cap beyond length grouping).
        max_tokens: most padded tokens per inference call (None: no budget); a longer text runs alone.
        available: the ONNX Runtime provider list, faked in tests.
        gpu_present: whether a GPU is present, faked in tests (None: look for one).
        session_factory: builds an ONNX Runtime session (tests pass a fake); defaults to runtime.engines.create_session.
        enforce_invariance: run a variant measured as batch-dependent (ferry.json's
            ``batch_invariant: false``) one text per inference call, so that each answer
            equals the answer alone; False trades that for batched throughput.

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
        self.choose_at_start = choose
        self.threads = threads
        self.optimization = optimization
        self.max_group = max_group
        self.max_tokens = max_tokens  # padded tokens per model batch (None: no budget)
        self.labels = self.artifact.labels
        self.max_length = self.artifact.max_length
        available = available_providers() if available is None else list(available)
        self.requested_device = device
        self.tokenizer = load_tokenizer(self.artifact, self.max_length)
        self.pad_id = self._pad_id()
        self._open_variant(variant, device, available, session_factory, gpu_present)
        self.io_binding = getattr(self.engine, "io_binding", False)
        self.input_names = list(self.engine.input_names)
        known = {"input_ids", "attention_mask", "token_type_ids"}
        unknown = [n for n in self.input_names if n not in known]
        if unknown:
            raise ArtifactError(f"{self.variant.path}: model inputs {unknown} are not text-classification inputs")
        # True, False, or None when export could not measure it (fp16 without a GPU)
        self.batch_invariant_variant: bool | None = self.variant.info.get("batch_invariant")
        # One text per call makes a batch-dependent variant answer exactly as when alone.
        self.one_per_run = enforce_invariance and self.batch_invariant_variant is False
        self._ready = threading.Event()

    # --- loading -----------------------------------------------------------------
    def _run_ids(self, engine: Engine, ids: list[list[int]]) -> np.ndarray:
        """Logits of token id lists (single-sentence inputs: token types 0) padded into one batch."""
        width = max(len(x) for x in ids)
        feed = {"input_ids": np.full((len(ids), width), self.pad_id, dtype=np.int64),
                "attention_mask": np.zeros((len(ids), width), dtype=np.int64),
                "token_type_ids": np.zeros((len(ids), width), dtype=np.int64)}
        for row, x in enumerate(ids):
            feed["input_ids"][row, : len(x)] = x
            feed["attention_mask"][row, : len(x)] = 1
        return engine.run({k: feed[k] for k in engine.input_names})

    def _choose(self, available: Sequence[str], factory: Callable[..., Any] | None) -> Choice | None:
        if not self.choose_at_start:
            return None
        names, skipped = choosing.candidates(self.artifact, read_cpu(), engine_installed)
        fallback = (self.artifact.manifest.get("default_variant") or {}).get("cpu")

        def open_variant(name: str) -> Engine:
            return open_verified(self.artifact.variants[name], "cpu", self.threads, self.optimization, available, factory)

        return choosing.choose(self.artifact, names, skipped, open_variant, self._run_ids, choosing.load_reference(self.artifact), fallback)

    def _recheck_here(self) -> None:
        """A variant named by --variant is re-checked here too; one that fails is not served."""
        if not self.choose_at_start:
            return
        ref = choosing.load_reference(self.artifact)
        if ref is None:
            return
        import time

        verdict = choosing.recheck(lambda ids: self._run_ids(self.engine, ids), ref, choosing.gates_of(self.variant),
                                   deadline=time.perf_counter() + choosing.BUDGET_S)
        if verdict["status"] != "pass" and self.variant.info.get("batch_invariant") is False and verdict["reason"].startswith("answers change"):
            verdict["status"] = "pass"  # a batch-dependent variant: served one text per call (--batch-invariance)
        self.local_parity = verdict
        if verdict["status"] != "pass":
            raise ArtifactError(f"{self.artifact.path}: variant '{self.variant.name}' fails its gate on this machine "
                                f"({verdict['reason']}); serve another --variant")

    def _pad_id(self) -> int:
        for token in ("[PAD]", "<pad>", "<PAD>"):
            i = self.tokenizer.token_to_id(token)
            if i is not None:
                return int(i)
        return 0  # the attention mask hides padding, whatever its id

    # --- facts ---------------------------------------------------------------------
    @property
    def batch_invariant(self) -> bool | None:
        """Whether served answers are independent of batch mates (None: not measured)."""
        return True if self.one_per_run else self.batch_invariant_variant

    @property
    def batch_invariance(self) -> str:
        if self.one_per_run:
            return "one text per inference call (the variant's answers depend on its batch)"
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
        m = self.artifact.manifest
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
            **self.variant_info(),
            "io_binding": self.io_binding,
            "optimization": self.optimization,
            "max_length": self.max_length,
            "batch_invariant": self.batch_invariant,
            "batch_invariant_variant": self.batch_invariant_variant,
            "batch_invariance": self.batch_invariance,
            "ready": self.ready,
        }

    # --- inference -----------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[Any]:
        try:
            return self.tokenizer.encode_batch(list(texts))
        except TypeError:  # a str the Rust tokenizer cannot take (a lone surrogate): replace the bad code points
            return self.tokenizer.encode_batch([t.encode("utf-8", "replace").decode("utf-8") for t in texts])

    def _feed(self, encodings: Sequence[Any]) -> dict[str, np.ndarray]:
        width = max(len(e.ids) for e in encodings)
        n = len(encodings)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for row, e in enumerate(encodings):
            k = len(e.ids)
            ids[row, :k] = e.ids
            mask[row, :k] = 1
            types[row, :k] = e.type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: feed[name] for name in self.input_names}

    def run_batch(self, texts: Sequence[str]) -> Batch:
        """Probabilities for ``texts`` in their order, grouped by token length inside."""
        encodings = self.encode(texts)
        lengths = [len(e.ids) for e in encodings]
        probs = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        groups = [[i] for i in range(len(texts))] if self.one_per_run else length_groups(lengths, self.max_group, max_tokens=self.max_tokens)
        padded = 0
        for group in groups:
            feed = self._feed([encodings[i] for i in group])
            padded += int(feed["input_ids"].size) if "input_ids" in feed else 0
            logits = self.engine.run(feed)
            if logits.shape != (len(group), len(self.labels)):
                raise ArtifactError(
                    f"{self.variant.path}: logits of shape {logits.shape}, expected {(len(group), len(self.labels))} "
                    "(labels in ferry.json do not match the model)"
                )
            probs[group] = softmax(logits)
        truncated = [len(e.overflowing) > 0 for e in encodings]
        return Batch(probs, truncated, lengths, padded, len(groups))

    def format(self, probs: np.ndarray, truncated: bool, return_all_scores: bool = False) -> dict[str, Any]:
        best = int(np.argmax(probs))
        out: dict[str, Any] = {"label": self.labels[best], "score": float(probs[best]), "truncated": bool(truncated)}
        if return_all_scores:
            out["scores"] = {label: float(p) for label, p in zip(self.labels, probs)}
        return out

    def classify(self, texts: Sequence[str], return_all_scores: bool = False) -> list[dict[str, Any]]:
        """Per text: ``{"label", "score", "truncated"}`` (+ ``"scores"`` for every label)."""
        if not texts:
            return []
        b = self.run_batch(texts)
        return [self.format(p, t, return_all_scores) for p, t in zip(b.probs, b.truncated)]

    # --- readiness -------------------------------------------------------------------
    def warm_up(self) -> None:
        """One inference on a short and a long text; the runtime is ready after it."""
        self.run_batch(["warm-up", "warm-up " * self.max_length])
        self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

"""Parity: does each ONNX variant compute what the PyTorch model computes?

A library of plain functions with typed errors, after optimum-onnx's
``exporters/onnx/convert.py`` ``_run_validation``. For every variant, PyTorch (fp32, eval mode)
and the variant's engine see the very same arrays (a :class:`Reference`, computed once for all
variants by the task: :func:`build_reference` for texts, ``export.image.build_image_reference``
for images):

1. random inputs at several batch sizes (and, for texts, sequence lengths, right-padded with
   varied real lengths inside a batch), and
2. the checkpoint's held-out split (or ``--data``).

:func:`validate` checks the output names, then the shapes and the values on every input, and
further: label agreement with PyTorch, accuracy and macro-F1 of both, and batch invariance (each
input alone versus inside mixed batches). It collects every shape failure, or every gate missed,
then raises :class:`OutputMismatch` or :class:`ValueMismatch` (both a :class:`VariantFailed`,
a ``ParityError``). Gates (:class:`Gates`), all configurable:

- fp32: max |Δlogit| <= 1e-4;
- fp16: max |Δlogit| <= 1e-2, on CUDA only; without CUDA the variant is "unverified";
- int8, int8-static, bf16: label agreement >= 99.5% and accuracy drop <= 1.0 point on labelled
  data; without labelled data they are "unverified" (no logit tolerance means anything
  for int8).

:func:`check_variant` records a failure as the variant's parity block with status "fail" (never
served); ``ferry export`` and ``ferry parity`` (export/verify.py) run every variant through it
with :func:`run_parity`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtime.artifact import FAIL, PASS, UNVERIFIED, VARIANTS, VariantSpec
from runtime.engines import softmax
from runtime.hardware import physical_cores as default_threads
from export.inputs import encode, pad_id, random_ids, read_jsonl_texts
from runtime.tokens import collate
from ferry.config import non_negative, opt, positive
from ferry.errors import DataError, ParityError, first_line
from ferry.tables import fmt, text_table

HELDOUT_BATCH = 32
INVARIANCE_TEXTS = 32
# Batch invariance is a property of the kernels and the padding, not of the text length: the
# held-out texts are cut at this many tokens for it (a 512-token pass of 96 texts per variant
# cost the demo's export about 10 s a variant on 2 cores).
INVARIANCE_TOKENS = 128

Progress = Callable[[Any, str], Any]
"""Wraps an iterable of batches with a description (a progress bar), or returns it as is."""


def _unit_interval(value: Any) -> str | None:
    return None if value is None or 0 <= value <= 1 else "must be in [0, 1]"


@dataclasses.dataclass(frozen=True)
class Gates:
    """The limits a variant is judged by."""

    fp32_max_diff: float
    """fp32 variants: largest allowed max |logit difference| to PyTorch."""
    fp16_max_diff: float
    """fp16 variants: the same, checked on CUDA only."""
    int8_min_agreement: float
    """int8 and bf16 variants: least fraction of labels equal to PyTorch's."""
    int8_max_drop: float
    """int8 and bf16 variants: largest accuracy drop from PyTorch, in points."""
    invariance_tol: float
    """Batch-invariant when no label flips and max |probability difference| is at most this."""

    def for_precision(self, precision: str) -> dict[str, float]:
        """fp32 and fp16 are judged by logits; int8 and bf16 (whose logits move by design) by labels and accuracy."""
        if precision == "fp32":
            return {"max_abs_diff": self.fp32_max_diff}
        if precision == "fp16":
            return {"max_abs_diff": self.fp16_max_diff}
        return {"min_agreement": self.int8_min_agreement, "max_accuracy_drop_points": self.int8_max_drop}


@dataclasses.dataclass
class GateArgs:
    """Parity gates and inputs, shared by `ferry export` and `ferry parity`."""

    fp32_max_diff: float = opt(1e-4, "fp32 gate: largest allowed max |logit difference| to PyTorch", check=non_negative)
    fp16_max_diff: float = opt(1e-2, "fp16 gate (CUDA only): largest allowed max |logit difference|", check=non_negative)
    int8_min_agreement: float = opt(0.995, "int8 and bf16 gates: least fraction of labels equal to PyTorch's", check=_unit_interval)
    int8_max_drop: float = opt(1.0, "int8 and bf16 gates: largest accuracy drop from PyTorch, in points", check=non_negative)
    invariance_tol: float = opt(1e-5, "batch-invariant when no label flips and max |probability difference| <= this", check=non_negative)
    parity_batch_sizes: list[int] = opt([1, 4, 16], "batch sizes of the random-token inputs", check=lambda v: None if all(x > 0 for x in v) else "must be > 0")
    parity_seq_lengths: list[int] = opt([8, 32, 128], "sequence lengths of the random-token inputs (capped at the model's)", check=lambda v: None if all(x > 1 for x in v) else "must be > 1")
    parity_max_examples: int = opt(2000, "held-out examples compared at most (0: all)", check=non_negative)
    threads: int | None = opt(None, "CPU threads for PyTorch and ONNX Runtime (default: the physical cores)", check=positive)
    seed: int = opt(0, "seed of the random-token inputs")
    quiet: bool = opt(False, "no progress bars")

    def gates(self) -> Gates:
        """The gates these options set."""
        return Gates(self.fp32_max_diff, self.fp16_max_diff, self.int8_min_agreement, self.int8_max_drop, self.invariance_tol)


@dataclasses.dataclass
class Labelled:
    """Texts with label ids, and where they came from."""

    texts: list[str]
    label_ids: list[int]
    source: str


# ---------------------------------------------------------------- the errors


class VariantFailed(ParityError):
    """A variant computes something else than PyTorch: every failure found (not only the first),
    and its parity block as recorded in the manifest (status "fail", the failures as its reason)."""

    def __init__(self, variant: str, failures: Sequence[str], block: dict[str, Any]):
        self.variant = variant
        self.failures = list(failures)
        self.block = {**block, "status": FAIL, "reason": "; ".join(self.failures)}
        super().__init__(f"{variant}: {self.block['reason']}")


class OutputMismatch(VariantFailed):
    """Outputs or inputs not named, or outputs not shaped, like PyTorch's (optimum's OutputMatchError
    and ShapeError): no value was judged."""

    def __init__(self, variant: str, failures: Sequence[str], block: dict[str, Any]):
        super().__init__(variant, failures, block)
        self.block.update(checks={"outputs": self.block["reason"]}, batch_invariance=None)


class ValueMismatch(VariantFailed):
    """Values beyond the variant's gates (optimum's AtolError): the block holds every measurement."""


class EngineFailed(VariantFailed):
    """The engine raised while running the variant (a kernel that fails on this model)."""

    def __init__(self, variant: str, failures: Sequence[str], block: dict[str, Any]):
        super().__init__(variant, failures, block)
        self.block["batch_invariance"] = None


# ---------------------------------------------------------------- running the models


def use_threads(threads: int | None) -> int:
    """Run PyTorch on ``threads`` CPU threads (default: the physical cores); returns that count."""
    import torch

    count = threads or default_threads()
    torch.set_num_threads(count)
    return count


def torch_logits(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out.logits.float().numpy()


def shape_problem(logits: np.ndarray, batch: int, num_labels: int) -> str | None:
    """What is wrong with the shape of a batch's ``logits``, or None."""
    if logits.shape != (batch, num_labels):
        return f"logits shape {tuple(logits.shape)}, PyTorch's is {(batch, num_labels)}"
    return None


def name_problems(engine: Any, feed_names: Sequence[str]) -> list[str]:
    """The output and input names of ``engine`` that do not fit the parity feeds (validate_model_outputs' first check)."""
    problems = []
    if "logits" not in engine.output_names:
        problems.append(f"outputs are {engine.output_names}, expected 'logits'")
    missing = [n for n in engine.input_names if n not in feed_names]
    if missing:
        problems.append(f"the model wants inputs {missing} that the tokenizer does not produce")
    return problems


# ---------------------------------------------------------------- inputs


def usable_length(config: dict[str, Any] | Any, wanted: int) -> int:
    """``wanted`` capped at the positions the model has (RoBERTa-style models lose two)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    positions = get("max_position_embeddings") or get("n_positions") or wanted
    if get("model_type") in ("roberta", "xlm-roberta", "camembert", "data2vec-text", "longformer", "ibert"):
        positions -= (get("pad_token_id") or 1) + 1
    return max(2, min(int(wanted), int(positions)))


def random_cases(
    tokenizer: Any, vocab_size: int, batch_sizes: Sequence[int], seq_lengths: Sequence[int], max_length: int,
    input_names: Sequence[str], seed: int,
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cases = []
    for s in sorted({min(int(s), max_length) for s in seq_lengths}):
        for b in batch_sizes:
            ids = random_ids(tokenizer, vocab_size, int(b), s, rng)
            cases.append(collate(ids, pad_id(tokenizer), input_names))
    return cases


def text_batches(
    tokenizer: Any, texts: Sequence[str], max_length: int, input_names: Sequence[str], batch_size: int = HELDOUT_BATCH
) -> tuple[list[dict[str, np.ndarray]], list[list[int]]]:
    """Length-sorted right-padded batches of ``texts`` and the text indices of each batch."""
    ids = encode(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    index = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([ids[i] for i in ix], pad_id(tokenizer), input_names) for ix in index], index


def load_labelled_data(
    labels: Sequence[str], heldout: Path | None, data: str | None, text_column: str, label_column: str, max_examples: int
) -> Labelled | None:
    """The labelled texts parity measures accuracy on: ``--data`` or the checkpoint's held-out split."""
    if data:
        from finetune.data import load_labelled

        ex = load_labelled(data, text_column, label_column, decode_errors="replace", flag="--data", quiet=True)
        texts, names, source = ex.texts, ex.labels, str(data)
    elif heldout is not None:
        texts, names = read_jsonl_texts(heldout)
        source = str(heldout)
    else:
        return None
    known = {label: i for i, label in enumerate(labels)}
    unknown = sorted({y for y in names if y not in known})
    if unknown:
        raise DataError(f"{source}: label '{unknown[0]}' is not one of the model's labels ({', '.join(labels)})")
    if max_examples and len(texts) > max_examples:
        texts, names = texts[:max_examples], names[:max_examples]
    if not texts:
        return None
    return Labelled(list(texts), [known[y] for y in names], source)


# ---------------------------------------------------------------- the reference and the checks


@dataclasses.dataclass
class Reference:
    """PyTorch's logits on every parity input, computed once for all variants."""

    cases: list[dict[str, np.ndarray]]
    case_logits: list[np.ndarray]
    batches: list[dict[str, np.ndarray]]
    batch_index: list[list[int]]
    labelled: Labelled | None
    logits: np.ndarray | None  # held-out logits in text order
    invariance_texts: list[Any]  # the inputs used for batch invariance (token ids, or one image's pixels)
    num_labels: int
    labels: list[str]
    pad: int
    input_names: list[str]
    # Feeds of a batch of invariance inputs: the one task-specific seam (text pads token ids,
    # images stack pixel arrays); None means the text collation.
    batch_of: Callable[[list[Any]], dict[str, np.ndarray]] | None = None

    def collate(self, items: list[Any]) -> dict[str, np.ndarray]:
        if self.batch_of is not None:
            return self.batch_of(items)
        return collate(items, self.pad, self.input_names)


def build_reference(
    model: Any, tokenizer: Any, labels: Sequence[str], labelled: Labelled | None, max_length: int,
    input_names: Sequence[str], *, batch_sizes: Sequence[int], seq_lengths: Sequence[int], seed: int,
    progress: Progress | None = None, heldout_logits: np.ndarray | None = None,
) -> Reference:
    """PyTorch's logits on the random token cases (``batch_sizes`` x ``seq_lengths``, drawn from
    ``seed``) and the held-out texts (``heldout_logits``: already computed by the caller in
    :func:`text_batches` order, e.g. an ensemble's one member pass)."""
    vocab = int(getattr(model.config, "vocab_size", len(tokenizer)))
    cases = random_cases(tokenizer, vocab, batch_sizes, seq_lengths, max_length, input_names, seed)
    wrap = progress or (lambda it, desc: it)
    case_logits = [torch_logits(model, c) for c in wrap(cases, "PyTorch, random tokens")]
    batches, index, logits = [], [], None
    if labelled is not None:
        batches, index = text_batches(tokenizer, labelled.texts, max_length, input_names)
        logits = heldout_logits
        if logits is None:
            logits = np.zeros((len(labelled.texts), len(labels)), dtype=np.float32)
            for feeds, ix in zip(wrap(batches, "PyTorch, held-out"), index):
                logits[ix] = torch_logits(model, feeds)
        inv_ids = encode(tokenizer, labelled.texts[:INVARIANCE_TEXTS], min(max_length, INVARIANCE_TOKENS))
    else:
        rng = np.random.default_rng(seed + 1)
        inv_ids = random_ids(tokenizer, vocab, INVARIANCE_TEXTS, min(64, max_length), rng)
    return Reference(
        cases, case_logits, batches, index, labelled, logits, inv_ids, len(labels), list(labels), pad_id(tokenizer),
        list(input_names),
    )


def batch_invariance(run: Callable[[dict[str, np.ndarray]], np.ndarray], ref: Reference, tol: float, seed: int) -> dict[str, Any]:
    """Each text alone, then inside mixed batches (shuffled, padded to the longest of the batch).

    Invariant when no label flips and max |Δprobability| <= ``tol``.
    """
    ids = ref.invariance_texts
    alone = np.concatenate([softmax(run(ref.collate([x]))) for x in ids])
    rng = np.random.default_rng(seed)
    worst, flips, compared = 0.0, 0, 0
    for size in (8, len(ids)):
        order = rng.permutation(len(ids))
        for start in range(0, len(ids), size):
            ix = order[start : start + size]
            probs = softmax(run(ref.collate([ids[i] for i in ix])))
            worst = max(worst, float(np.abs(probs - alone[ix]).max()))
            flips += int((probs.argmax(-1) != alone[ix].argmax(-1)).sum())
            compared += len(ix)
    flip_rate = flips / compared if compared else 0.0
    return {
        "texts": len(ids),
        "batch_sizes": [1, 8, len(ids)],
        "max_abs_prob_diff": worst,
        "flip_rate": flip_rate,
        "tolerance": tol,
        "invariant": flips == 0 and worst <= tol,
    }


def spec_of(name: str, path: Path) -> VariantSpec:
    """The engine and precision of variant ``name`` (an unknown name: ONNX Runtime fp32)."""
    return VARIANTS.get(name) or VariantSpec(path.name, "onnxruntime", "fp32")


def gate_failures(precision: str, result: dict[str, Any], gates: dict[str, float]) -> list[str] | None:
    """Every gate the measured values miss ([] when they meet them all); None when there is nothing to
    judge an int8 or bf16 variant by (no labelled data)."""
    if precision in ("fp32", "fp16"):
        worst = result["max_abs_diff"]
        return [] if worst <= gates["max_abs_diff"] else [f"max |Δlogit| {worst:.2e} > {gates['max_abs_diff']:g}"]
    held = result.get("heldout")
    if not held:
        return None
    failures = []
    if held["agreement"] < gates["min_agreement"]:
        failures.append(f"label agreement {held['agreement']:.2%} < {gates['min_agreement']:.2%}")
    drop = -held["delta_accuracy_points"]
    if drop > gates["max_accuracy_drop_points"]:
        failures.append(f"accuracy drop {drop:.2f} points > {gates['max_accuracy_drop_points']:g}")
    return failures


def judge(precision: str, result: dict[str, Any], gates: dict[str, float]) -> tuple[str, str]:
    """(status, reason) from the measured values and the gates."""
    failures = gate_failures(precision, result, gates)
    if failures is None:
        return UNVERIFIED, "no labelled data to judge int8 by; pass --data FILE"
    if failures:
        return FAIL, "; ".join(failures)
    if precision in ("fp32", "fp16"):
        return PASS, f"max |Δlogit| {result['max_abs_diff']:.2e} <= {gates['max_abs_diff']:g}"
    held = result["heldout"]
    return PASS, f"agreement {held['agreement']:.2%}, accuracy Δ {held['delta_accuracy_points']:+.2f} points"


def open_for_parity(
    name: str, path: Path, spec: VariantSpec, threads: int | None, device: str, available: Sequence[str] | None, cpu: Any,
) -> tuple[Any, str | None]:
    """(engine, None), or (None, why the variant cannot be checked here)."""
    from runtime.engines import CUDA, TENSORRT, EngineUnavailable, available_providers, gpu_present, open_engine

    available_is_real = available is None  # a list passed in fakes the providers (tests)
    available = available_providers() if available is None else list(available)
    tensorrt = name.endswith("-tensorrt")
    if spec.device == "cuda":
        wanted = TENSORRT if tensorrt else CUDA
        if wanted not in available or device == "cpu" or (available_is_real and not gpu_present()):
            return None, f"{spec.precision} is checked on {wanted}, and no GPU is usable here"
        try:
            engine = open_engine(path, spec.engine, spec.precision, "cuda", threads, available=available, tensorrt=tensorrt)
        except EngineUnavailable as e:
            return None, str(e)
        if engine.provider not in (CUDA, TENSORRT):
            return None, "ONNX Runtime fell back to CPU: no usable GPU"
        return engine, None
    if spec.precision == "bf16" and not cpu.has("bf16"):
        return None, (f"this CPU ({cpu.model}) has no bf16 instructions (avx512_bf16, amx_bf16), where OpenVINO would run "
                      "it in f32; ferry serve re-checks it on a CPU that has them")
    try:
        engine = open_engine(path, spec.engine, spec.precision, "cpu", threads or default_threads(), available=available)
    except EngineUnavailable as e:
        return None, str(e)
    if spec.precision == "bf16" and "bf16" not in str(getattr(engine, "inference_precision", "bf16")):
        return None, f"OpenVINO runs it in {engine.inference_precision} on this CPU, not bf16"
    return engine, None


def compare(name: str, run: Callable[[dict[str, np.ndarray]], np.ndarray], ref: Reference,
            progress: Progress | None) -> tuple[dict[str, Any], list[str]]:
    """Run every parity input: (the measurements, every distinct logits shape unlike PyTorch's).

    The values of a batch whose shape is wrong are not compared (optimum's order: shapes, then values).
    """
    wrap = progress or (lambda it, desc: it)
    wrong: list[str] = []
    diffs, agree, total = [], 0, 0
    for feeds, want in zip(wrap(ref.cases, f"{name}, random tokens"), ref.case_logits):
        got = run(feeds)
        problem = shape_problem(got, len(want), ref.num_labels)
        if problem:
            wrong.append(problem)
            continue
        diffs.append(np.abs(got - want).ravel())
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(want)
    held = None
    if ref.labelled is not None and ref.logits is not None:
        held = np.zeros_like(ref.logits)
        for feeds, ix in zip(wrap(ref.batches, f"{name}, held-out"), ref.batch_index):
            got = run(feeds)
            problem = shape_problem(got, len(ix), ref.num_labels)
            if problem:
                wrong.append(problem)
            else:
                held[ix] = got
    if wrong:
        return {}, list(dict.fromkeys(wrong))
    rand = np.concatenate(diffs)
    measured: dict[str, Any] = {"checks": {"output_names": "ok", "shapes": "ok"}}
    measured["random"] = {
        "cases": [list(next(iter(c.values())).shape) for c in ref.cases],
        "max_abs_diff": float(rand.max()),
        "mean_abs_diff": float(rand.mean()),
        "agreement": agree / total,
    }
    worst, mean_parts = float(rand.max()), [rand]
    if held is not None:
        measured["heldout"] = heldout_metrics(ref, held)
        diff = np.abs(held - ref.logits)
        worst = max(worst, float(diff.max()))
        mean_parts.append(diff.ravel())
    measured["max_abs_diff"] = worst
    measured["mean_abs_diff"] = float(np.concatenate(mean_parts).mean())
    return measured, []


def validate(
    name: str, path: Path, ref: Reference, gates: Gates, *, threads: int | None = None, seed: int = 0,
    device: str = "auto", available: Sequence[str] | None = None, progress: Progress | None = None, cpu: Any = None,
) -> dict[str, Any]:
    """Parity of one variant (its file in its engine at its precision) against ``ref``, after optimum's
    ``_run_validation``: the output and input names, then the shapes and the values on every input,
    then batch invariance (shuffled with ``seed``).

    Args:
        threads: the engine's CPU threads (default: the physical cores).
        device: "cpu" never checks a CUDA variant; "auto" checks it where a GPU is usable.
        available: the execution providers to assume (tests fake them); default: ONNX Runtime's.
        cpu: the CPU to assume (:func:`runtime.hardware.read_cpu`'s by default).

    Returns:
        The variant's parity block: status "pass", or "unverified" with the reason it cannot be
        checked here (no GPU for fp16, no labelled data for int8, ...).

    Raises:
        OutputMismatch: names that do not fit, or every distinct wrong shape.
        ValueMismatch: every gate the values miss.
        EngineFailed: the engine raised on this model.
    """
    from runtime.hardware import read_cpu

    spec = spec_of(name, path)
    limits = gates.for_precision(spec.precision)
    block: dict[str, Any] = {"gates": limits, "engine": spec.engine}
    engine, why_not = open_for_parity(name, path, spec, threads, device, available, cpu or read_cpu())
    if engine is None:
        block.update(status=UNVERIFIED, reason=why_not, provider=None, batch_invariance=None)
        return block
    block["provider"] = engine.provider
    names = name_problems(engine, list(ref.cases[0]) if ref.cases else ref.input_names)
    if names:
        raise OutputMismatch(name, names, block)

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return engine.run({n: feeds[n] for n in engine.input_names})

    def checked_run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        logits = run(feeds)
        problem = shape_problem(logits, len(next(iter(feeds.values()))), ref.num_labels)
        if problem:
            raise OutputMismatch(name, [problem], block)
        return logits

    try:
        measured, wrong_shapes = compare(name, run, ref, progress)
        if wrong_shapes:
            raise OutputMismatch(name, wrong_shapes, block)
        block.update(measured)
        block["batch_invariance"] = batch_invariance(checked_run, ref, gates.invariance_tol, seed)
    except VariantFailed:
        raise
    except Exception as e:  # the engines raise their own types when a kernel fails on this model
        raise EngineFailed(name, [f"{spec.engine} failed: {first_line(e)}"], block) from e
    failures = gate_failures(spec.precision, block, limits)
    if failures:
        raise ValueMismatch(name, failures, block)
    block["status"], block["reason"] = judge(spec.precision, block, limits)
    return block


def check_variant(
    name: str, path: Path, ref: Reference, gates: Gates, *, threads: int | None = None, seed: int = 0,
    device: str = "auto", available: Sequence[str] | None = None, progress: Progress | None = None, cpu: Any = None,
) -> dict[str, Any]:
    """The parity block of one variant, a failure recorded in it (status "fail"): :func:`validate`'s
    block, or the :class:`VariantFailed` block it raised."""
    try:
        return validate(name, path, ref, gates, threads=threads, seed=seed, device=device, available=available,
                        progress=progress, cpu=cpu)
    except VariantFailed as e:
        return e.block


def heldout_metrics(ref: Reference, got: np.ndarray) -> dict[str, Any]:
    from finetune.metrics import classification_report

    assert ref.labelled is not None and ref.logits is not None
    y = ref.labelled.label_ids
    want_pred, got_pred = ref.logits.argmax(-1), got.argmax(-1)
    pt = classification_report(y, want_pred.tolist(), ref.labels)
    ox = classification_report(y, got_pred.tolist(), ref.labels)
    diff = np.abs(got - ref.logits)
    return {
        "source": ref.labelled.source,
        "examples": len(y),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "agreement": float((want_pred == got_pred).mean()),
        "pytorch": {"accuracy": pt["accuracy"], "macro_f1": pt["macro_f1"]},
        "onnx": {"accuracy": ox["accuracy"], "macro_f1": ox["macro_f1"]},
        "delta_accuracy_points": 100 * (ox["accuracy"] - pt["accuracy"]),
        "delta_macro_f1_points": 100 * (ox["macro_f1"] - pt["macro_f1"]),
    }


def run_parity(
    variants: dict[str, Path], ref: Reference, gates: Gates, *, threads: int | None = None, seed: int = 0,
    device: str = "auto", progress: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """The parity block of each variant (``{name: path}``) against one reference (PyTorch computed once)."""
    return {
        name: check_variant(name, path, ref, gates, threads=threads, seed=seed, device=device, progress=progress)
        for name, path in variants.items()
    }


def progress_bar(items: Any, desc: str) -> Any:
    """A :data:`Progress` on stderr (tqdm), for four batches or more."""
    from tqdm.auto import tqdm

    items = list(items)
    return tqdm(items, desc=f"parity: {desc}", unit="batch", leave=False, file=sys.stderr, disable=len(items) < 4)


# ---------------------------------------------------------------- the table


def parity_rows(variants: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, info in variants.items():
        parity = info.get("parity") or {}
        held = parity.get("heldout") or {}
        inv = parity.get("batch_invariance") or {}
        rows.append([
            name,
            info.get("precision", VARIANTS[name].precision if name in VARIANTS else ""),
            fmt(info.get("bytes") and info["bytes"] / 1e6, ".1f"),
            fmt(held.get("onnx", {}).get("accuracy"), ".4f"),
            fmt(held.get("delta_accuracy_points"), "+.2f"),
            fmt(held.get("agreement"), ".2%"),
            fmt(parity.get("max_abs_diff"), ".1e"),
            "-" if not inv else ("yes" if inv.get("invariant") else f"no ({inv.get('max_abs_prob_diff', 0):.0e})"),
            str(info.get("status", parity.get("status", UNVERIFIED))),
        ])
    return rows


PARITY_HEADERS = ["variant", "precision", "MB", "accuracy", "Δacc pts", "agreement", "max|Δlogit|", "batch-invariant", "status"]


def parity_table(variants: dict[str, dict[str, Any]], pytorch_accuracy: float | None = None) -> str:
    head = f"PyTorch accuracy {pytorch_accuracy:.4f}\n" if pytorch_accuracy is not None else ""
    return head + text_table(PARITY_HEADERS, parity_rows(variants))


def pytorch_accuracy(variants: dict[str, dict[str, Any]]) -> float | None:
    for info in variants.values():
        held = (info.get("parity") or {}).get("heldout")
        if held:
            return held["pytorch"]["accuracy"]
    return None


# ---------------------------------------------------------------- `ferry parity`


def load_source(checkpoint: str | Path, flag: str, tokenizer: bool = True) -> tuple[Any, Any, Any]:
    """(Checkpoint, PyTorch model in eval mode, tokenizer or None) of a checkpoint directory."""
    from finetune.checkpoint import check_valid_checkpoint_dir, load_model, load_tokenizer

    ckpt = check_valid_checkpoint_dir(checkpoint, flag)
    model = load_model(ckpt)
    model.eval()
    return ckpt, model, load_tokenizer(ckpt.path) if tokenizer else None



"""Which variant to serve on this machine: the fastest one that passes its gate here.

A parity verdict holds for the kernels it ran on, and kernels differ between CPUs (ONNX
Runtime's int8 path follows the ISA; OpenVINO's bf16 needs AVX512-BF16 or AMX). So at start:

1. the candidates are the artifact's CPU variants that passed their gate at export and are
   batch-invariant, whose engine is installed and whose precision this CPU has (a bf16
   variant that the export machine could not check is a candidate where the CPU has bf16);
2. each is opened (a variant that does not compile here is dropped, and the log says why)
   and timed on the artifact's own reference texts: a batch of :data:`PROBE_BATCH` and one
   text alone, ranked by the sum of both times relative to the fastest;
3. the fastest is re-checked against the reference logits PyTorch gave at export (the
   artifact's ``reference.jsonl``) with the export's gates, plus a batch-invariance probe;
   one that fails here is not served, and the next is checked;
4. all of it within :data:`BUDGET_S` seconds: timing stops when its share of the budget is
   spent (the variants timed so far compete), and a re-check still running at the end of
   the budget decides on the reference texts it has checked, and says how many.

No PyTorch here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable, Sequence

import numpy as np

from ferry.errors import ArtifactError
from runtime.artifact import FAIL, PASS, UNVERIFIED, Artifact
from runtime.engines import softmax

BUDGET_S = 15.0
PROBE_BATCH = 8
PROBE_RUNS = 3
RECHECK_BATCH = 32
INVARIANCE_PROBE = 8
# Share of the budget that timing may use; the rest is kept for the re-checks.
TIMING_SHARE = 0.6
DEFAULT_GATES = {"fp32": {"max_abs_diff": 1e-4}, "fp16": {"max_abs_diff": 1e-2}}
LABEL_GATES = {"min_agreement": 0.995}


@dataclasses.dataclass
class Reference:
    """PyTorch's logits on held-out texts (token ids), stored in the artifact at export."""

    ids: list[list[int]]
    logits: np.ndarray
    source: str


def load_reference(artifact: Artifact) -> Reference | None:
    """The artifact's reference texts and logits, checked against the manifest's sha256
    (None for an artifact exported before ferry kept them)."""
    entry = artifact.manifest.get("reference")
    if not entry:
        return None
    path = artifact.path / str(entry.get("file"))
    if not path.is_file():
        raise ArtifactError(f"{path}: the reference file named in ferry.json is missing; re-export the checkpoint")
    data = artifact.read_verified(str(entry.get("file")))  # read once: what is checked is what is parsed
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ArtifactError(f"{path}: sha256 does not match the manifest; the file was modified, re-export the checkpoint")
    ids, logits = [], []
    try:
        for line in data.decode("utf-8").splitlines():
            row = json.loads(line)
            ids.append([int(i) for i in row["input_ids"]])
            logits.append([float(x) for x in row["logits"]])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: not a ferry reference file ({type(e).__name__}: {e})") from None
    if not ids:
        return None
    return Reference(ids, np.asarray(logits, dtype=np.float32), str(entry.get("source", "")))


def candidates(artifact: Artifact, cpu: Any, installed: Callable[[str], bool]) -> tuple[list[str], dict[str, str]]:
    """(the CPU variants that may be served here, {skipped variant: why})."""
    names, skipped = [], {}
    for name, v in artifact.variants.items():
        spec = v.spec
        reason = None
        if spec.device != "cpu":
            reason = f"runs on {spec.device}"
        elif v.status == FAIL:
            reason = f"failed its parity gate at export ({(v.info.get('parity') or {}).get('reason', '')})"
        elif v.info.get("batch_invariant") is False:
            reason = "not batch-invariant: its answers depend on the rest of the batch"
        elif spec.precision == "bf16" and not cpu.has("bf16"):
            reason = "this CPU has no bf16 instructions (avx512_bf16, amx_bf16)"
        elif v.status == UNVERIFIED and spec.precision != "bf16":
            reason = "its parity was not measured at export"
        elif not installed(spec.engine):
            reason = f"the {spec.engine} package is not installed"
        if reason:
            skipped[name] = reason
        else:
            names.append(name)
    return names, skipped


def gates_of(variant: Any) -> dict[str, float]:
    """The gates the export judged ``variant`` by (its parity block), else ferry's defaults."""
    gates = (variant.info.get("parity") or {}).get("gates")
    if gates:
        return dict(gates)
    return dict(DEFAULT_GATES.get(variant.spec.precision, LABEL_GATES))


def batches(ids: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Indices of ``ids`` in length-sorted groups of ``size`` (little padding)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def hardest_first(ref: Reference, size: int) -> list[list[int]]:
    """Indices of the reference texts in groups of ``size``, the texts PyTorch was least sure of
    (smallest margin between its two best logits) first: the ones a variant flips, if any. A
    re-check cut short by the start-up budget has then checked those, not an arbitrary sample."""
    top2 = np.sort(ref.logits, axis=-1)[:, -2:] if ref.logits.shape[-1] > 1 else np.zeros((len(ref.ids), 2))
    order = [int(i) for i in np.argsort(top2[:, 1] - top2[:, 0], kind="stable")]
    return [order[i : i + size] for i in range(0, len(order), size)]



def recheck(
    run: Callable[[list[list[int]]], np.ndarray], ref: Reference, gates: dict[str, float], tol: float = 1e-5,
    deadline: float | None = None, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """This machine's verdict on a variant: its logits on the reference ids against PyTorch's,
    judged by the export's gates, plus one batch-invariance probe (texts alone vs together).

    Past ``deadline`` (a ``clock`` value) the texts checked so far decide, and the verdict says
    how many: on a loaded machine the start-up stays bounded, with a smaller sample."""
    got = np.zeros_like(ref.logits)
    done: list[int] = []
    for ix in hardest_first(ref, RECHECK_BATCH):
        if done and deadline is not None and clock() > deadline:
            break
        got[ix] = run([ref.ids[i] for i in ix])
        done += ix
    want, got = ref.logits[done], got[done]
    diff = float(np.abs(got - want).max())
    agreement = float((got.argmax(-1) == want.argmax(-1)).mean())
    probe = list(range(min(INVARIANCE_PROBE, len(ref.ids))))
    alone = np.concatenate([softmax(run([ref.ids[i]])) for i in probe])
    together = softmax(run([ref.ids[i] for i in probe]))
    inv_diff = float(np.abs(alone - together).max())
    invariant = bool((alone.argmax(-1) == together.argmax(-1)).all() and inv_diff <= tol)
    out: dict[str, Any] = {"texts": len(done), "of": len(ref.ids), "max_abs_diff": diff, "agreement": agreement,
                           "batch_invariance_max_abs_prob_diff": inv_diff, "batch_invariant": invariant}
    problems = []
    if "max_abs_diff" in gates and diff > gates["max_abs_diff"]:
        problems.append(f"max |Δlogit| {diff:.2e} > {gates['max_abs_diff']:g}")
    if "min_agreement" in gates and agreement < gates["min_agreement"]:
        problems.append(f"label agreement {agreement:.2%} < {gates['min_agreement']:.2%}")
    if not invariant:
        problems.append(f"answers change with the batch (max |Δprobability| {inv_diff:.1e})")
    out["status"] = FAIL if problems else PASS
    sample = f"{len(done)} reference texts" + ("" if len(done) == len(ref.ids) else f" of {len(ref.ids)} (start-up budget)")
    out["reason"] = "; ".join(problems + [f"on {sample}"]) if problems else (
        f"max |Δlogit| {diff:.2e}, agreement {agreement:.2%} on {sample}")
    return out


def time_variant(run: Callable[[list[list[int]]], np.ndarray], ref: Reference, clock: Callable[[], float]) -> dict[str, float]:
    """Median milliseconds of a batch of :data:`PROBE_BATCH` reference texts and of one text alone."""
    batch = [ref.ids[i] for i in batches(ref.ids, PROBE_BATCH)[0]]
    one = [batch[0]]
    out = {}
    for key, feed in (("batch_ms", batch), ("one_ms", one)):
        run(feed)  # warm-up: first-run allocations and kernel selection
        times = []
        for _ in range(PROBE_RUNS):
            t0 = clock()
            run(feed)
            times.append(1000 * (clock() - t0))
        out[key] = float(np.median(times))
    return out


@dataclasses.dataclass
class Choice:
    """The variant chosen at start, and what was measured to choose it."""

    variant: str | None
    rule: str
    timings: dict[str, dict[str, float]]
    local: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    seconds: float
    engines: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "rule": self.rule, "timings_ms": self.timings, "local_parity": self.local,
                "skipped": self.skipped, "seconds": round(self.seconds, 2), "budget_s": BUDGET_S}

    def log_lines(self) -> list[str]:
        lines = [f"variant choice: {self.variant} ({self.rule}; {self.seconds:.1f}s)"]
        for name, t in self.timings.items():
            verdict = self.local.get(name)
            local = f", here: {verdict['status']} ({verdict['reason']})" if verdict else ""
            lines.append(f"  {name}: batch of {PROBE_BATCH} {t['batch_ms']:.1f} ms, one text {t['one_ms']:.1f} ms{local}")
        for name, why in self.skipped.items():
            lines.append(f"  {name}: not a candidate: {why}")
        return lines


def rank(timings: dict[str, dict[str, float]]) -> list[str]:
    """Fastest first: each variant's batch and single-text times, each relative to the fastest, summed."""
    if not timings:
        return []
    best_batch = min(t["batch_ms"] for t in timings.values()) or 1e-9
    best_one = min(t["one_ms"] for t in timings.values()) or 1e-9
    return sorted(timings, key=lambda n: timings[n]["batch_ms"] / best_batch + timings[n]["one_ms"] / best_one)


def choose(
    artifact: Artifact,
    names: list[str],
    skipped: dict[str, str],
    open_variant: Callable[[str], Any],
    run_ids: Callable[[Any, list[list[int]]], np.ndarray],
    reference: Reference | None,
    fallback: str | None,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> Choice:
    """Time the candidates ``names`` and re-check the fastest here; see the module docstring.

    Args:
        open_variant: opens a variant by name, returning its engine (raises ArtifactError,
            e.g. EngineUnavailable, when it cannot here: the variant is skipped with the reason).
        run_ids: (engine, token id lists) -> logits.
        fallback: what to serve when no candidate passes here (the export-time default).
    """
    start = clock()
    skipped = dict(skipped)
    timings: dict[str, dict[str, float]] = {}
    engines: dict[str, Any] = {}
    if reference is None:
        rule = "the artifact's export-time default: it has no reference logits to re-check variants against here"
        return Choice(fallback, rule, {}, {}, skipped, clock() - start)
    for name in names:
        if timings and clock() - start > budget_s * TIMING_SHARE:
            skipped[name] = f"not timed: the {budget_s:g}s start-up budget was spent"
            continue
        try:
            engine = open_variant(name)
        except ArtifactError as e:
            skipped[name] = f"cannot run here: {e}"
            continue
        engines[name] = engine
        timings[name] = time_variant(lambda ids, e=engine: run_ids(e, ids), reference, clock)
    local: dict[str, dict[str, Any]] = {}
    chosen = None
    for name in rank(timings):
        if local and clock() - start > budget_s:
            skipped[name] = f"not re-checked: the {budget_s:g}s start-up budget was spent"
            continue
        verdict = recheck(lambda ids, e=engines[name]: run_ids(e, ids), reference, gates_of(artifact.variants[name]),
                          deadline=start + budget_s, clock=clock)
        local[name] = verdict
        if verdict["status"] == PASS:
            chosen = name
            break
    if chosen is None:
        safe = [n for n in dict.fromkeys([fallback, "fp32"]) if n in artifact.variants and n not in local
                and artifact.variants[n].status == PASS]
        if not safe:
            why = "; ".join(f"{n}: {v['reason']}" for n, v in local.items()) or "no candidate"
            raise ArtifactError(f"{artifact.path}: no variant passes its gate on this machine ({why}); re-export here")
        rule = f"no candidate passed here: {safe[0]}, the export-time default"
        return Choice(safe[0], rule, timings, local, skipped, clock() - start)
    rule = f"the fastest of {len(timings)} timed candidates that passed its gate on this machine"
    return Choice(chosen, rule, timings, local, skipped, clock() - start, {chosen: engines[chosen]})

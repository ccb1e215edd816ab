"""The start-up choice of the served variant: candidates per CPU, timing within the budget,
the re-check on this machine against the artifact's reference logits, and the overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferry.errors import ArtifactError
from runtime import choose as ch
from runtime.artifact import check_valid_artifact_dir
from runtime.engines import EngineUnavailable
from runtime.hardware import Cpu
from runtime.predictor import Runtime
from tests.artifacts import copy_artifact, write_manifest

AVX2 = Cpu("AMD EPYC", "x86_64", frozenset({"avx2"}))
AMX = Cpu("Intel Xeon", "x86_64", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"}))


@pytest.fixture
def artifact(served_artifact, tmp_path):
    """The served artifact plus OpenVINO variants declared on its files (bf16 unverified, as on an AVX2 exporter)."""
    art, m = copy_artifact(served_artifact, tmp_path / "art")
    fp32 = m["variants"]["fp32"]
    m["variants"]["openvino-fp32"] = {**fp32, "engine": "openvino", "provider": "OpenVINO CPU"}
    m["variants"]["openvino-bf16"] = {**fp32, "engine": "openvino", "precision": "bf16", "status": "unverified",
                                      "batch_invariant": None, "parity": {"reason": "no bf16 here"}}
    write_manifest(art, m)
    return check_valid_artifact_dir(art)


def test_candidates_follow_the_cpu_and_the_installed_engines(artifact):
    names, skipped = ch.candidates(artifact, AVX2, lambda engine: True)
    assert names == ["fp32", "int8-static", "openvino-fp32"]
    assert "batch-invariant" in skipped["int8"] and "no bf16 instructions" in skipped["openvino-bf16"]
    names, skipped = ch.candidates(artifact, AMX, lambda engine: True)
    assert names == ["fp32", "int8-static", "openvino-fp32", "openvino-bf16"]  # re-checked here, where bf16 runs
    names, skipped = ch.candidates(artifact, AMX, lambda engine: engine != "openvino")
    assert names == ["fp32", "int8-static"] and skipped["openvino-fp32"] == "the openvino package is not installed"


class FakeEngine:
    """Logits = the reference's + ``noise``; each run advances the fake clock by ``ms`` per text."""

    def __init__(self, ref, clock, ms, noise=0.0):
        self.ref, self.clock, self.ms, self.noise = ref, clock, ms, noise
        self.index = {tuple(ids): i for i, ids in enumerate(ref.ids)}

    def run_ids(self, ids):
        self.clock.t += self.ms * len(ids) / 1000
        rows = np.stack([self.ref.logits[self.index[tuple(x)]] for x in ids])
        return rows + self.noise * np.sin(np.arange(rows.size)).reshape(rows.shape) * 50


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def fake_reference(n=40, labels=3):
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(5, 100, size=int(rng.integers(4, 30)))) for _ in range(n)]
    return ch.Reference([list(map(int, x)) for x in ids], rng.normal(size=(n, labels)).astype(np.float32), "fake")


def choose_with(artifact, engines, ref, budget=ch.BUDGET_S, fail_open=()):
    clock = engines["clock"]

    def open_variant(name):
        if name in fail_open:
            raise EngineUnavailable(f"{name}.onnx: OpenVINO cannot compile it on this CPU (unsupported op)")
        return engines[name]

    names = [n for n in engines if n != "clock"]
    return ch.choose(artifact, names, {}, open_variant, lambda e, ids: e.run_ids(ids), ref, "int8-static", budget, clock)


def test_the_fastest_passing_variant_wins(artifact):
    ref, clock = fake_reference(), Clock()
    engines = {"clock": clock, "fp32": FakeEngine(ref, clock, 10), "int8-static": FakeEngine(ref, clock, 4),
               "openvino-fp32": FakeEngine(ref, clock, 6)}
    c = choose_with(artifact, engines, ref)
    assert c.variant == "int8-static" and list(c.local) == ["int8-static"] and c.local["int8-static"]["status"] == "pass"
    assert ch.rank(c.timings) == ["int8-static", "openvino-fp32", "fp32"]
    assert c.timings["int8-static"]["batch_ms"] == pytest.approx(4 * ch.PROBE_BATCH)
    assert c.engines == {"int8-static": engines["int8-static"]}  # the winner's engine is served, the others dropped
    assert c.seconds <= ch.BUDGET_S and c.as_dict()["variant"] == "int8-static"


def test_a_variant_whose_logits_drift_here_is_not_served(artifact):
    """The fastest drifts past its gate on this machine: refused, the log says why, the next one is served."""
    ref, clock = fake_reference(), Clock()
    engines = {"clock": clock, "fp32": FakeEngine(ref, clock, 10), "int8-static": FakeEngine(ref, clock, 4, noise=1.0)}
    c = choose_with(artifact, engines, ref)
    assert c.variant == "fp32"
    assert c.local["int8-static"]["status"] == "fail" and "label agreement" in c.local["int8-static"]["reason"]
    assert any("int8-static" in line and "fail" in line for line in c.log_lines())


def test_the_choice_is_bounded_in_time(artifact):
    """Slow candidates: timing stops when its share of the budget is spent; the timed ones compete."""
    ref, clock = fake_reference(), Clock()
    engines = {"clock": clock, "fp32": FakeEngine(ref, clock, 400), "openvino-fp32": FakeEngine(ref, clock, 300),
               "int8-static": FakeEngine(ref, clock, 1)}
    c = choose_with(artifact, engines, ref, budget=15)
    assert set(c.timings) == {"fp32"} and "budget" in c.skipped["openvino-fp32"] and "budget" in c.skipped["int8-static"]
    assert c.variant == "fp32"


def test_a_recheck_that_runs_past_the_budget_decides_on_what_it_checked(artifact):
    ref, clock = fake_reference(n=200), Clock()
    engines = {"clock": clock, "fp32": FakeEngine(ref, clock, 100)}  # 3.2 s per batch of 32
    c = choose_with(artifact, engines, ref, budget=15)
    verdict = c.local["fp32"]
    assert c.variant == "fp32" and verdict["status"] == "pass" and verdict["texts"] < verdict["of"] == 200
    assert "(start-up budget)" in verdict["reason"] and clock() < 15 + 3.3 + 1


def test_a_recheck_cut_short_has_checked_the_texts_pytorch_was_least_sure_of():
    """Cut by the budget after one batch, the re-check still meets the one text a variant flips:
    the closest call of PyTorch's, which the re-check takes first."""
    ref, clock = fake_reference(n=200), Clock()
    margin = np.sort(ref.logits, axis=-1)
    closest = int(np.argmin(margin[:, -1] - margin[:, -2]))

    def run(ids):
        clock.t += 1.0
        rows = np.stack([ref.logits[ref.ids.index(list(x))] for x in ids]).copy()
        for row, x in zip(rows, ids):
            if list(x) == ref.ids[closest]:  # swap its two best logits: a flipped label
                best, second = np.argsort(row)[-1], np.argsort(row)[-2]
                row[best], row[second] = row[second], row[best]
        return rows

    verdict = ch.recheck(run, ref, {"min_agreement": 0.995}, deadline=0.5, clock=clock)
    assert verdict["texts"] == ch.RECHECK_BATCH < verdict["of"]
    assert verdict["status"] == "fail" and "label agreement" in verdict["reason"]
    assert [closest] == ch.hardest_first(ref, 1)[0]


def test_a_variant_that_does_not_compile_here_is_skipped_and_named(artifact):
    ref, clock = fake_reference(), Clock()
    engines = {"clock": clock, "fp32": FakeEngine(ref, clock, 10), "openvino-fp32": FakeEngine(ref, clock, 1)}
    c = choose_with(artifact, engines, ref, fail_open=("openvino-fp32",))
    assert c.variant == "fp32" and "cannot compile" in c.skipped["openvino-fp32"]
    assert any("openvino-fp32: not a candidate: cannot run here" in line for line in c.log_lines())


def test_no_passing_candidate_falls_back_or_refuses(artifact):
    ref, clock = fake_reference(), Clock()
    bad = {"clock": clock, "int8-static": FakeEngine(ref, clock, 4, noise=1.0)}
    c = choose_with(artifact, bad, ref)
    assert c.variant == "fp32" and c.rule.startswith("no candidate passed here")
    both = {"clock": clock, "int8-static": FakeEngine(ref, clock, 4, noise=1.0), "fp32": FakeEngine(ref, clock, 9, noise=1.0)}
    with pytest.raises(ArtifactError, match="no variant passes its gate on this machine"):
        choose_with(artifact, both, ref)
    # An artifact without reference logits: its export-time default, said so.
    c = ch.choose(artifact, ["fp32"], {}, lambda n: None, lambda e, ids: None, None, "int8-static")
    assert c.variant == "int8-static" and "no reference logits" in c.rule


def test_recheck_measures_batch_invariance():
    ref = fake_reference()
    ok = ch.recheck(lambda ids: np.stack([ref.logits[ref.ids.index(x)] for x in ids]), ref, {"max_abs_diff": 1e-4})
    assert ok["status"] == "pass" and ok["batch_invariant"] and ok["agreement"] == 1.0

    def batch_dependent(ids):  # the answer shifts with the batch size, as dynamic int8's per-batch scales do
        out = np.stack([ref.logits[ref.ids.index(x)] for x in ids])
        out[:, 0] += 0.01 * len(ids)
        return out

    res = ch.recheck(batch_dependent, ref, {"min_agreement": 0.9})
    assert res["status"] == "fail" and "answers change with the batch" in res["reason"]


def test_runtime_choice_on_a_real_artifact_is_bounded_and_overridable(served_artifact):
    rt = Runtime(served_artifact, device="cpu")
    assert rt.choice is not None and rt.choice.seconds <= ch.BUDGET_S
    assert rt.variant.name == rt.choice.variant and rt.choice.variant in ("fp32", "int8-static")
    info = rt.info()
    assert info["choice"]["timings_ms"].keys() == {"fp32", "int8-static"} and info["parity_here"]["status"] == "pass"
    assert set(info["cpu"]["features"]) >= {"avx2", "avx512", "vnni", "bf16", "amx"}
    # --variant overrides the choice: nothing is timed, the named variant is still re-checked here.
    rt = Runtime(served_artifact, variant="fp32", device="cpu")
    assert rt.choice is None and rt.variant.name == "fp32" and rt.local_parity["status"] == "pass"


def test_a_named_variant_that_fails_here_is_refused(served_artifact, tmp_path):
    """The reference logits no longer match what this machine computes: the named variant is not served."""
    from ferry.files import sha256_file

    art, m = copy_artifact(served_artifact, tmp_path / "drift")
    ref = art / m["reference"]["file"]
    rows = [json.loads(line) for line in ref.read_text().splitlines()]
    for row in rows:
        row["logits"] = [x + (3.0 if i == 0 else 0.0) for i, x in enumerate(row["logits"])]
    ref.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m["reference"]["sha256"] = sha256_file(ref)
    write_manifest(art, m)
    with pytest.raises(ArtifactError, match="fails its gate on this machine"):
        Runtime(art, variant="fp32", device="cpu")

"""`ferry bench` offline: the report's fields and plots on a tiny grid, the statistics, the
engine plan (CUDA, CPU flags and installed engines faked), the process-per-engine runner
(a crashing engine, one at a time), the fastest-PyTorch headline, the baseline check on
fake timings, and --compare."""

from __future__ import annotations

import json
import os
import time

import pytest

from bench.engines import plan_engines
from bench.report import percentile, spread
from runtime.hardware import read_cpu
from tests.cli import run, run_fails

AVX2 = read_cpu("model name : Fake EPYC\nflags : fpu sse avx2 fma\n", machine="x86_64")
SAPPHIRE = read_cpu("model name : Fake Xeon\nflags : avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16\n", machine="x86_64")
EVERYTHING = lambda engine: True  # noqa: E731  (every engine's package installed)

TINY = ["--batch-sizes", "1,4", "--seq-lengths", "8,32", "--max-seconds", "0.2", "--window-seconds", "0.01",
        "--warmup", "1", "--threads", "1", "--quiet"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_percentile_on_a_known_list():
    xs = [15, 20, 35, 40, 50]
    assert percentile(xs, 0) == 15 and percentile(xs, 100) == 50
    assert percentile(xs, 50) == 35
    assert percentile(xs, 40) == pytest.approx(29.0)  # numpy: 20 + 0.6 * 15
    assert percentile(xs, 90) == pytest.approx(46.0)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 50) == 2  # order does not matter
    with pytest.raises(ValueError):
        percentile([], 50)


def test_spread():
    assert spread([1.0, 1.0, 1.0]) == 0
    assert spread([0.9, 1.0, 1.1]) == pytest.approx(0.2)


def test_plan_engines_with_cuda_faked():
    variants = {"fp32": "fp32", "int8": "int8", "int8-static": "int8", "fp16": "fp16"}
    engines, skipped = plan_engines(variants, "auto", True, torch_cuda=False, ort_cuda=False, cpu=AVX2, installed=EVERYTHING)
    assert [e.name for e in engines] == ["pytorch-fp32-cpu", "onnx-fp32-cpu", "onnx-int8-cpu", "onnx-int8-static-cpu"]
    assert "onnx-fp16-cpu" in skipped and "no CUDA GPU" in skipped["cuda engines"]
    engines, skipped = plan_engines(variants, "auto", True, torch_cuda=True, ort_cuda=False, cpu=AVX2, installed=EVERYTHING)
    assert [e.name for e in engines][4:] == ["pytorch-fp32-cuda", "pytorch-fp16-cuda", "pytorch-bf16-cuda"]
    assert "onnx-fp32-cuda" in skipped and "onnx-fp16-cuda" in skipped
    engines, skipped = plan_engines(variants, "auto", True, torch_cuda=True, ort_cuda=True, cpu=AVX2, installed=EVERYTHING)
    names = [e.name for e in engines]
    assert names[4:] == ["pytorch-fp32-cuda", "pytorch-fp16-cuda", "pytorch-bf16-cuda", "onnx-fp32-cuda", "onnx-fp16-cuda"]
    assert {e.device for e in engines[4:]} == {"cuda"}
    assert "onnx-int8-cuda" in skipped
    engines, _ = plan_engines(variants, "cuda", False, torch_cuda=True, ort_cuda=True, cpu=AVX2, installed=EVERYTHING)
    assert [e.name for e in engines] == ["onnx-fp32-cuda", "onnx-fp16-cuda"]
    with pytest.raises(Exception, match="--device cuda"):
        plan_engines(variants, "cuda", True, torch_cuda=False, ort_cuda=False, cpu=AVX2, installed=EVERYTHING)


def test_speedups_are_per_device_and_cell():
    from bench.report import add_speedups

    def r(engine, kind, precision, device, b, s, sps):
        return {"engine": engine, "kind": kind, "precision": precision, "device": device, "batch_size": b, "seq_length": s, "sequences_per_s": sps}

    rows = [r("pytorch-fp32-cpu", "pytorch", "fp32", "cpu", 8, 16, 10.0), r("onnx-int8-cpu", "onnx", "int8", "cpu", 8, 16, 35.0),
            r("onnx-int8-cpu", "onnx", "int8", "cpu", 8, 64, 9.0), r("pytorch-fp32-cuda", "pytorch", "fp32", "cuda", 8, 16, 100.0),
            r("onnx-fp16-cuda", "onnx", "fp16", "cuda", 8, 16, 250.0)]
    add_speedups(rows)
    assert [x["speedup"] for x in rows] == [1.0, 3.5, None, 1.0, 2.5]
    assert rows[4]["baseline"] == "pytorch-fp32-cuda"


def test_plan_engines_bf16_autocast_only_on_a_cpu_with_bf16():
    from runtime.artifact import VARIANTS

    variants = {n: VARIANTS[n] for n in ("fp32", "openvino-bf16")}
    engines, skipped = plan_engines(variants, "cpu", True, torch_cuda=False, ort_cuda=False, cpu=SAPPHIRE, installed=EVERYTHING)
    assert [e.name for e in engines] == ["pytorch-fp32-cpu", "pytorch-bf16-cpu", "onnx-fp32-cpu", "onnx-openvino-bf16-cpu"]
    bf16 = engines[1]
    assert (bf16.kind, bf16.engine, bf16.precision) == ("pytorch", "torch", "bf16") and "autocast" in bf16.mode
    assert engines[0].mode == "eager fp32" and not skipped
    engines, skipped = plan_engines(variants, "cpu", True, torch_cuda=False, ort_cuda=False, cpu=AVX2, installed=EVERYTHING)
    assert [e.name for e in engines] == ["pytorch-fp32-cpu", "onnx-fp32-cpu"]
    assert "no bf16" in skipped["pytorch-bf16-cpu"] and "autocast" in skipped["pytorch-bf16-cpu"]
    assert "no bf16" in skipped["onnx-openvino-bf16-cpu"]
    # On CUDA PyTorch keeps fp16 and bf16 weights, whatever the CPU.
    engines, _ = plan_engines({}, "cuda", True, torch_cuda=True, ort_cuda=False, cpu=AVX2, installed=EVERYTHING)
    assert [e.name for e in engines] == ["pytorch-fp32-cuda", "pytorch-fp16-cuda", "pytorch-bf16-cuda"]


def test_plan_engines_openvino_variants_and_a_missing_engine():
    from runtime.artifact import VARIANTS

    names = ("fp32", "int8-static", "openvino-fp32", "openvino-int8-static", "fp16")
    variants = {n: VARIANTS[n] for n in names}
    engines, skipped = plan_engines(variants, "auto", True, torch_cuda=False, ort_cuda=True, cpu=AVX2, installed=EVERYTHING)
    cpu = {e.name: e for e in engines if e.device == "cpu"}
    assert list(cpu) == ["pytorch-fp32-cpu", "onnx-fp32-cpu", "onnx-int8-static-cpu", "onnx-openvino-fp32-cpu", "onnx-openvino-int8-static-cpu"]
    assert cpu["onnx-openvino-fp32-cpu"].engine == "openvino" and cpu["onnx-openvino-int8-static-cpu"].precision == "int8"
    assert cpu["onnx-fp32-cpu"].engine == "onnxruntime"
    assert [e.name for e in engines if e.device == "cuda"] == ["onnx-fp32-cuda", "onnx-fp16-cuda"]
    assert "CPU only" in skipped["onnx-openvino-fp32-cuda"] and "fp16" in skipped["onnx-fp16-cpu"]
    engines, skipped = plan_engines(variants, "cpu", True, torch_cuda=False, ort_cuda=False, cpu=AVX2, installed=lambda e: e != "openvino")
    assert [e.name for e in engines] == ["pytorch-fp32-cpu", "onnx-fp32-cpu", "onnx-int8-static-cpu"]
    for name in ("onnx-openvino-fp32-cpu", "onnx-openvino-int8-static-cpu"):
        assert "openvino package is not installed" in skipped[name]


def test_speedups_and_headline_over_the_fastest_pytorch_path():
    from bench.report import add_speedups, headline_text, headlines

    def r(engine, kind, precision, b, s, sps, mode=None):
        return {"engine": engine, "kind": kind, "precision": precision, "device": "cpu", "batch_size": b, "seq_length": s,
                "sequences_per_s": sps, "mode": mode}

    rows = [r("pytorch-fp32-cpu", "pytorch", "fp32", 32, 128, 10.0, "eager fp32"),
            r("pytorch-bf16-cpu", "pytorch", "bf16", 32, 128, 16.0, "eager, torch.autocast('cpu', bfloat16)"),
            r("onnx-int8-cpu", "onnx", "int8", 32, 128, 24.0), r("onnx-openvino-bf16-cpu", "onnx", "bf16", 32, 128, 40.0),
            r("pytorch-fp32-cpu", "pytorch", "fp32", 64, 256, 2.0, "eager fp32"),
            r("pytorch-bf16-cpu", "pytorch", "bf16", 64, 256, 1.0, "eager, torch.autocast('cpu', bfloat16)"),
            r("onnx-int8-cpu", "onnx", "int8", 64, 256, 5.0)]
    add_speedups(rows)
    assert [x["baseline"] for x in rows] == ["pytorch-bf16-cpu"] * 4 + ["pytorch-fp32-cpu"] * 3
    assert [x["speedup"] for x in rows] == pytest.approx([0.625, 1.0, 1.5, 2.5, 1.0, 0.5, 2.5])
    assert [x["speedup_fp32"] for x in rows] == pytest.approx([1.0, 1.6, 2.4, 4.0, 1.0, 0.5, 2.5])
    heads = headlines(rows)
    h = heads["cpu"]  # 32 x 128 is the headline cell even where a larger cell was run
    assert (h["batch_size"], h["seq_length"], h["baseline"], h["best"]) == (32, 128, "pytorch-bf16-cpu", "onnx-openvino-bf16-cpu")
    assert h["speedup"] == pytest.approx(2.5) and h["pytorch_paths"] == {"pytorch-fp32-cpu": 10.0, "pytorch-bf16-cpu": 16.0}
    text = headline_text("cpu", h)
    assert "2.50x over the fastest PyTorch path, pytorch-bf16-cpu" in text and "autocast" in text
    without = headlines([x for x in rows if x["seq_length"] == 256])["cpu"]  # no 32 x 128: the largest cell
    assert (without["batch_size"], without["baseline"], without["speedup"]) == (64, "pytorch-fp32-cpu", pytest.approx(2.5))


def test_baseline_check_on_fake_timings():
    from bench.offline import compare_baseline

    alone = [0.400, 0.402, 0.398, 0.405, 0.399]
    ok = compare_baseline([0.410, 0.412, 0.409], alone, engine="pytorch-fp32-cpu", cell="32x128")
    assert ok["status"] == "ok" and ok["ratio"] == pytest.approx(0.410 / 0.400)
    assert ok["in_grid_p50_ms"] == pytest.approx(410.0) and ok["standalone_p50_ms"] == pytest.approx(400.0)
    assert "WARNING" not in ok["message"] and "pytorch-fp32-cpu at 32x128" in ok["message"]
    assert compare_baseline([0.419], alone)["status"] == "ok"  # 4.75% slower: within 5%
    slow = compare_baseline([0.44, 0.441, 0.439], alone)  # 10% slower in the grid
    assert slow["status"] == "warn" and slow["ratio"] == pytest.approx(1.10)
    assert "WARNING" in slow["message"] and "10% slower" in slow["message"] and "inflated" in slow["message"]
    fast = compare_baseline([0.36] * 3, alone)  # 10% faster in the grid: suspicious too
    assert fast["status"] == "warn" and "faster" in fast["message"] and "deflated" in fast["message"]
    assert compare_baseline([0.44], alone, tolerance=0.15)["status"] == "ok"


def test_baseline_checks_pick_the_fastest_path_and_its_twin():
    from bench.offline import baseline_checks
    from bench.timing import TWIN, Timing

    def row(engine, kind, sps, b=32, s=128):
        return {"engine": engine, "kind": kind, "device": "cpu", "batch_size": b, "seq_length": s, "sequences_per_s": sps}

    results = [row("pytorch-fp32-cpu", "pytorch", 10.0), row("pytorch-bf16-cpu", "pytorch", 20.0), row("onnx-int8-cpu", "onnx", 30.0),
               row("pytorch-fp32-cpu", "pytorch", 50.0, 1, 128)]
    timings = {("pytorch-bf16-cpu", "32x128"): Timing(latencies=[1.10, 1.11, 1.09]),
               ("pytorch-bf16-cpu" + TWIN, "32x128"): Timing(latencies=[1.0, 1.0, 1.01]),
               ("pytorch-fp32-cpu", "32x128"): Timing(latencies=[3.2]), ("pytorch-fp32-cpu" + TWIN, "32x128"): Timing(latencies=[3.2])}
    [check] = baseline_checks(results, timings, [(32, 128)])  # only the checked cell
    assert (check["engine"], check["cell"], check["device"], check["status"]) == ("pytorch-bf16-cpu", "32x128", "cpu", "warn")
    assert check["ratio"] == pytest.approx(1.10)
    del timings["pytorch-bf16-cpu" + TWIN, "32x128"]
    [check] = baseline_checks(results, timings, [(32, 128)])
    assert check["status"] == "failed" and "did not run" in check["message"]
    assert baseline_checks(results, timings, []) == []


def test_busy_machine_note():
    from bench.report import busy_note

    assert busy_note({"load_average": [0.4, 0.3, 0.2], "logical_cores": 2}) is None
    note = busy_note({"load_average": [4.5, 3.0, 2.0], "logical_cores": 2})
    assert "load average 4.5 on 2 logical cores" in note and "OpenMP" in note
    assert busy_note({"load_average": None, "logical_cores": 2}) is None


# ---- the process-per-engine runner: engines loaded by these functions inside their worker


def crashing_engine(spec, die_at: int, hard: bool):
    """An engine whose ``die_at``-th call kills its process (``hard``) or raises."""
    from bench.engines import Engine

    calls = [0]

    def run(batch):
        calls[0] += 1
        if calls[0] >= die_at:
            if hard:
                os._exit(3)
            raise RuntimeError("boom in the engine")
        return batch

    return Engine(spec, run, lambda feeds: feeds)


def logging_engine(spec, log: str):
    """An engine that sleeps 5 ms per call and logs its process id and the call's wall-clock span."""
    from bench.engines import Engine

    def run(batch):
        t0 = time.time()
        time.sleep(0.005)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {t0} {time.time()}\n")

    return Engine(spec, run, lambda feeds: feeds)


def unavailable_engine(spec):
    from runtime.engines import EngineUnavailable

    raise EngineUnavailable("model.onnx: OpenVINO cannot compile it on this CPU (faked)")


RUNNER = ["--max-seconds", "0.3", "--window-seconds", "0.01", "--warmup", "1", "--quiet"]


def test_each_engine_in_its_own_process_and_a_crash_is_reported(bert_artifact, tmp_path):
    from bench.engines import EngineSpec
    from bench.offline import BenchArgs, jobs_for, run_grid, text_grid
    from bench.timing import Job, start_workers
    from runtime.artifact import check_valid_artifact_dir

    artifact = check_valid_artifact_dir(bert_artifact)
    args = BenchArgs(artifact=str(bert_artifact), batch_sizes=[1, 4], seq_lengths=[8], max_seconds=0.3, window_seconds=0.01, quiet=True)
    cells = text_grid(artifact, args)
    real = [EngineSpec("pytorch-fp32-cpu", "pytorch", "cpu", "fp32", engine="torch", mode="eager fp32"),
            # bf16 autocast runs (emulated) on any CPU; the plan only offers it where the CPU has bf16
            EngineSpec("pytorch-bf16-cpu", "pytorch", "cpu", "bf16", engine="torch", mode="eager, torch.autocast('cpu', bfloat16)"),
            EngineSpec("onnx-fp32-cpu", "onnx", "cpu", "fp32", "fp32"), EngineSpec("onnx-int8-static-cpu", "onnx", "cpu", "int8", "int8-static")]
    jobs = jobs_for(real, artifact, None, 1)
    jobs += [Job(EngineSpec("dies", "onnx", "cpu", "fp32", "x"), "tests.export.test_bench:crashing_engine", {"die_at": 3, "hard": True}),
             Job(EngineSpec("raises", "onnx", "cpu", "fp32", "y"), "tests.export.test_bench:crashing_engine", {"die_at": 2, "hard": False}),
             Job(EngineSpec("cannot-compile", "onnx", "cpu", "fp32", "z"), "tests.export.test_bench:unavailable_engine", {})]
    workers, unavailable = start_workers(jobs)
    try:
        assert [w.spec.name for w in workers] == [s.name for s in real] + ["dies", "raises"]
        pids = {w.info["pid"] for w in workers}
        assert len(pids) == len(workers) and os.getpid() not in pids  # one process per engine, none of them this one
        results, failed, timings = run_grid(workers, cells, args)
    finally:
        for w in workers:
            w.stop()
    reason, kind, ferry_error = unavailable["cannot-compile"]
    assert "cannot compile" in reason and kind == "EngineUnavailable" and ferry_error
    got = {(r["engine"], r["batch_size"]) for r in results}
    assert got == {(s.name, b) for s in real for b in (1, 4)}
    assert all(r["calls"] >= 1 and r["sequences_per_s"] > 0 for r in results)
    assert {r["runtime"] for r in results} == {"torch", "onnxruntime"}
    assert "died" in failed["dies"] and "exit code 3" in failed["dies"] and failed["dies"].startswith("cell 1x8")
    assert "RuntimeError: boom in the engine" in failed["raises"]
    assert not any(w.process.is_alive() for w in workers)


def test_only_one_engine_runs_at_a_time(tmp_path):
    from bench.engines import EngineSpec
    from bench.offline import BenchArgs, run_grid
    from bench.timing import Cell, Job, start_workers

    log = tmp_path / "calls.log"
    jobs = [Job(EngineSpec(f"sleeper-{i}", "onnx", "cpu", "fp32", f"v{i}"), "tests.export.test_bench:logging_engine", {"log": str(log)})
            for i in range(3)]
    args = BenchArgs(max_seconds=0.5, window_seconds=0.02, quiet=True, spread=1e-9)  # never stable: rounds until the time is up
    workers, _ = start_workers(jobs)
    try:
        results, failed, _ = run_grid(workers, [Cell(2, 4, [{"x": __import__("numpy").zeros((2, 4))}], [8])], args)
    finally:
        for w in workers:
            w.stop()
    assert not failed and {r["engine"] for r in results} == {j.spec.name for j in jobs}
    spans = sorted((float(a), float(b), int(p)) for p, a, b in (line.split() for line in log.read_text().splitlines()))
    assert len({p for _, _, p in spans}) == 3 and all(r["windows"] >= 2 for r in results)
    for (s0, e0, _), (s1, _, _) in zip(spans, spans[1:]):
        assert s1 >= e0 - 1e-3  # a call starts after the previous one (of any engine) ended


@pytest.fixture(scope="module")
def report_dir(bert_artifact, tmp_path_factory):
    from ferry.cli import main

    out = tmp_path_factory.mktemp("bench") / "report"
    assert main(["bench", str(bert_artifact), "--output", str(out), *TINY]) == 0
    return out


def test_bench_report_files_and_fields(report_dir, bert_artifact):
    assert {p.name for p in report_dir.iterdir()} == {"bench.json", "bench.md", "latency.png", "throughput.png"}
    rep = json.loads((report_dir / "bench.json").read_text())
    assert rep["stage"] == "bench" and rep["artifact"] == str(bert_artifact)
    assert {"cpu", "physical_cores", "logical_cores", "gpu", "load_average"} <= set(rep["machine"])
    assert {"torch", "onnxruntime-gpu", "python"} <= set(rep["versions"])
    assert rep["threads"] == 1
    assert "onnx-fp16-cpu" in rep["skipped"]
    bf16 = read_cpu().has("bf16")  # bf16 autocast joins the grid only on a CPU with bf16
    engines = ["pytorch-fp32-cpu", *(["pytorch-bf16-cpu"] if bf16 else []), "onnx-fp32-cpu", "onnx-int8-cpu", "onnx-int8-static-cpu"]
    if not bf16:
        assert "no bf16" in rep["skipped"]["pytorch-bf16-cpu"]
    cells = {(r["engine"], r["batch_size"], r["seq_length"]) for r in rep["results"]}
    assert cells == {(e, b, s) for e in engines for b in (1, 4) for s in (8, 32)}
    assert not rep["failed"]
    for r in rep["results"]:
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["calls"] >= 1 and r["windows"] >= 1
        assert r["sequences_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["sequences_per_s"] * r["seq_length"])
        assert r["peak_rss_mb"] >= 0
        same_cell = [x for x in rep["results"] if (x["batch_size"], x["seq_length"]) == (r["batch_size"], r["seq_length"])]
        fastest = max((x for x in same_cell if x["kind"] == "pytorch"), key=lambda x: x["sequences_per_s"])
        assert r["speedup"] > 0 and r["baseline"] == fastest["engine"]
        assert r["speedup"] == pytest.approx(r["sequences_per_s"] / fastest["sequences_per_s"])
        if not bf16:
            assert r["baseline"] == "pytorch-fp32-cpu"
        if r["engine"] == r["baseline"]:
            assert r["speedup"] == 1.0
    table = (report_dir / "bench.md").read_text()
    assert "| engine | batch | seq |" in table and "onnx-int8-static-cpu" in table and "cores" in table


def test_bench_report_records_the_cpu_the_headline_and_the_baseline_check(report_dir):
    rep = json.loads((report_dir / "bench.json").read_text())
    isa = rep["machine"]["cpu_isa"]
    assert isa == read_cpu().as_dict()
    assert {"avx2", "avx512", "vnni", "bf16", "amx"} <= set(isa["features"])
    h = rep["headline"]["cpu"]
    assert (h["batch_size"], h["seq_length"]) == (4, 32)  # no 32 x 128 in this grid: the largest cell
    cell = [r for r in rep["results"] if (r["batch_size"], r["seq_length"]) == (4, 32)]
    fastest = max((r for r in cell if r["kind"] == "pytorch"), key=lambda r: r["sequences_per_s"])
    best = max((r for r in cell if r["kind"] == "onnx"), key=lambda r: r["sequences_per_s"])
    assert (h["baseline"], h["best"]) == (fastest["engine"], best["engine"])
    assert h["speedup"] == pytest.approx(best["speedup"]) and h["baseline_mode"] == fastest["mode"]
    [check] = rep["baseline_check"]
    assert check["engine"] == h["baseline"] and check["cell"] == "4x32" and check["status"] in ("ok", "warn")
    assert check["standalone_calls"] >= 1 and check["ratio"] == pytest.approx(check["in_grid_p50_ms"] / check["standalone_p50_ms"])
    md = (report_dir / "bench.md").read_text()
    assert f"over the fastest PyTorch path, {h['baseline']}" in md and "baseline check: **" in md
    assert "CPU ISA: avx2 " in md and rep["machine"]["cpu"] in md
    assert "one process per engine" in rep["isolation"]
    assert ("busy machine" in md) == bool(rep["busy"])


def test_bench_plots_are_valid_pngs(report_dir):
    from PIL import Image

    for name in ("latency.png", "throughput.png"):
        path = report_dir / name
        assert path.read_bytes()[:8] == PNG
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size[0] > 400 and img.size[1] > 200


def test_bench_on_real_texts(bert_artifact, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("the team won the match\na new chip for the phone today\npasta and bread for dinner\n" * 3)
    out = tmp_path / "t"
    rc, stdout, err = run(["bench", str(bert_artifact), "--output", str(out), "--texts", str(texts), "--variants", "int8",
                           "--batch-sizes", "2,4", "--max-seconds", "0.1", "--window-seconds", "0.01", "--threads", "1", "--quiet"], capsys)
    assert rc == 0, err
    rep = json.loads((out / "bench.json").read_text())
    assert {r["seq_length"] for r in rep["results"]} == {"natural"}
    assert {r["engine"] for r in rep["results"]} == {"pytorch-fp32-cpu", "onnx-int8-cpu"}


def test_compare_two_reports(report_dir, tmp_path, capsys):
    b = json.loads((report_dir / "bench.json").read_text())
    for r in b["results"]:
        r["sequences_per_s"] *= 2
        r["latency_ms"]["p50"] /= 2
    (tmp_path / "b.json").write_text(json.dumps(b))
    rc, out, err = run(["bench", "--compare", str(report_dir / "bench.json"), str(tmp_path / "b.json")], capsys)
    assert rc == 0, err
    assert out.count("2.00x") == 16 and out.count("0.50x") == 16
    assert "onnx-int8-cpu" in out


def test_compare_refuses_non_reports(report_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    run_fails(["bench", "--compare", str(report_dir / "bench.json"), str(bad)], capsys, "bad.json", "not valid JSON")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"stage": "export"}))
    run_fails(["bench", "--compare", str(other), str(report_dir / "bench.json")], capsys, "not a ferry bench report")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    run_fails(["bench", "--compare", str(listed), str(report_dir / "bench.json")], capsys, "list.json", "expected a JSON object")
    run_fails(["bench", "--compare", str(tmp_path / "gone.json"), str(report_dir / "bench.json")], capsys, "gone.json: file not found")
    run_fails(["bench", "--compare", str(report_dir / "bench.json")], capsys, "two reports")


def test_bench_refuses_existing_output_before_timing(report_dir, bert_artifact, capsys):
    run_fails(["bench", str(bert_artifact), "--output", str(report_dir), *TINY], capsys, "already exists", "--overwrite")


def test_bench_seq_lengths_above_the_model(bert_artifact, tmp_path, capsys):
    run_fails(["bench", str(bert_artifact), "--output", str(tmp_path / "x"), "--seq-lengths", "4096", *TINY[4:]], capsys,
              "--seq-lengths", "positions")

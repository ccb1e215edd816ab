"""`ferry bench` offline: the report's fields and plots on a tiny grid, the statistics, the
engine plan (CUDA faked), and --compare."""

from __future__ import annotations

import json

import pytest

from export.bench import percentile, plan_engines, spread
from tests.export.conftest import run, run_fails

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
    engines, skipped = plan_engines(variants, "auto", True, torch_cuda=False, ort_cuda=False)
    assert [e.name for e in engines] == ["pytorch-fp32-cpu", "onnx-fp32-cpu", "onnx-int8-cpu", "onnx-int8-static-cpu"]
    assert "onnx-fp16-cpu" in skipped and "no CUDA GPU" in skipped["cuda engines"]
    engines, skipped = plan_engines(variants, "auto", True, torch_cuda=True, ort_cuda=False)
    assert [e.name for e in engines][4:] == ["pytorch-fp32-cuda", "pytorch-fp16-cuda", "pytorch-bf16-cuda"]
    assert "onnx-fp32-cuda" in skipped and "onnx-fp16-cuda" in skipped
    engines, skipped = plan_engines(variants, "auto", True, torch_cuda=True, ort_cuda=True)
    names = [e.name for e in engines]
    assert names[4:] == ["pytorch-fp32-cuda", "pytorch-fp16-cuda", "pytorch-bf16-cuda", "onnx-fp32-cuda", "onnx-fp16-cuda"]
    assert {e.device for e in engines[4:]} == {"cuda"}
    assert "onnx-int8-cuda" in skipped
    engines, _ = plan_engines(variants, "cuda", False, torch_cuda=True, ort_cuda=True)
    assert [e.name for e in engines] == ["onnx-fp32-cuda", "onnx-fp16-cuda"]
    with pytest.raises(Exception, match="--device cuda"):
        plan_engines(variants, "cuda", True, torch_cuda=False, ort_cuda=False)


def test_speedups_are_per_device_and_cell():
    from export.bench import add_speedups

    def r(engine, kind, precision, device, b, s, sps):
        return {"engine": engine, "kind": kind, "precision": precision, "device": device, "batch_size": b, "seq_length": s, "sequences_per_s": sps}

    rows = [r("pytorch-fp32-cpu", "pytorch", "fp32", "cpu", 8, 16, 10.0), r("onnx-int8-cpu", "onnx", "int8", "cpu", 8, 16, 35.0),
            r("onnx-int8-cpu", "onnx", "int8", "cpu", 8, 64, 9.0), r("pytorch-fp32-cuda", "pytorch", "fp32", "cuda", 8, 16, 100.0),
            r("onnx-fp16-cuda", "onnx", "fp16", "cuda", 8, 16, 250.0)]
    add_speedups(rows)
    assert [x["speedup"] for x in rows] == [1.0, 3.5, None, 1.0, 2.5]
    assert rows[4]["baseline"] == "pytorch-fp32-cuda"


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
    engines = ["pytorch-fp32-cpu", "onnx-fp32-cpu", "onnx-int8-cpu", "onnx-int8-static-cpu"]
    cells = {(r["engine"], r["batch_size"], r["seq_length"]) for r in rep["results"]}
    assert cells == {(e, b, s) for e in engines for b in (1, 4) for s in (8, 32)}
    for r in rep["results"]:
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["calls"] >= 1 and r["windows"] >= 1
        assert r["sequences_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["sequences_per_s"] * r["seq_length"])
        assert r["peak_rss_mb"] >= 0
        assert r["speedup"] > 0 and r["baseline"] == "pytorch-fp32-cpu"
        if r["engine"] == "pytorch-fp32-cpu":
            assert r["speedup"] == 1.0
    table = (report_dir / "bench.md").read_text()
    assert "| engine | batch | seq |" in table and "onnx-int8-static-cpu" in table and "cores" in table


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

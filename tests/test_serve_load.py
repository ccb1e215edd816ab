"""benchmarks/serve_load.py's pure parts: headlines, arrival order, the label check, ratios, targets
and the Markdown report, on fabricated data (no server starts)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


@pytest.fixture(scope="module")
def sl():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headline_is_the_first_non_empty_line_on_one_line(sl):
    assert sl.headline("\n  \n Ad sales\tboost  Time Warner \n\nQuarterly profits ...") == "Ad sales boost Time Warner"
    assert sl.headline("One line only") == "One line only"
    assert sl.headline(" \n\t\n") == ""


def test_headlines_are_distinct_and_picked_evenly(sl):
    articles = [f"Title {i // 2}\n\nbody {i}" for i in range(20)] + ["\n\n"]  # every title twice, one empty article
    assert sl.headlines(articles, 100) == [f"Title {i}" for i in range(10)]
    assert sl.headlines(articles, 5) == ["Title 0", "Title 2", "Title 4", "Title 6", "Title 8"]
    assert sl.pick_evenly(list(range(10)), 3) == [0, 3, 6]


def test_arrival_order_is_the_order_the_load_sends(sl):
    from bench.load import Load

    texts = [f"t{i}" for i in range(37)]
    load = Load(None, "http://unused", texts, 1, timeout=1, seed=sl.SEED)
    sent = [load.next_body()["texts"][0] for _ in texts]
    assert sl.arrival_order(texts) == sent
    assert sorted(sent) == sorted(texts)


def test_compare_labels_counts_texts_and_answers(sl):
    alone = {"a": {"label": "x", "score": 0.9}, "b": {"label": "y", "score": 0.5}, "c": None}
    under_load = {"a": [("x", 0.9), ("x", 0.95)], "b": [("y", 0.5), ("x", 0.6), ("x", 0.6)], "c": [("x", 1.0)]}
    out = sl.compare_labels(alone, under_load)
    assert out["texts"] == 2 and out["alone_errors"] == 1 and out["answers_under_load"] == 5
    assert out["texts_mismatched"] == 1 and out["answers_mismatched"] == 2
    assert out["max_abs_score_diff"] == pytest.approx(0.1)
    assert out["examples"] == [{"text": "b", "alone": "y", "under_load": ["y", "x", "x"]}]


def served(tps: float, p50: float = 50.0, p99: float = 120.0, errors: int = 0, batch: float | None = None) -> dict:
    row = {"texts_per_s": tps, "requests": 2000, "errors": errors,
           "latency_ms": {"p50": p50, "p99": p99}, "load": [1.0, 1.0, 1.0]}
    if batch is not None:
        row["server_batch"] = {"texts_per_batch": batch}
    return row


def fabricated(sl, serve=(800.0, 900.0), plain=(100.0, 100.0), offline=(850.0, 950.0), near=(1500.0, 1500.0),
               bare=(2000.0, 2000.0), errors=0, mismatched=0) -> dict:
    rounds = []
    for i in range(len(serve)):
        row = {"offline": {"texts_per_s": offline[i], "p50_ms_per_batch": 40.0, "load": [1.0, 1.0, 1.0]},
               "ferry_serve": served(serve[i], batch=20.0, errors=errors), "plain_pytorch": served(plain[i], 600, 900),
               "near_free_serve": served(near[i], batch=8.0), "bare_asgi": served(bare[i], 20, 40)}
        row["ratios"] = sl.round_ratios(row)
        rounds.append(row)
    report = {
        "command": "python benchmarks/serve_load.py --rounds 2", "created": "2025-01-01T00:00:00+00:00",
        "artifact": "/a", "checkpoint": "/c", "variant": "int8-static", "variant_requested": None, "serve_args": [],
        "settings": {"requests": 2000, "duration": 30.0, "offline_seconds": 10.0},
        "texts": {"count": 872, "mean_chars": 31.0}, "concurrency": 64, "cores": 2,
        "cpu": {"model": "Some CPU", "features": {"avx2": True, "avx512": False}, "flags": ["avx2"]}, "versions": {"python": "3.11"},
        "load_start": [1.0, 1.0, 1.0], "load_end": [1.2, 1.1, 1.0], "rounds": rounds,
        "server_info": {"provider": "CPUExecutionProvider", "threads": 2, "serving": {"max_batch_size": 32, "max_latency_ms": 10000, "workers": 1}},
        "near_free": {"server_info": {"variant": "fp32", "provider": "CPUExecutionProvider"}},
        "label_check": {"texts": 256, "alone_errors": 0, "answers_under_load": 600, "texts_mismatched": mismatched,
                        "answers_mismatched": mismatched, "max_abs_score_diff": 1e-6,
                        "examples": [{"text": "t", "alone": "x", "under_load": ["y"]}] if mismatched else []},
    }
    report["summary"] = sl.summary(rounds)
    report["ratios"] = {k: sl.median([row["ratios"][k] for row in rounds]) for k in sl.RATIOS}
    report["targets"] = sl.evaluate(report)
    return report


def test_ratios_are_per_round_and_the_median_is_reported(sl):
    r = fabricated(sl)
    assert [row["ratios"]["serve_over_plain_pytorch"] for row in r["rounds"]] == [8.0, 9.0]
    assert r["ratios"]["serve_over_plain_pytorch"] == pytest.approx(8.5)
    assert r["ratios"]["serve_over_offline_batch32"] == pytest.approx((800 / 850 + 900 / 950) / 2)
    assert r["ratios"]["near_free_over_bare_asgi"] == pytest.approx(0.75)
    assert sl.median([3.0, 1.0, 2.0]) == 2.0 and sl.median([]) is None
    s = r["summary"]
    assert s["ferry_serve"]["texts_per_s"] == 850.0 and s["ferry_serve"]["mean_batch"] == 20.0
    assert s["plain_pytorch"]["mean_batch"] is None and s["ferry_serve"]["requests"] == 4000


def test_targets_all_met(sl):
    r = fabricated(sl)
    t = r["targets"]
    assert all(x["met"] for x in t.values())
    assert t["ferry serve / plain PyTorch service"]["aim_met"] is True
    assert t["near-free ferry serve / bare ASGI"]["aim_met"] is False  # 0.75: target met, aim (0.9) not
    md = sl.markdown(r)
    assert "not met" not in md.replace("aim not met", "")
    assert "All targets met." in md
    assert "CPU Some CPU (avx2 yes, avx512 no), 2 logical cores" in md
    assert "| ferry serve / plain PyTorch service | 8.0x, 9.0x | **8.5x** | >= 6 | >= 8 | met, aim met |" in md


@pytest.mark.parametrize("change, failing", [
    ({"plain": (200.0, 200.0)}, "ferry serve / plain PyTorch service"),  # 4x, 4.5x
    ({"offline": (1000.0, 1100.0)}, "ferry serve / offline batch 32"),  # 0.8, 0.82
    ({"near": (1000.0, 1300.0)}, "near-free ferry serve / bare ASGI"),  # 0.5, 0.65
    ({"errors": 3}, "no errors under load"),
    ({"mismatched": 2}, "labels under load equal to each text sent alone"),
])
def test_a_missed_target_is_reported(sl, change, failing):
    r = fabricated(sl, **change)
    assert [k for k, x in r["targets"].items() if not x["met"]] == [failing]
    md = sl.markdown(r)
    line = next(x for x in md.splitlines() if x.startswith(f"| {failing} |"))
    assert line.endswith("| **not met** |")
    assert f"**Targets not met**: {failing}." in md


def test_no_label_check_is_not_a_pass(sl):
    r = fabricated(sl)
    r2 = copy.deepcopy(r)
    r2["label_check"] = None
    assert sl.evaluate(r2)["labels under load equal to each text sent alone"]["met"] is False
    r2["rounds"] = []
    assert sl.evaluate(r2)["no errors under load"]["met"] is False

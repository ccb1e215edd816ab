"""`ferry pipeline --config`: one YAML drives finetune -> export -> parity -> bench."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.cli import run, run_fails


def write_config(path, **sections):
    path.write_text(yaml.safe_dump(sections, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.slow
def test_pipeline_end_to_end(tiny_bert, tiny_data, tmp_path, capsys):
    root = tmp_path / "run"
    cfg = write_config(
        tmp_path / "pipeline.yaml",
        output=str(root),
        finetune={"model": str(tiny_bert), "train": str(tiny_data), "epochs": 2, "batch_size": 16, "max_length": 32,
                  "learning_rate": 5e-3, "calibration_samples": 20, "quiet": True},
        export={"variants": ["fp32", "int8", "int8-static"], "threads": 1, "quiet": True,
                "parity_batch_sizes": [1, 2], "parity_seq_lengths": [8, 32]},
        bench={"batch_sizes": [32], "seq_lengths": [16, 32], "max_seconds": 0.2, "window_seconds": 0.01, "warmup": 1,
               "threads": 1, "quiet": True},
    )
    rc, out, err = run(["pipeline", "--config", str(cfg)], capsys)
    assert rc == 0, err
    assert {p.name for p in root.iterdir()} == {"checkpoint", "artifact", "bench", "pipeline.json", "summary.md"}
    assert (root / "checkpoint" / "ferry.json").exists()
    assert {p.name for p in (root / "bench").iterdir()} == {"bench.json", "bench.md", "latency.png", "throughput.png"}
    art = json.loads((root / "artifact" / "ferry.json").read_text())
    assert art["source"]["checkpoint"] == str((root / "checkpoint").resolve())
    summary = json.loads((root / "pipeline.json").read_text())
    assert [r[0] for r in summary["rows"]] == ["fp32", "int8", "int8-static"]
    assert "batch 32 x seq 32" in summary["note"]  # no 32x128 cell: the largest one
    for row in summary["rows"]:
        assert row[1] in ("pass", "fail", "unverified") and row[6].endswith("x")
    assert "summary" in out and "speedup" in out


def test_pipeline_config_errors_are_collected_before_any_stage(tmp_path, capsys):
    cfg = write_config(
        tmp_path / "bad.yaml",
        output=str(tmp_path / "run"),
        finetune={"epochs": 0, "output": "elsewhere"},
        export={"variants": ["fp32", "int4"], "colour": "blue"},
        bench={"batch_sizes": [0]},
        typo=1,
    )
    line = run_fails(["pipeline", "--config", str(cfg)], capsys, "unknown key 'typo'")
    rc = run(["pipeline", "--config", str(write_config(tmp_path / "b2.yaml", output=str(tmp_path / "run"),
                                                        finetune={"epochs": 0, "output": "x"},
                                                        export={"variants": ["fp32", "int4"], "colour": "blue"},
                                                        bench={"batch_sizes": [0]}))], capsys)
    assert rc[0] == 2
    err = rc[2]
    for needle in ("'finetune.output' is set by the pipeline", "section 'finetune': --epochs must be > 0", "unknown key 'export.colour'", "section 'bench': --batch-sizes must all be > 0"):
        assert needle in err, err
    assert not (tmp_path / "run").exists()
    assert "Traceback" not in err and line


def test_pipeline_section_must_be_a_mapping(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", output=str(tmp_path / "run"), export="fp32")
    run_fails(["pipeline", "--config", str(cfg)], capsys, "export", "mapping")


def test_pipeline_on_an_image_checkpoint(tmp_path, capsys, resnet_ckpt):
    cfg = write_config(
        tmp_path / "pipeline.yaml",
        output=str(tmp_path / "run"),
        export={"variants": ["fp32"], "threads": 1, "quiet": True, "parity_batch_sizes": [1, 2]},
        bench={"batch_sizes": [1, 4], "max_seconds": 0.2, "window_seconds": 0.01, "warmup": 1, "threads": 1, "quiet": True},
    )
    rc, out, err = run(["pipeline", "--config", str(cfg), "--checkpoint", str(resnet_ckpt)], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    size = json.loads((tmp_path / "run" / "artifact" / "ferry.json").read_text())["image_size"]["height"]
    assert [r[0] for r in summary["rows"]] == ["fp32"] and summary["rows"][0][1] == "pass"
    assert f"batch 4 x image {size}" in summary["note"]
    assert "held-out images" in out

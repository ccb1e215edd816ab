"""The same command under `torchrun --nproc-per-node 2` on CPU (gloo): one checkpoint, metrics over all data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.files import read_manifest
from tests.artifacts import read_jsonl
from tests.cli import finetune_argv

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_torchrun_on_cpu(tmp_path, tiny_bert, train_csv):
    out = tmp_path / "runs" / "ckpt"
    argv = finetune_argv(tiny_bert, train_csv, out, "--epochs", "2", "--batch-size", "8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ferry", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # written once, by rank 0: the checkpoint and nothing else beside it
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]
    assert proc.stdout.count("test accuracy") == 1
    m = read_manifest(out)
    assert m["world_size"] == 2
    sizes = m["split"]["sizes"]
    # metrics are reduced over both ranks: they cover every validation and test example exactly once
    assert m["metrics"]["test"]["examples"] == sizes["test"] == 12
    assert m["metrics"]["validation"]["examples"] == sizes["validation"] == 12
    assert sum(map(sum, m["metrics"]["test"]["confusion_matrix"])) == 12
    history = read_jsonl(out / "metrics.jsonl")
    assert [h["examples"] for h in history] == [12, 12, 12]
    # each rank ran ceil(48 / 8) = 6 batches per epoch: 96 training examples seen per epoch in all
    assert m["timing"]["train_samples_per_second"] > 0

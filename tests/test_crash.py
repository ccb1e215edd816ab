"""Crash safety: `ferry finetune` and `ferry export` killed with SIGKILL at random (seeded) moments.

Each kill must leave the output absent, the old complete directory, or the new complete one
(complete: ferry.json present and every file it lists present with its sha256), never half of
one; fine-tuning then continues with --resume to the weights of an uninterrupted run.

A Python process takes 5-10 s here to import torch and transformers, more than a tiny run
takes, so each run is a process forked from one server that has imported them (nothing has
run yet when it forks, so no thread or lock is copied half-way): a real process, killed for
real, that starts in milliseconds. onnxruntime, whose import starts a thread, is imported by
each export run itself.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.files import clean_stale, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240613
FINETUNE_TRIALS, EXPORT_TRIALS, FRESH_EXPORT_TRIALS = 12, 6, 2

# The server reads one JSON request per line ({"argv", "kill_after", "trigger", "watch", "log"}), forks
# `ferry ARGV` and kills it with SIGKILL kill_after seconds after it started, or after a file matching the
# glob "trigger" appeared (unless it ended before). Its one-line JSON answer says when the trigger
# appeared and whether the file "watch" existed at any moment of the run.
SERVER = r"""
import glob, json, os, signal, sys, time
import torch, transformers  # the slow imports, done once
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import ferry.cli, finetune.train, finetune.checkpoint, finetune.batching, finetune.modeling  # noqa: F401
import finetune.featurecache, finetune.metrics, export.export, export.parity  # noqa: F401
assert "onnxruntime" not in sys.modules  # its import starts a thread: never before a fork
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            rc = ferry.cli.main(req["argv"])
        except BaseException:
            import traceback
            traceback.print_exc()
            rc = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    killed = seen = False
    since = None if req["trigger"] else start
    while True:  # the pid stays ours (not reaped) until waitpid returns it: no pid-reuse race
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        seen = seen or bool(req["watch"] and os.path.exists(req["watch"]))
        if since is None and glob.glob(req["trigger"].replace("{pid}", str(pid))):
            since = time.monotonic()
        if req["kill_after"] is not None and since is not None and time.monotonic() - since >= req["kill_after"]:
            os.kill(pid, signal.SIGKILL)
            killed = True
            os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    rc = None if killed else os.waitstatus_to_exitcode(status)
    triggered = None if since is None else since - start
    print(json.dumps({"killed": killed, "rc": rc, "seconds": time.monotonic() - start, "seen": seen,
                      "triggered": triggered}), flush=True)
"""


class Runner:
    """Runs `ferry ARGV` in a process forked from the server; ``kill`` is (seconds, trigger glob or None)."""

    def __init__(self, logs: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.server.stdout.readline() == "ready\n", "the fork server did not start"
        self.logs, self.n = logs, 0

    def __call__(self, argv: list[str], kill: tuple[float, str | None] | None = None, watch: Path | None = None) -> dict:
        self.n += 1
        log = self.logs / f"{self.n:02d}-{argv[0]}.log"
        request = {"argv": argv, "kill_after": kill and kill[0], "trigger": kill and kill[1],
                   "watch": watch and str(watch), "log": str(log)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        result = json.loads(self.server.stdout.readline())
        print(f"{self.n:02d} ferry {' '.join(argv[:1] + argv[-3:])}: kill {kill}: {result}", file=sys.stderr)
        result["log"] = log.read_text(errors="replace") if log.exists() else ""
        if not result["killed"]:
            assert result["rc"] == 0, f"ferry {' '.join(argv)} failed:\n{result['log']}"
        return result

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


def listed_files(path: Path) -> dict[str, str]:
    """{file: sha256} that a checkpoint's or an artifact's ferry.json lists."""
    m = json.loads((path / "ferry.json").read_text(encoding="utf-8"))
    if m["stage"] == "finetune":
        return {name: info["sha256"] for name, info in m["files"].items()}
    return {v["file"]: v["sha256"] for v in m["variants"].values()}


def assert_complete_or_absent(path: Path, what: str) -> bool:
    """True when ``path`` is a complete directory, False when absent; anything else fails."""
    if not os.path.lexists(path):
        return False
    assert (path / "ferry.json").is_file(), f"{what}: {path} exists without ferry.json: {sorted(os.listdir(path))}"
    listed = listed_files(path)
    assert listed, f"{what}: ferry.json lists no file"
    for name, digest in listed.items():
        assert (path / name).is_file() and sha256_file(path / name) == digest, f"{what}: {name} is missing or differs"
    return True


def kill_at(rng: random.Random, i: int, whole: float, late: tuple[str, float]) -> tuple[float, str | None]:
    """When trial ``i`` kills its run: for even ``i``, uniform over a run of ``whole`` seconds; for odd
    ``i``, uniform over the ``late[1]`` seconds after a file matching the glob ``late[0]`` appears (the
    phase that writes and publishes the output, where a kill is most likely to leave half of it)."""
    if i % 2 == 0:
        return rng.uniform(0.02, 1.0) * whole, None
    return rng.uniform(0.0, 1.05) * late[1], late[0]


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_old_or_new_never_half(tmp_path, tiny_bert, tiny_data):
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "runs"
    out.mkdir()
    rng = random.Random(SEED)
    finetune = ["finetune", "--model", str(tiny_bert), "--train", str(tiny_data), "--epochs", "3", "--patience", "0",
                "--batch-size", "8", "--max-length", "24", "--learning-rate", "5e-3", "--calibration-samples", "8",
                "--seed", "7", "--quiet", "--overwrite"]
    export = ["export", "--variants", "fp32", "--overwrite", "--optimization", "O1", "--threads", "1",
              "--parity-batch-sizes", "1,2", "--parity-seq-lengths", "8", "--quiet"]
    # this run's checkpoint staging once it holds the first file written there; the artifact's staging once
    # it holds config.json, copied after the variants are written and before parity, the manifest and the
    # publish (ferry.json itself exists for only the milliseconds of the fsync before the rename: a 5 ms
    # poll can miss it, and did on CI)
    ckpt_written, art_written = ".{name}.tmp-{pid}-*/metrics.jsonl", ".{name}.tmp-{pid}-*/config.json"
    run = Runner(logs)
    try:
        ref = out / "reference"
        r = run([*finetune, "--output", str(ref)], kill=(None, str(out / ckpt_written.format(name="reference", pid="{pid}"))))
        assert assert_complete_or_absent(ref, "reference") and r["triggered"], r
        whole, late = r["seconds"], (str(out / ckpt_written.format(name="ckpt", pid="{pid}")), r["seconds"] - r["triggered"])
        weights = (ref / "model.safetensors").read_bytes()

        # Fine-tuning: each trial resumes what the previous one left (or starts over), and is killed.
        ckpt = out / "ckpt"

        def resumable() -> bool:  # a finished epoch is saved (in resume.old if killed while replacing it)
            return any((out / ".ckpt.incomplete" / d / "state.json").is_file() for d in ("resume", "resume.old"))

        outcomes = []
        for i in range(FINETUNE_TRIALS):
            had_state = resumable()
            kill = kill_at(rng, i, whole, late)
            r = run([*finetune, "--output", str(ckpt), *(["--resume"] if had_state else [])], kill,
                    watch=out / ".ckpt.incomplete" / "resume" / "state.json")
            outcomes.append("killed" if r["killed"] else "finished")
            if assert_complete_or_absent(ckpt, f"finetune killed {kill}"):
                assert (ckpt / "model.safetensors").read_bytes() == weights, "a complete checkpoint with other weights"
            elif had_state or r["seen"]:  # no checkpoint yet: the finished epochs must not be lost
                assert resumable(), f"finetune killed {kill} lost the resume state"
        assert outcomes.count("killed") >= FINETUNE_TRIALS // 2, outcomes
        run([*finetune, "--output", str(ckpt), *(["--resume"] if resumable() else [])])
        assert assert_complete_or_absent(ckpt, "the last run")
        assert (ckpt / "model.safetensors").read_bytes() == weights

        # Export: the first run writes a new artifact, the trials replace it (--overwrite): old or new, never half.
        art = out / "artifact"
        r = run([*export, str(ref), "--output", str(art)], kill=(None, str(out / art_written.format(name="artifact", pid="{pid}"))))
        assert assert_complete_or_absent(art, "export") and r["triggered"], r
        whole, late = r["seconds"], (str(out / art_written.format(name="artifact", pid="{pid}")), r["seconds"] - r["triggered"])
        for i in range(EXPORT_TRIALS):
            kill = kill_at(rng, i, whole, late)
            run([*export, str(ref), "--output", str(art)], kill)
            assert assert_complete_or_absent(art, f"export killed {kill}"), "the old artifact is gone"
        fresh = out / "fresh"
        late = (str(out / art_written.format(name="fresh", pid="{pid}")), late[1])
        for i in range(FRESH_EXPORT_TRIALS):
            kill = kill_at(rng, i, whole, late)
            run([*export, str(ref), "--output", str(fresh)], kill)
            assert_complete_or_absent(fresh, f"export killed {kill}")
    finally:
        run.close()
    # What killed runs left beside an output is recognized as theirs and removed by the next run
    # on that output (the last finetune did it for ckpt; clean_stale is what a run calls first).
    # A killed run's lock file stays (unlocked): the next run locks it and removes it when done.
    clean_stale(art)
    left = sorted(p.name for p in out.iterdir())
    assert [n for n in left if n.startswith((".artifact", ".ckpt")) and n != ".artifact.lock"] == [], left

"""Calling the `ferry` CLI in-process from tests, and the settings that keep tiny runs fast."""

from __future__ import annotations

from pathlib import Path

from ferry.cli import main

# `ferry export` and `ferry parity` on a tiny text model: one thread, a few parity shapes.
EXPORT_FAST = ["--quiet", "--threads", "1", "--parity-batch-sizes", "1,3", "--parity-seq-lengths", "8,24,64"]
# `ferry finetune` on tiny text data in about a second.
FINETUNE_FAST = ["--epochs", "2", "--batch-size", "16", "--max-length", "32", "--learning-rate", "5e-3",
                 "--calibration-samples", "20", "--quiet"]


def finetune_argv(model: Path, train: Path | str, output: Path, *extra: str) -> list[str]:
    """`ferry finetune` of ``model`` on ``train`` with FINETUNE_FAST; ``extra`` flags come last and win."""
    return ["finetune", "--model", str(model), "--train", str(train), "--output", str(output), *FINETUNE_FAST, *extra]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `ferry ARGV`."""
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def run_ok(argv: list[str], capsys) -> str:
    """Assert `ferry ARGV` exits 0 (showing its stderr if not); its stdout."""
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    return out


def run_fails(argv: list[str], capsys, *needles: str) -> str:
    """Assert exit status 2 and exactly one error line (no traceback) containing every needle."""
    rc, out, err = run(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"ferry {argv[0]}: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]

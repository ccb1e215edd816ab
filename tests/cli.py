"""Calling the `ferry` CLI in-process from tests."""

from __future__ import annotations

from ferry.cli import main


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `ferry ARGV`."""
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


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

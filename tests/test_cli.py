"""ferry/cli.py: one line and exit status 2 for bad input, one line and exit status 1 for a bug,
the traceback only with --debug or FERRY_DEBUG=1."""

from __future__ import annotations

import dataclasses
import errno
import json

import pytest

from ferry import cli
from ferry.config import opt
from ferry.errors import ConfigError
from ferry.files import read_json_object, read_manifest
from tests.cli import run, run_fails


@dataclasses.dataclass
class BoomArgs:
    """Options of the test verb `ferry boom`."""

    path: str = opt("x", "a path")
    label_column: str = opt("label", "a column")


RAISE: list[BaseException] = []


def boom(args: BoomArgs) -> int:
    if RAISE:
        raise RAISE[0]
    print(f"label column {args.label_column}")
    return 0


@pytest.fixture
def verb(monkeypatch):
    """A `ferry boom` verb that raises whatever the test puts in RAISE."""
    monkeypatch.setitem(cli.VERBS, "boom", (__name__, "BoomArgs", "boom", "raise on purpose"))
    monkeypatch.delenv("FERRY_DEBUG", raising=False)
    RAISE.clear()
    yield RAISE
    RAISE.clear()


def test_a_bug_is_one_line_and_exit_status_1(verb, capsys):
    verb.append(ZeroDivisionError("division by zero\nsecond line"))
    rc, out, err = run(["boom"], capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.splitlines() == [
        "ferry boom: internal error: ZeroDivisionError: division by zero (rerun with --debug for the traceback)"
    ]


def test_debug_flag_and_environment_show_the_traceback(verb, capsys, monkeypatch):
    verb.append(KeyError("k"))
    with pytest.raises(KeyError):
        cli.main(["--debug", "boom"])
    monkeypatch.setenv("FERRY_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["boom"])
    monkeypatch.setenv("FERRY_DEBUG", "0")
    assert run(["boom"], capsys)[0] == 1
    # --debug changes nothing for bad input: still one line, exit status 2
    verb[:] = [ConfigError("--path bad")]
    rc, _, err = run(["--debug", "boom"], capsys)
    assert rc == 2 and err == "ferry boom: error: --path bad\n"


@pytest.mark.parametrize("exc, needles", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/train.csv"), ["/data/train.csv: Permission denied"]),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/run"), ["/data/run: Is a directory", "give a file"]),
    (OSError(errno.ENOSPC, "No space left on device"), ["No space left on device", "free disk space"]),
])
def test_os_errors_are_one_line_naming_the_file(verb, capsys, exc, needles):
    verb.append(exc)
    run_fails(["boom"], capsys, *needles)


def test_an_option_value_that_starts_with_dashes(verb, capsys):
    line = run_fails(["boom", "--label-column", "--1"], capsys, "--label-column", "expected one argument",
                     "--label-column=VALUE")
    assert "usage" not in line
    assert run(["boom", "--label-column=--1"], capsys)[1] == "label column --1\n"
    run_fails(["boom", "--bogus"], capsys, "unrecognized arguments: --bogus", "ferry boom --help")


def test_config_that_is_a_directory(verb, tmp_path, capsys):
    run_fails(["boom", "--config", str(tmp_path)], capsys, f"--config {tmp_path}: is a directory")


def test_config_with_an_integer_of_5000_digits(verb, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("path: " + "9" * 5000 + "\n")
    run_fails(["boom", "--config", str(cfg)], capsys, f"--config {cfg}: not valid YAML")


def test_json_readers_refuse_a_5000_digit_integer_and_a_directory(tmp_path):
    from ferry.errors import FerryError

    p = tmp_path / "ferry.json"
    p.write_text('{"stage": ' + "9" * 5000 + "}")
    with pytest.raises(FerryError, match="not valid JSON"):
        read_json_object(p, "missing")
    p.unlink()
    p.mkdir()
    with pytest.raises(FerryError, match=f"{p}: is a directory"):
        read_manifest(tmp_path)
    assert json.loads("1")  # (json itself untouched)

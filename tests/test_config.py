"""ferry/config.py: dataclass options, YAML config files, flags over files, collected errors."""

from __future__ import annotations

import dataclasses

import pytest

from ferry.config import opt, parse, positive
from ferry.errors import ConfigError


@dataclasses.dataclass
class Opts:
    source: str | None = opt(None, "input", positional=True)
    epochs: int = opt(3, "epochs", check=positive)
    rate: float = opt(0.1, "rate")
    mode: str = opt("a", "mode", choices=("a", "b"))
    fast: bool = opt(False, "fast")
    names: list[str] = opt(["x"], "names")
    limit: int | None = opt(None, "limit")


def p(argv):
    return parse(Opts, argv, prog="t", description="d")


def test_defaults_and_flags():
    o = p(["in.csv"])
    assert o == Opts("in.csv", 3, 0.1, "a", False, ["x"], None)
    o = p(["in.csv", "--epochs", "5", "--rate", "2e-3", "--mode", "b", "--fast", "--names", "a,b", "--limit", "7"])
    assert (o.epochs, o.rate, o.mode, o.fast, o.names, o.limit) == (5, 0.002, "b", True, ["a", "b"], 7)
    assert p(["in.csv", "--no-fast"]).fast is False
    assert p(["in.csv", "--limit", "none"]).limit is None


def test_config_file_and_flags_override_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("source: from-file.csv\nepochs: 9\nmode: b\nfast: true\nnames: [u, v]\n")
    o = p(["--config", str(cfg)])
    assert (o.source, o.epochs, o.mode, o.fast, o.names) == ("from-file.csv", 9, "b", True, ["u", "v"])
    o = p(["--config", str(cfg), "--epochs", "2", "other.csv"])
    assert (o.source, o.epochs, o.mode) == ("other.csv", 2, "b")


def test_unknown_key_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\nepoch: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        p(["x", "--config", str(cfg)])


def test_every_invalid_value_is_reported_at_once(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rate: fast\n")
    with pytest.raises(ConfigError) as e:
        p(["x", "--config", str(cfg), "--epochs", "0", "--mode", "c"])
    msg = str(e.value)
    assert "--epochs must be > 0" in msg
    assert "--mode 'c' is not one of: a, b" in msg
    assert f"'rate' in {cfg} must be a number" in msg
    assert len(e.value.problems) == 3


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        p(["x", "--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        p(["x", "--config", str(bad)])
    bad.write_text("epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        p(["x", "--config", str(bad)])


def test_integer_field_refuses_a_fraction():
    with pytest.raises(ConfigError, match="--epochs must be an integer"):
        p(["x", "--epochs", "1.5"])


@dataclasses.dataclass
class Many:
    source: str | None = opt(None, "input", positional=True, required=False)
    paths: list[str] = opt([], "paths", many=True)


def test_many_takes_space_separated_values_kept_whole_and_an_optional_positional(tmp_path):
    o = parse(Many, ["--paths", "runs/a,1", "runs/b"], prog="t", description="d")
    assert o == Many(None, ["runs/a,1", "runs/b"])  # a comma in a path does not split it
    cfg = tmp_path / "c.yaml"
    cfg.write_text("paths: [x, y]\n")
    assert parse(Many, ["--config", str(cfg)], prog="t", description="d").paths == ["x", "y"]
    with pytest.raises(ConfigError, match="SOURCE is required"):
        p([])  # a positional without required=False still is


@dataclasses.dataclass
class Percent:
    share: float = opt(0.5, "what share of 100% to keep, e.g. 125% of the rate")
    tag: str = opt("50%", "a tag")


def test_a_percent_sign_in_a_help_text_or_a_default_is_printed_not_read_as_a_format(capsys):
    with pytest.raises(SystemExit) as e:
        parse(Percent, ["--help"], prog="t", description="d")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "100% to keep, e.g. 125% of the rate" in out and "(default: 50%)" in out

"""The signature is the command line: options are dataclass fields.

Each verb declares its options as one dataclass whose fields carry their help text
(``opt(default, "help")``). :func:`parse` builds the argparse parser from it, reads
``--config FILE.yaml`` (same keys as the fields, flat), lets flags override the file,
and collects every invalid value before failing with one :class:`ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from ferry.errors import ConfigError, first_line

T = TypeVar("T")


def opt(
    default: Any,
    help: str,
    *,
    choices: typing.Sequence[Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    positional: bool = False,
    required: bool = True,
    many: bool = False,
    short: str | None = None,
    const: Any = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the default value (the only place defaults are written).
        help: one sentence for ``--help``.
        choices: allowed values, checked for flags and config files alike.
        check: returns an error message for an invalid value, else None.
        positional: a positional argument instead of a ``--flag``.
        required: for a positional without a default: whether it must be given (the
            function then checks what may stand in for it).
        many: for a list: the flag takes several space-separated values (paths that may
            hold commas), instead of one comma-separated value.
        short: an optional one-letter alias such as ``-o``.
        const: the value of the flag given without a value (its value is then optional).
    """
    meta = {"help": help, "choices": choices, "check": check, "positional": positional, "required": required, "many": many,
            "short": short, "const": const}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive(value: Any) -> str | None:
    return None if value is None or value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value is None or value >= 0 else "must be >= 0"


def fraction(value: Any) -> str | None:
    return None if value is None or 0 <= value < 1 else "must be in [0, 1)"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the scalar or list type, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    base, nullable = _base_type(tp)
    if value is None:
        if nullable:
            return None
        raise ValueError("must not be empty")
    if isinstance(value, str) and nullable and value.lower() in ("none", "null", ""):
        return None
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"must be a list, got {value!r}")
        return [_coerce(v.strip() if isinstance(v, str) else v, item, name) for v in items if v != ""]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"must be a string, got {value!r}")
        return str(value)
    return value


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {path}: is a directory; give a .yaml file")
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: also undecodable bytes, an integer of 4,300+ digits
        first = first_line(e)
        raise ConfigError(f"--config {path}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ConfigError line (the CLI's convention) instead of usage text."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        hint = ""
        if m := re.match(r"argument (-[^\s/:]+)[^:]*: expected one argument", message):
            hint = f" (a value that starts with '-' is written {m.group(1)}=VALUE)"
        raise ConfigError(f"{message}{hint}; see '{self.prog} --help'")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.HelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        base, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %: a literal '%' is '%%'
        if meta.get("choices"):
            help_text += f" [{'|'.join(map(str, meta['choices']))}]"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if meta.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper(), nargs="?", **kwargs)
            continue
        names = [flag_name(f.name)] + ([meta["short"]] if meta.get("short") else [])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta.get("many"):
            kwargs["metavar"], kwargs["nargs"] = "PATH", "+"
        else:
            kwargs["metavar"] = f.name.upper() if typing.get_origin(base) is not list else "A,B,..."
        if meta.get("const") is not None:
            kwargs["nargs"], kwargs["const"] = "?", meta["const"]
        # Parse with SUPPRESS (to tell flags from config keys), but show the real default.
        if "default" not in help_text:
            kwargs["help"] = f"{help_text} (default: {str(_show(default)).replace('%', '%%')})"
        parser.add_argument(*names, dest=f.name, **kwargs)
    return parser


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def parse(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Parse ``argv`` (flags, ``--config``) into an instance of the dataclass ``cls``.

    Raises:
        ConfigError: naming every unknown key and invalid value at once.
    """
    parser = build_parser(cls, prog, description)
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    config_path = ns.pop("config", None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    raw: dict[str, Any] = {}
    problems: list[str] = []
    if config_path:
        for key, value in _load_yaml(config_path).items():
            name = str(key).replace("-", "_")
            if name not in fields:
                problems.append(
                    f"--config {config_path}: unknown key '{key}' (valid keys: {', '.join(sorted(fields))})"
                )
            else:
                raw[name] = value
    raw.update(ns)  # flags override the file
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        f = fields[name]
        where = flag_name(name) if name in ns else f"'{name}' in {config_path}"
        if f.metadata.get("positional") and name in ns:
            where = name.upper()
        try:
            value = _coerce(value, hints[name], name)
        except ValueError as e:
            problems.append(f"{where} {e}")
            continue
        values[name] = value
    for name, f in fields.items():
        if f.metadata.get("positional") and f.metadata.get("required") and f.default is None and values.get(name) is None:
            problems.append(f"{name.upper()} is required{_taken_by_optional_value(fields, ns, name)}")
    for name, value in values.items():
        meta = fields[name].metadata
        where = flag_name(name) if name in ns else f"'{name}' in {config_path}"
        choices = meta.get("choices")
        if choices and value is not None:
            bad = [v for v in (value if isinstance(value, list) else [value]) if v not in choices]
            if bad:
                problems.append(f"{where} {bad[0]!r} is not one of: {', '.join(map(str, choices))}")
                continue
        check = meta.get("check")
        if check and (msg := check(value)):
            problems.append(f"{where} {msg}")
    if problems:
        raise ConfigError(problems)
    return cls(**values)


def _taken_by_optional_value(fields: dict[str, Any], ns: dict[str, Any], missing: str) -> str:
    """A hint when a flag whose value is optional (``--ray [ADDRESS]``) took the missing positional:
    ``ferry predict --ray ARTIFACT ...`` reads ARTIFACT as the address."""
    for name, value in ns.items():
        const = fields[name].metadata.get("const") if name in fields else None
        if const is not None and value != const and isinstance(value, str) and Path(value).expanduser().exists():
            return f" ({flag_name(name)} took {value} as its value: write {missing.upper()} before {flag_name(name)})"
    return ""


def to_dict(args: Any) -> dict[str, Any]:
    """The settings as a plain dict, for manifests."""
    return dataclasses.asdict(args)

"""Files shared by every stage: packaged resources, hashes, manifests, atomic directories."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Iterator

from ferry import __version__
from ferry.errors import FerryError

MANIFEST = "ferry.json"
PKG_PREFIX = "pkg:"


def resolve(path: str) -> Path:
    """Resolve ``pkg:<package>/<sub/path>`` to a folder inside an installed package.

    The package is located, never imported (data packages may run code on import).
    Any other string is returned as a plain path.
    """
    if not path.startswith(PKG_PREFIX):
        return Path(path).expanduser()
    package, _, sub = path[len(PKG_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FerryError(f"{path}: package '{package}' is not installed (pip install {dist})")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions(*names: str) -> dict[str, str]:
    out = {"python": platform.python_version(), "ferry": __version__}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json_object(path: Path, missing: str, where: str | None = None, error: type[FerryError] = FerryError) -> dict[str, Any]:
    """A JSON object from ``path``; ``error`` (a FerryError) with ``missing`` when there is no
    file, and naming ``where`` (default: the path) when it is not a JSON object."""
    where = where or str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing) from None
    except IsADirectoryError:
        raise error(f"{where}: is a directory, not a JSON file") from None
    except OSError as e:
        raise error(f"{where}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise error(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object")
    return data


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read ``ferry.json``; a missing or unreadable one raises FerryError naming it."""
    return read_json_object(Path(directory) / MANIFEST, f"{directory}: no {MANIFEST}")


def check_output_dir(output: Path, overwrite: bool, inputs: list[Path] = ()) -> None:  # type: ignore[assignment]
    """Refuse an existing output without --overwrite, and an output inside a stage's input."""
    out = output.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if out == src or src in out.parents:
            raise FerryError(f"--output {output} is inside the input {inp}; choose a directory outside it")
        if out in src.parents:
            raise FerryError(f"--output {output} contains the input {inp}; choose another directory")
    if out.exists() and not overwrite:
        raise FerryError(f"--output {output} already exists; pass --overwrite to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only file system, no permission
        raise FerryError(f"--output {output}: cannot create {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise FerryError(f"--output {output}: cannot write in {parent}")


def staging_dir(output: Path, tag: str = "tmp") -> Path:
    """The temporary sibling an output is built in before it is renamed into place."""
    return output.parent / f".{output.name}.{tag}"


def publish(staging: Path, output: Path) -> None:
    """Move a completed staging directory to ``output``, replacing an old one last."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(output: Path, overwrite: bool, inputs: list[Path] = ()) -> Iterator[Path]:  # type: ignore[assignment]
    """Yield a fresh staging directory; publish it as ``output`` only if the block succeeds.

    On any exception the staging directory is removed, so an interrupted write never
    leaves a directory that looks complete.
    """
    output = Path(output)
    check_output_dir(output, overwrite, inputs)
    staging = staging_dir(output, f"tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

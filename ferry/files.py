"""Files shared by every stage: packaged resources, hashes, manifests, atomic directories."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

from ferry import __version__
from ferry.errors import FerryError

try:
    import fcntl
except ImportError:  # not POSIX: no lock between runs
    fcntl = None  # type: ignore[assignment]

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
    """Write JSON via a temporary file, fsync and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
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
    """A fixed sibling of ``output`` (``.<name>.<tag>``), such as fine-tuning's resume state."""
    return output.parent / f".{output.name}.{tag}"


def unique_staging(output: Path, kind: str = "tmp") -> Path:
    """A sibling name no other run uses: ``.<name>.<kind>-<pid>-<random>`` (kind: tmp or old)."""
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _leftover(output: Path) -> re.Pattern[str]:
    """The names of the directories a run on ``output`` leaves behind only when it is killed
    (``.<name>.tmp-<pid>`` is what ferry before unique names left)."""
    return re.compile(rf"\.{re.escape(output.name)}\.(?P<kind>tmp|old)-(?P<pid>\d+)(-[0-9a-f]+)?")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(output: Path) -> list[Path]:
    """Remove the staging directories of killed runs on ``output`` (their pid is dead); returns them.

    A killed ``--overwrite`` may have moved the complete old output aside (``.old-``) before
    moving the new one in: if ``output`` is missing, that old directory is put back instead.
    Call it holding :func:`output_lock`.
    """
    pattern, removed = _leftover(output), []
    for entry in sorted(output.parent.iterdir()) if output.parent.is_dir() else []:
        m = pattern.fullmatch(entry.name)
        if not m or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not os.path.lexists(output) and entry.is_dir():
            os.rename(entry, output)
            fsync_dir(output.parent)
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def discard(path: Path, output: Path) -> None:
    """Delete the directory ``path`` (beside ``output``) so a kill midway leaves it whole or gone:
    it is renamed to a staging name first, which :func:`clean_stale` removes if the kill comes later."""
    if not path.exists():
        return
    trash = unique_staging(output)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


_held: dict[Path, int] = {}  # outputs this process holds the lock of, with the nesting depth


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` (``flock`` on ``.<name>.lock`` beside it) for a run.

    A second run on the same output fails at once with a FerryError naming the holder's pid.
    Re-entrant within a process. The lock file is removed on release; a run that finds the file
    it locked already replaced locks again.
    """
    key = Path(os.path.abspath(output))
    if key in _held or fcntl is None:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    path = output.parent / f".{output.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FerryError(
                f"--output {output} is being written by another ferry run (pid {holder}); "
                "wait for it to finish, or choose another --output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file we opened before it unlocked: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (``root`` included), bottom up."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            f = os.path.join(dirpath, name)
            if os.path.islink(f):
                continue
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2): True when done, False where the system or file system lacks it."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd = -100
    if fn(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def publish(staging: Path, output: Path, overwrite: bool = False) -> None:
    """Make the complete directory ``staging`` the ``output``, in one rename.

    Everything under ``staging`` is fsync'ed first, the parent directory after. ``output`` must
    still be absent, unless ``overwrite``: then the old and new directories are swapped atomically
    (renameat2 RENAME_EXCHANGE; where that is missing the old one is renamed aside, the new one
    in) and the old one is deleted last.
    """
    fsync_tree(staging)
    parent = output.parent
    if not os.path.lexists(output):
        try:
            done = _renameat2(staging, output, RENAME_NOREPLACE)
        except FileExistsError:
            done = False
        if not done and not os.path.lexists(output):
            os.rename(staging, output)
            done = True
        if done:
            fsync_dir(parent)
            return
    if not overwrite:
        raise FerryError(f"--output {output} appeared while this run was writing it; nothing was replaced; "
                         "pass --overwrite to replace it")
    if _renameat2(staging, output, RENAME_EXCHANGE):
        fsync_dir(parent)
        _remove(staging)  # now the old output
        return
    old = unique_staging(output, "old")
    os.rename(output, old)
    os.rename(staging, output)
    fsync_dir(parent)
    _remove(old)


@contextlib.contextmanager
def atomic_dir(output: Path, overwrite: bool, inputs: list[Path] = ()) -> Iterator[Path]:  # type: ignore[assignment]
    """Yield a fresh staging directory; publish it as ``output`` only if the block succeeds.

    The run holds :func:`output_lock` on ``output`` and first removes what killed runs left.
    On any exception the staging directory is removed, so an interrupted write never
    leaves a directory that looks complete.
    """
    output = Path(output)
    check_output_dir(output, overwrite, inputs)
    with output_lock(output):
        clean_stale(output)
        staging = unique_staging(output)
        staging.mkdir()
        try:
            yield staging
            publish(staging, output, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

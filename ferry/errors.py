"""Errors a person can act on. Each is printed as one line and exits with status 2."""

import errno

# What to do about an OSError the CLI did not expect, by errno.
OS_ERROR_HINTS = {
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENOENT: "check the path",
    errno.ENOSPC: "free disk space and rerun",
    errno.EDQUOT: "free disk space (quota) and rerun",
    errno.EROFS: "choose a writable location",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
    errno.ENAMETOOLONG: "choose a shorter name",
}


def one_line(text: str) -> str:
    """``text`` with its line breaks escaped, so that an error is one line whatever it quotes."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of ``e``'s message (its type's name if it has none), at most ``limit`` characters:
    what an error of ferry's quotes from a library's exception."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the file(s), the system's reason, what to do."""
    where = f"{e.filename}: " if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}: "
    reason = e.strerror or str(e) or type(e).__name__
    hint = OS_ERROR_HINTS.get(e.errno, "check the path and the disk")  # type: ignore[arg-type]
    return one_line(f"{where}{reason}; {hint}")


class FerryError(Exception):
    """Bad input or environment: printed without a traceback, exit status 2."""

    exit_code = 2


class ConfigError(FerryError):
    """One or more invalid settings; the message lists all of them."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(FerryError):
    """A data file is missing, malformed, or does not fit the task."""


class CheckpointError(FerryError):
    """A checkpoint directory is missing, incomplete or corrupted."""


class ArtifactError(FerryError):
    """An artifact directory is missing, incomplete or corrupted."""


class ParityError(FerryError):
    """An exported model disagrees with its PyTorch source beyond the gate."""

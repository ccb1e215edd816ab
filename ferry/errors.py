"""Errors a person can act on. Each is printed as one line and exits with status 2."""


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

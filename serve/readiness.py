"""Readiness shared by the workers of one server: ``/readyz`` is 200 only when every worker is ready.

BentoML asks ``__is_ready__`` of whichever worker the kernel hands the probe to, so with several
workers a probe could see one warmed-up worker answer 200 while another is still warming up (or
failed). Each worker whose warm-up inference succeeded leaves a marker file named by its pid in a
directory of its server (the workers' parent process, BentoML's arbiter); a worker is ready for
``/readyz`` when the markers of live workers of that server number the configured worker count.
A worker whose warm-up fails stops the whole server (serve/service.py), so "not ready" never
lasts in one worker while another serves.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class SharedReadiness:
    """Marker files of the ready workers of the server process ``server_pid``."""

    def __init__(self, workers: int, server_pid: int | None = None, root: str | Path | None = None):
        self.workers = workers
        self.server_pid = os.getppid() if server_pid is None else server_pid
        self.dir = Path(root or tempfile.gettempdir()) / f"ferry-ready-{os.getuid()}-{self.server_pid}"

    def _own_dir(self) -> Path:
        """The marker directory, created private; one that is not a directory of this user is refused."""
        try:
            self.dir.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = os.lstat(self.dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise RuntimeError(f"{self.dir} is not a directory of this user; cannot share readiness")
        return self.dir

    def mark_ready(self, pid: int | None = None) -> None:
        (self._own_dir() / str(pid or os.getpid())).touch()

    def clear(self, pid: int | None = None) -> None:
        try:
            (self.dir / str(pid or os.getpid())).unlink()
        except FileNotFoundError:
            pass
        try:
            self.dir.rmdir()  # the last worker out removes the directory
        except OSError:
            pass

    def claim_stop(self) -> bool:
        """True for the first worker of this server to stop it, the one that says why: with several
        workers failing the same way at start, the server stops with one line, not one per worker.
        (The claim file stays in the server's directory, which the stopped server no longer uses.)"""
        try:
            fd = os.open(self._own_dir() / "stopping", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def ready_workers(self) -> int:
        """How many live workers of this server have marked themselves ready."""
        import psutil

        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return 0
        count = 0
        for name in names:
            if not name.isdigit():
                continue
            try:  # a worker that died (and was replaced) left its marker: only live children count
                if psutil.Process(int(name)).ppid() == self.server_pid:
                    count += 1
            except psutil.Error:
                continue
        return count

    def all_ready(self) -> bool:
        return self.ready_workers() >= self.workers

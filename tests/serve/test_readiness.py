"""serve/readiness.py: /readyz is 200 only when every live worker of the server has marked itself ready."""

from __future__ import annotations

import os
import subprocess
import sys

from serve.readiness import SharedReadiness


def workers(n: int) -> list[subprocess.Popen]:
    """``n`` processes standing for the workers of a server: children of this test process."""
    return [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(n)]


def test_ready_only_when_every_live_worker_is(tmp_path):
    procs = workers(2)
    try:
        r = SharedReadiness(2, server_pid=os.getpid(), root=tmp_path)
        assert not r.all_ready() and r.ready_workers() == 0
        r.mark_ready(procs[0].pid)
        assert r.ready_workers() == 1 and not r.all_ready()  # one worker warm, the other not yet: not ready
        r.mark_ready(procs[1].pid)
        assert r.all_ready()
        procs[1].kill()
        procs[1].wait()
        assert not r.all_ready()  # a dead worker's marker does not count (BentoML respawns it unready)
        r.mark_ready(os.getpid())  # a process that is not a worker of this server does not count either
        assert r.ready_workers() == 1
        r.clear(procs[0].pid)
        r.clear(os.getpid())
        r.clear(procs[1].pid)
        assert not r.dir.exists()  # the last one out removes the directory
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_marker_directory_of_another_kind_is_refused(tmp_path):
    r = SharedReadiness(1, server_pid=os.getpid(), root=tmp_path)
    r.dir.write_text("not a directory")
    try:
        r.mark_ready()
    except RuntimeError as e:
        assert "not a directory of this user" in str(e)
    else:
        raise AssertionError("a file in place of the marker directory was accepted")


def test_only_the_first_worker_to_stop_the_server_claims_it(tmp_path):
    """Each worker has its own SharedReadiness of the same server: one claim wins, whichever comes first."""
    first, second = (SharedReadiness(2, server_pid=12345, root=tmp_path) for _ in range(2))
    assert first.claim_stop() is True
    assert second.claim_stop() is False and first.claim_stop() is False
    assert SharedReadiness(2, server_pid=54321, root=tmp_path).claim_stop() is True  # another server's own claim

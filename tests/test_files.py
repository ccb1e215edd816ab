"""ferry/files.py: atomic output directories (unique staging, a lock per output, fsync, one rename,
stale leftovers of killed runs cleaned)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ferry import files
from ferry.errors import FerryError

ROOT = Path(__file__).resolve().parents[1]


def write_output(output: Path, content: str, overwrite: bool = False) -> Path:
    with files.atomic_dir(output, overwrite) as staging:
        (staging / "a.txt").write_text(content)
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text(content)
    return output


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_staging_names_are_unique_per_run(tmp_path):
    out = tmp_path / "out"
    seen = []
    for _ in range(2):
        with files.atomic_dir(out, overwrite=True) as staging:
            seen.append(staging.name)
            assert re.fullmatch(rf"\.out\.tmp-{os.getpid()}-[0-9a-f]{{8}}", staging.name), staging.name
    assert seen[0] != seen[1]


def test_publish_leaves_only_the_output(tmp_path):
    write_output(tmp_path / "out", "one")
    write_output(tmp_path / "out", "two", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no old copy, no lock file
    assert (tmp_path / "out" / "sub" / "b.txt").read_text() == "two"


def test_a_second_concurrent_run_fails_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom ferry import files\n"
         f"with files.atomic_dir(Path({str(out)!r}), False) as s:\n    print('in', flush=True)\n    sys.stdin.readline()\n"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "in\n"
        with pytest.raises(FerryError, match=rf"--output {re.escape(str(out))} is being written by another ferry run "
                                             rf"\(pid {holder.pid}\)"):
            write_output(out, "mine")
        assert not out.exists()
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0 and out.is_dir()
    write_output(out, "mine", overwrite=True)  # the lock went with the holder


def test_publish_refuses_an_output_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FerryError, match="appeared while this run was writing it; nothing was replaced"):
        with files.atomic_dir(out, overwrite=False) as staging:
            (staging / "a.txt").write_text("mine")
            out.mkdir()  # another writer (not ferry) made it, empty
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with files.atomic_dir(tmp_path / "other", overwrite=True) as staging:
        (staging / "a.txt").write_text("mine")
        write_output(tmp_path / "other", "theirs")  # the same process, re-entrant lock
    assert (tmp_path / "other" / "a.txt").read_text() == "mine"


def test_publish_fsyncs_every_file_and_directory_and_the_parent(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    out = tmp_path / "out"
    with files.atomic_dir(out, overwrite=False) as staging:
        (staging / "a.txt").write_text("x")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("x")
    names = [Path(s).relative_to(tmp_path).as_posix() if s.startswith(str(tmp_path)) else s for s in synced]
    base = staging.name
    assert {f"{base}/a.txt", f"{base}/sub/b.txt", f"{base}/sub", base} <= set(names)
    assert names[-1] == "."  # the parent, after the rename


def test_killed_runs_leftovers_are_cleaned_and_a_moved_aside_output_restored(tmp_path):
    out = tmp_path / "out"
    dead, alive = dead_pid(), os.getppid()
    for name in (f".out.tmp-{dead}-0123abcd", f".out.tmp-{dead}", f".out.tmp-{alive}-89abcdef", f".other.tmp-{dead}-00"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "half").write_text("x")
    (tmp_path / f".out.old-{dead}-feedbeef").mkdir()  # a killed --overwrite moved the old output aside ...
    (tmp_path / f".out.old-{dead}-feedbeef" / "a.txt").write_text("old")  # ... and died before moving the new in
    assert files.clean_stale(out) == [tmp_path / f".out.tmp-{dead}", tmp_path / f".out.tmp-{dead}-0123abcd"]
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead}-00", f".out.tmp-{alive}-89abcdef", "out"]
    # atomic_dir cleans before it writes
    (tmp_path / f".out.tmp-{dead}-0123abcd").mkdir()
    write_output(out, "new", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead}-00", f".out.tmp-{alive}-89abcdef", "out"]


def test_overwrite_without_renameat2_moves_the_old_aside_then_deletes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_renameat2", lambda src, dst, flags: False)
    write_output(tmp_path / "out", "one")
    write_output(tmp_path / "out", "two", overwrite=True)
    assert (tmp_path / "out" / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

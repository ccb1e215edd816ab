"""The output of `ferry predict`: written beside its destination, resumable, published in one rename.

A run keeps its work in ``.<OUT name>.predict/`` beside ``OUT``:

- ``state.json``: what the run is (the fingerprint: artifact, variant, input sha256, every
  setting that changes the bytes written) and how far it got (chunks, rows, output bytes,
  errors), rewritten atomically after each chunk;
- ``part``: the output so far (CSV, TSV, JSON Lines; appended, flushed and fsync'ed chunk by
  chunk) or ``parts/NNNNNN.arrow`` (Parquet, one Arrow file per chunk, since a Parquet file
  cannot be appended to).

``--resume`` checks the fingerprint, cuts ``part`` back to the bytes of the last chunk the
state records (a chunk written half when the run died is written again) and goes on from the
next chunk. At the end the output is completed in the same directory (Parquet: the parts
written, in order, into one file with a row group per chunk, the same way whether or not the
run was interrupted), fsync'ed and renamed to ``OUT``, so ``OUT`` is never seen half written
and a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.files import fsync_dir, read_json_object, write_json
from predict.formats import Writer

STATE = "state.json"


def workdir(output: Path) -> Path:
    return output.parent / f".{output.name}.predict"


class Partial:
    """The work directory of one output: new, or resumed from an interrupted run with the same fingerprint."""

    def __init__(self, output: Path, fmt: str, raw_json: list[str], resume: bool, overwrite: bool):
        """Checks what an interrupted run left, before any work: without ``resume`` it is an error
        (``overwrite``: it is deleted); with it, its state is read (:meth:`begin` checks it)."""
        self.output, self.fmt, self.raw_json = output, fmt, raw_json
        self.dir = workdir(output)
        self.previous: dict[str, Any] | None = None
        self.part = self.dir / "part"
        if self.dir.exists():
            if resume:
                self.previous = read_json_object(self.dir / STATE, f"--resume: {self.dir} has no {STATE}; pass --overwrite to start over")
            elif overwrite:
                shutil.rmtree(self.dir)
            else:
                raise FerryError(f"--output {output}: an interrupted run left {self.dir.name} beside it; pass --resume "
                                 "to continue it, or --overwrite to start over")

    @property
    def recorded(self) -> dict[str, Any]:
        """The interrupted run's fingerprint ({} when there is none to resume)."""
        return dict((self.previous or {}).get("fingerprint") or {})

    def begin(self, fingerprint: dict[str, Any]) -> int:
        """Start writing; returns the chunks already done (by the interrupted run that --resume continues).

        Raises:
            FerryError: --resume of a run whose fingerprint differs (another input, variant, setting).
        """
        self.state: dict[str, Any] = {"fingerprint": fingerprint, "chunks": 0, "rows": 0, "rows_before": 0, "bytes": 0,
                                      "errors": 0, "first_errors": []}
        if self.previous is not None:
            before = self.recorded
            changed = [k for k in sorted(set(before) | set(fingerprint)) if before.get(k) != fingerprint.get(k)]
            if changed:
                k = changed[0]
                raise FerryError(f"--resume: {k} differs from the interrupted run's ({str(before.get(k))[:80]!r}, now "
                                 f"{str(fingerprint.get(k))[:80]!r}); rerun it as it was, or pass --overwrite to start over")
            self.state = {**self.previous, "rows_before": self.previous["rows"]}
            self.f = open(self.part, "r+b")
            self.f.truncate(self.state["bytes"])  # a chunk written only in part by the interrupted run goes
            self.f.seek(self.state["bytes"])
            return self.chunks
        self.dir.mkdir()
        (self.dir / "parts").mkdir()
        self.f = open(self.part, "wb")
        write_json(self.dir / STATE, self.state)
        return 0

    @property
    def chunks(self) -> int:
        return int(self.state["chunks"])

    def add(self, table: Any, errors: list[tuple[int, str]], keep_errors: int = 20) -> None:
        """Append one chunk's output, then record it: a kill between the two only costs that chunk again."""
        if self.fmt == "parquet":
            import pyarrow as pa

            tmp = self.dir / "parts" / f".{self.chunks:06d}.tmp"
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / "parts" / f"{self.chunks:06d}.arrow")
        else:
            Writer(self.f, self.fmt, self.raw_json, header=self.state["bytes"] == 0).write(table)
            self.f.flush()
            os.fsync(self.f.fileno())
        s = self.state
        s["chunks"] += 1
        s["rows"] += table.num_rows
        s["bytes"] = self.f.tell()
        s["errors"] += len(errors)
        s["first_errors"] = (s["first_errors"] + [{"row": r, "error": e} for r, e in errors])[:keep_errors]
        write_json(self.dir / STATE, s)

    def finish(self, empty: Any, overwrite: bool) -> None:
        """Complete the output and rename it to its destination; ``empty`` (an empty output table) gives
        the header or schema of an input without rows."""
        if self.fmt == "parquet":
            self._assemble(empty)
        elif self.chunks == 0:
            Writer(self.f, self.fmt, self.raw_json, header=True).write(empty)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        publish_file(self.part, self.output, overwrite)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _assemble(self, empty: Any) -> None:
        import pyarrow as pa

        writer = Writer(self.f, self.fmt, self.raw_json, header=True)
        parts = sorted((self.dir / "parts").glob("*.arrow"))
        for p in parts:
            with pa.memory_map(str(p)) as source:
                writer.write(pa.ipc.open_file(source).read_all())
        if not parts:
            writer.write(empty)
        writer.close()

    def close(self) -> None:
        """Stop writing, keeping the work for --resume."""
        f = getattr(self, "f", None)
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def publish_file(src: Path, dst: Path, overwrite: bool) -> None:
    """Rename the complete, fsync'ed file ``src`` to ``dst`` (same directory) in one step; an existing
    ``dst`` is replaced only with ``overwrite``."""
    if overwrite:
        os.replace(src, dst)
    else:
        try:
            os.link(src, dst)  # fails if dst appeared meanwhile: never replaced without --overwrite
            os.unlink(src)
        except FileExistsError:
            raise FerryError(f"--output {dst} appeared while this run was writing it; nothing was replaced; "
                             "pass --overwrite to replace it") from None
        except OSError:  # a file system without hard links: check, then rename
            if dst.exists():
                raise FerryError(f"--output {dst} appeared while this run was writing it; nothing was replaced; "
                                 "pass --overwrite to replace it") from None
            os.rename(src, dst)
    fsync_dir(dst.parent)

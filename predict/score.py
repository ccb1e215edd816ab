"""Scoring one raw chunk with the served variant: the same runtime `ferry serve` runs.

A :class:`Scorer` opens the artifact once (its integrity check included: the manifest's
content hash, every file its files map lists, the model file's sha256) in the runtime the
server's workers use (``runtime.predictor.Runtime``, for either task), with the server's batching: at most ``batch_size`` texts per inference call and
the device's token budget. The local loop calls it on each chunk, and so does every actor of
a Ray job, so both give the same rows.

Within a chunk, the valid texts are tokenized once, sorted by token length and run ``batch_size`` at a time
(the runtime groups each batch by token length again, so short texts are not padded to long
ones), and every answer is put back in its row. A bad row (no text, a text that is not a
string or not valid Unicode, an image that cannot be read) gets an ``error`` and no
prediction; so does a row the model raises on or gives a non-finite score for, found by
running a failing batch again one row at a time, as the server does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ferry.errors import DataError, first_line
from ferry.tasks import IMAGE
from predict.formats import LINE, parse_lines
from runtime.tokens import encode

LABEL, SCORE, ERROR = "label", "score", "error"
SCORE_PREFIX = "score_"  # --all-scores: one column per label, score_<label>


@dataclasses.dataclass(frozen=True)
class Job:
    """What a scorer needs, resolved by the driver (so every Ray actor runs the same variant the same way)."""

    artifact: str
    variant: str | None
    device: str
    threads: int | None
    optimization: str
    batch_size: int | None  # None: the server's max_batch_size on the device
    max_batch_tokens: int | None  # None: the server's token budget on the device
    fmt: str
    column: str
    keep: tuple[str, ...]
    all_scores: bool
    base: str  # the data file's folder: image paths are relative to it
    choose: bool = True  # False: open the named variant without re-checking it here


def output_columns(labels: Sequence[str], keep: Sequence[str], all_scores: bool) -> list[str]:
    return [*keep, LABEL, SCORE, *([SCORE_PREFIX + label for label in labels] if all_scores else []), ERROR]


def describe(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object", bytes: "bytes"}.get(type(value), type(value).__name__)


def text_problem(value: Any) -> str | None:
    """Why ``value`` is not a text the model can take, or None."""
    if value is None:
        return "no text (null)"
    if not isinstance(value, str):
        return f"the text is {describe(value)}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "the text is not valid Unicode (a lone surrogate such as \\ud800)"
    return None


class Scorer:
    """The artifact's runtime and what to do with a raw chunk; callable on a raw chunk (a pyarrow Table)."""

    def __init__(self, job: Job):
        from runtime.artifact import check_valid_artifact_dir
        from runtime.predictor import DEVICE_DEFAULTS, Runtime

        self.job = job
        artifact = check_valid_artifact_dir(job.artifact)
        artifact.verify_files()  # every file the manifest lists, in every process that scores
        self.image = artifact.task == IMAGE.name
        self.runtime = Runtime(artifact, job.variant, job.device, job.threads, job.optimization, choose=job.choose)
        defaults = DEVICE_DEFAULTS["cuda" if self.runtime.device == "cuda" else "cpu"]
        self.batch_size = job.batch_size or defaults["max_batch_size"]
        self.max_tokens = job.max_batch_tokens or defaults["max_batch_tokens"]
        self.runtime.max_group = self.batch_size
        self.runtime.max_tokens = self.max_tokens  # texts only: an image batch is cut by max_group
        self.labels = list(self.runtime.labels)
        self.columns = output_columns(self.labels, job.keep, job.all_scores)

    def __call__(self, raw: Any, progress: Callable[[int], None] | None = None) -> Any:
        """The output table of a raw chunk: kept columns, label, score (, score_<label>...), error."""
        import pyarrow as pa

        values, kept, problems = self.split(raw)
        n = len(values)
        probs = np.full((n, len(self.labels)), np.nan)
        errors = list(problems)
        if self.image:
            self._images(values, errors, probs, progress)
        else:
            self._texts(values, errors, probs, progress)
        for i in range(n):
            if errors[i] is None and not np.isfinite(probs[i]).all():
                errors[i] = f"the model gave a non-finite score ({'NaN' if np.isnan(probs[i]).any() else 'inf'})"
        ok = np.array([e is None for e in errors], dtype=bool)
        best = probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
        cols: dict[str, Any] = dict(kept)
        cols[LABEL] = pa.array([self.labels[b] if good else None for b, good in zip(best, ok)], pa.string())
        cols[SCORE] = pa.array(probs[np.arange(n), best] if n else [], pa.float64(), mask=~ok)
        if self.job.all_scores:
            for j, label in enumerate(self.labels):
                cols[SCORE_PREFIX + label] = pa.array(probs[:, j], pa.float64(), mask=~ok)
        cols[ERROR] = pa.array(errors, pa.string())
        return pa.table(cols)

    def split(self, raw: Any) -> tuple[list[Any], dict[str, Any], list[str | None]]:
        """(input values, kept columns, per-row problem found while parsing) of a raw chunk."""
        import pyarrow as pa

        if self.job.fmt == "jsonl":
            values, kept_json, problems = parse_lines(raw.column(LINE).to_pylist(), self.job.column, list(self.job.keep))
            return values, {k: pa.array(v, pa.string()) for k, v in kept_json.items()}, problems
        values = raw.column(self.job.column).to_pylist()
        problems: list[str | None] = [None] * len(values)
        kind = raw.schema.field(self.job.column).type
        # CSV and TSV read the input column as bytes, decoded here per row; Parquet bytes are an image's own
        if (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)) and not (self.image and self.job.fmt == "parquet"):
            for i, v in enumerate(values):
                if v is not None:
                    try:
                        values[i] = v.decode("utf-8")
                    except UnicodeDecodeError as e:
                        values[i], problems[i] = None, f"not valid UTF-8 (byte {e.start})"
            # the input column kept: as the text it holds
            return values, {k: pa.array(values, pa.string()) if k == self.job.column else raw.column(k) for k in self.job.keep}, problems
        return values, {k: raw.column(k) for k in self.job.keep}, problems

    # --- texts -------------------------------------------------------------------------------
    def _texts(self, values: list[Any], errors: list[str | None], probs: np.ndarray, progress: Callable[[int], None] | None) -> None:
        for i, v in enumerate(values):
            if errors[i] is None:
                errors[i] = text_problem(v)
        valid = [i for i in range(len(values)) if errors[i] is None]
        # Tokenized once, and sorted by token length over the whole chunk, so a batch holds texts of
        # nearly one length: in 1,024-row chunks of the BBC demo the padded tokens are 1.016x the
        # real ones (1.071x sorted by characters). The runtime groups each batch as the server does.
        encodings = dict(zip(valid, encode(self.runtime.inputs.tokenizer, [values[i] for i in valid])))
        valid.sort(key=lambda i: len(encodings[i].ids))
        for start in range(0, len(valid), self.batch_size):
            rows = valid[start : start + self.batch_size]
            self._run(rows, [encodings[i] for i in rows], errors, probs, self.runtime.run_encoded)
            if progress:
                progress(len(rows))
        if progress:
            progress(len(values) - len(valid))

    def _run(self, rows: list[int], items: Any, errors: list[str | None], probs: np.ndarray, run: Callable[[Any], Any]) -> None:
        """Probabilities of ``items`` (texts' encodings, or pixels ``[N, 3, H, W]``) by ``run`` into their
        ``rows``; a batch that raises is run again one item at a time, so only the items it raises on get an error."""
        try:
            probs[rows] = run(items).probs
        except Exception as e:  # noqa: BLE001 - reported per row, as the server reports it per item
            if len(rows) == 1:
                errors[rows[0]] = f"inference failed: {type(e).__name__}: {first_line(e)}"
                return
            for k, r in enumerate(rows):
                self._run([r], items[k : k + 1], errors, probs, run)

    # --- images ------------------------------------------------------------------------------
    def _images(self, values: list[Any], errors: list[str | None], probs: np.ndarray, progress: Callable[[int], None] | None) -> None:
        n = len(values)
        for start in range(0, n, self.batch_size):
            rows, pixels = [], []
            for i in range(start, min(start + self.batch_size, n)):
                if errors[i] is not None:
                    continue
                try:
                    pixels.append(self._pixels(values[i]))
                    rows.append(i)
                except DataError as e:
                    errors[i] = str(e)
            if rows:
                self._run(rows, np.stack(pixels), errors, probs, self.runtime.run_batch)
            if progress:
                progress(min(start + self.batch_size, n) - start)

    def _pixels(self, value: Any) -> np.ndarray:
        """One image's pixels ``[3, H, W]``, decoded and preprocessed as the server does it."""
        from runtime.pixels import open_image, preprocess

        if value is None:
            raise DataError("no image (null)")
        if isinstance(value, (bytes, bytearray)):
            return preprocess([open_image(bytes(value), "the image bytes")], self.runtime.inputs.processor)[0]
        if not isinstance(value, str):
            raise DataError(f"the image is {describe(value)}, not a path or bytes")
        try:
            data = (Path(self.job.base) / value).read_bytes()
        except OSError as e:
            raise DataError(f"{value}: cannot read it ({e.strerror or first_line(e)})") from None
        return preprocess([open_image(data, value)], self.runtime.inputs.processor)[0]


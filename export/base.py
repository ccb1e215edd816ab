"""What `ferry export` asks of a task, after optimum-onnx's ``exporters/onnx/base.py`` (``OnnxConfig``):
the export's steps are written once (:func:`export.export.export`), and each task supplies its part
as a :class:`TaskExport`: the graph export, the variants it can make, the random parity inputs and
the held-out data, the files a server needs beside the graphs, and its own manifest fields.

The parts: :class:`export.text.TextExport` (text classification), :class:`export.image.ImageExport`
(image classification) and :class:`export.ensemble.EnsembleExport` (several text checkpoints as
one graph). Their options arrive as plain values (:class:`Calibration`, :class:`Heldout` and
keyword arguments), never as the command line's options object.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Callable

from export.parity import Progress, Reference
from ferry.tasks import Task

# What makes one variant: (its file in the staging directory, the work directory, the int8 ISA) -> its manifest entry
Maker = Callable[[Path, Path, str], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What int8-static calibrates its activation ranges on."""

    source: str | None
    """A file of texts, or a ``<label>/<image>`` folder; None: the checkpoint's own calibration split."""
    samples: int
    """Inputs used at most."""
    method: str
    """How activation ranges are set: minmax, percentile or entropy."""


@dataclasses.dataclass(frozen=True)
class Heldout:
    """The labelled data parity measures accuracy on."""

    data: str | None
    """A labelled file (texts) or ``<label>/<image>`` folder; None: the checkpoint's held-out split."""
    max_examples: int
    """Examples compared at most (0: all)."""
    text_column: str
    """Texts: the text column of ``data``."""
    label_column: str
    """Texts: the label column of ``data``."""


def model_labels(ckpt: Any, model: Any) -> list[str]:
    """The labels of a checkpoint's model, in output order ("0", "1", ... where it names none)."""
    return ckpt.labels or [str(i) for i in range(int(model.config.num_labels))]


@dataclasses.dataclass
class Graph:
    """The fp32 graph a part exported: its manifest entry, how long it took, and its signature."""

    entry: dict[str, Any]
    timings: dict[str, float]
    opset: int
    inputs: list[str]
    outputs: list[str]


class TaskExport(abc.ABC):
    """One task's part of an export, loaded (model, data) and checked before any work.

    Attributes:
        task: the task, as ``ferry.tasks`` names it.
        ckpt: the checkpoint exported (an ensemble's first member).
        labels: the model's labels, in output order.
        graph_steps: how many numbered progress lines :meth:`graph` prints.
        versions: the libraries whose versions the manifest records.
    """

    task: Task
    ckpt: Any
    labels: list[str]
    graph_steps: int
    versions: tuple[str, ...]

    @abc.abstractmethod
    def graph(self, work: Path, fp32: Path, say: Callable[..., None]) -> Graph:
        """Export the model into ``work`` and write the fp32 variant's graph to ``fp32``."""

    @abc.abstractmethod
    def makers(self) -> dict[str, Maker]:
        """What makes each variant other than fp32 that has a graph of its own, by variant name."""

    @abc.abstractmethod
    def save_files(self, staging: Path) -> None:
        """Write what a server needs beside the graphs (config, tokenizer or image processor)."""

    @abc.abstractmethod
    def heldout_line(self) -> str:
        """What parity compares on, for the progress line (" on FILE (N texts)")."""

    @abc.abstractmethod
    def reference(self, inputs: list[str], batch_sizes: list[int], seq_lengths: list[int], seed: int,
                  progress: Progress | None) -> Reference:
        """PyTorch's logits on the random parity inputs and the held-out data."""

    @abc.abstractmethod
    def fields(self) -> dict[str, Any]:
        """The task's own manifest fields: what the graph's input is made of (``max_length``, ``image_size``)."""

    def source(self) -> dict[str, Any]:
        """The manifest's ``source``: what was exported."""
        return {"checkpoint": str(self.ckpt.path.resolve()), "manifest_sha256": self.ckpt.manifest_sha256,
                "model_type": self.ckpt.model_type}

    def write_after_parity(self, staging: Path, timings: dict[str, float]) -> dict[str, Any]:
        """Files written into ``staging`` once parity has run, as the manifest fields that name them
        (their time added to ``timings``); none but a text export's ``reference.jsonl``."""
        return {}

    def extra(self, variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Manifest fields that follow the common ones (none but an ensemble's)."""
        return {}

    def report(self, manifest: dict[str, Any]) -> None:
        """Lines printed after the artifact is published, before the summary (none but an ensemble's)."""

"""The tasks ferry knows, one object each: a checkpoint's, an artifact's and a server's ``task``.

This is the only module that spells a task's name. Everything else asks a :class:`Task`: what its
input is, which data column holds it, which route serves it. The per-stage behaviour of a task
(how finetune loads and collates its data, how export writes its graph, how the runtime
preprocesses a request) lives in that stage, keyed by the task, because ``ferry/`` sits below every
stage and imports none of them (the import-layering test in tests/test_structure.py).
"""

from __future__ import annotations

import dataclasses

from ferry.errors import FerryError


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    """The value of ``task`` in a ``ferry.json`` and of ``--task``."""
    input: str
    """What one example is: ``"text"`` or ``"image"``."""
    column: str
    """The data files' default column for the input."""
    route: str
    """The HTTP route that classifies it."""

    @property
    def image(self) -> bool:
        return self.input == "image"

    def __str__(self) -> str:
        return self.name


TEXT = Task(name="text-classification", input="text", column="text", route="/classify")
IMAGE = Task(name="image-classification", input="image", column="image", route="/classify-image")
ALL = (TEXT, IMAGE)

# The names, for argparse choices, manifests and messages.
TEXT_TASK = TEXT.name
IMAGE_TASK = IMAGE.name
TASKS = tuple(t.name for t in ALL)


def task_named(name: str | Task | None, default: Task = TEXT) -> Task:
    """The :class:`Task` called ``name`` (``default`` for None: manifests written before images
    carried no task); a name ferry does not know is a one-line error."""
    if isinstance(name, Task):
        return name
    if name is None:
        return default
    for task in ALL:
        if task.name == name:
            return task
    raise FerryError(f"unknown task '{name}'; ferry knows {', '.join(TASKS)}")

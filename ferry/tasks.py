"""The tasks ferry knows, named once: a checkpoint's, an artifact's and a server's ``task``."""

from __future__ import annotations

TEXT_TASK = "text-classification"
IMAGE_TASK = "image-classification"
TASKS = (TEXT_TASK, IMAGE_TASK)

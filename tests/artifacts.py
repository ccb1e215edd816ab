"""Editing an exported artifact in tests, the way a re-export would leave it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ferry.files import write_json
from runtime.artifact import seal


def write_manifest(artifact: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` as the artifact's ferry.json, sealed again (files map and content hash),
    so a test that changes a manifest on purpose is judged on that change, not on the seal."""
    write_json(Path(artifact) / "ferry.json", seal(artifact, manifest))

"""Editing an exported artifact in tests, the way a re-export would leave it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ferry.files import write_json
from runtime.artifact import seal


def write_manifest(artifact: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest`` as the artifact's ferry.json the way export would have: sealed again
    (files map and content hash), so a test that stands for another export's output is judged on
    that change, not refused as an edit. Tests of tampering write the file themselves."""
    sealed = seal(artifact, manifest)
    write_json(Path(artifact) / "ferry.json", sealed)
    return sealed

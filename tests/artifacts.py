"""What a stage wrote, read and edited in tests: a checkpoint's JSON-lines files, and an exported
artifact edited or copied the way a re-export would leave it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ferry.files import write_json
from runtime.artifact import seal


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_manifest(artifact: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest`` as the artifact's ferry.json the way export would have: sealed again
    (files map and content hash), so a test that stands for another export's output is judged on
    that change, not refused as an edit. Tests of tampering write the file themselves."""
    sealed = seal(artifact, manifest)
    write_json(Path(artifact) / "ferry.json", sealed)
    return sealed


def copy_artifact(src: Path, dst: Path, **manifest_changes: Any) -> tuple[Path, dict[str, Any]]:
    """A copy of the artifact ``src`` at ``dst`` with top-level manifest keys replaced; (dst, manifest)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "ferry.json").read_text())
    for key, value in manifest_changes.items():
        m[key] = value
    return dst, write_manifest(dst, m)

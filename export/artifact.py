"""The artifact format, written by `ferry export` and read by parity, bench and serve.

An artifact directory holds one ``.onnx`` file per variant, the tokenizer and config of
the source checkpoint, and ``ferry.json`` (written last)::

    {
      "stage": "export",
      "source": {"checkpoint": str, "manifest_sha256": str | null, "model_type": str},
      "task": "text-classification",
      "labels": [str, ...],             # id order
      "max_length": int,
      "opset": int,
      "inputs": [str, ...], "outputs": ["logits"],
      "variants": {
        "<name>": {"file": str, "sha256": str, "bytes": int, "precision": "fp32|fp16|int8",
                   "provider": "CPUExecutionProvider|CUDAExecutionProvider",
                   "batch_invariant": bool,
                   "status": "pass|fail|unverified", "parity": {...}}
      },
      "default_variant": {"cpu": str | null, "gpu": str | null},
      "settings": {...}, "versions": {...}, "created": str
    }

Nothing here imports PyTorch: a served artifact needs ONNX Runtime and a tokenizer only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ferry.errors import ArtifactError, FerryError
from ferry.files import MANIFEST, read_manifest, sha256_file

STAGE = "export"
MAKE_ONE = "ferry export CHECKPOINT --output DIR makes one"
PASS, FAIL, UNVERIFIED = "pass", "fail", "unverified"
# The file each variant is written to.
VARIANT_FILES = {
    "fp32": "model.onnx",
    "int8": "model_int8.onnx",
    "int8-static": "model_int8_static.onnx",
    "fp16": "model_fp16.onnx",
}


@dataclasses.dataclass
class Variant:
    name: str
    path: Path
    info: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.info.get("status", UNVERIFIED))

    @property
    def servable(self) -> bool:
        """A variant whose parity failed is never served; unverified is allowed with a warning."""
        return self.status != FAIL

    def verify(self) -> None:
        """Refuse a model file whose sha256 differs from the manifest."""
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: model file of variant '{self.name}' is missing")
        actual = sha256_file(self.path)
        if actual != self.info.get("sha256"):
            raise ArtifactError(
                f"{self.path}: sha256 {actual[:12]}… does not match the manifest's "
                f"{str(self.info.get('sha256'))[:12]}…; the file was modified or corrupted, re-export it"
            )


@dataclasses.dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def max_length(self) -> int:
        return int(self.manifest.get("max_length", 512))

    @property
    def variants(self) -> dict[str, Variant]:
        return {
            name: Variant(name, self.path / info["file"], info) for name, info in self.manifest["variants"].items()
        }

    def variant(self, name: str | None = None, device: str = "cpu") -> Variant:
        """The named variant, or the default for ``device`` ("cpu" or "gpu")."""
        if name is None:
            name = (self.manifest.get("default_variant") or {}).get(device)
            if name is None:
                raise ArtifactError(f"{self.path}: no servable variant for {device}; name one with --variant")
        variants = self.variants
        if name not in variants:
            raise ArtifactError(f"--variant '{name}' not in {self.path}; variants are: {', '.join(variants)}")
        return variants[name]


def check_valid_artifact_dir(path: str | Path, flag: str = "ARTIFACT") -> Artifact:
    """Check an artifact directory before any work; name what is missing and the fix."""
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"{flag} {path}: no such directory; {MAKE_ONE}")
    try:
        manifest = read_manifest(p)
    except FerryError as e:
        if not (p / MANIFEST).exists():
            raise ArtifactError(f"{flag} {path}: no {MANIFEST}, so this is not an artifact; {MAKE_ONE}") from None
        raise ArtifactError(str(e)) from None
    if manifest.get("stage") != STAGE:
        hint = "; export it first: ferry export CHECKPOINT --output DIR" if manifest.get("stage") == "finetune" else ""
        raise ArtifactError(f"{flag} {path}: {MANIFEST} was written by '{manifest.get('stage')}', not by ferry export{hint}")
    missing = [k for k in ("labels", "variants", "inputs", "outputs") if k not in manifest]
    if missing:
        raise ArtifactError(f"{p / MANIFEST}: missing {', '.join(missing)}; re-export the checkpoint")
    return Artifact(p, manifest)

"""The artifact format, written by `ferry export` and read by parity, bench and serve.

An artifact directory holds one ``.onnx`` file per variant, the tokenizer (text) or
``preprocessor_config.json`` (images) and config of the source checkpoint, and ``ferry.json`` (written last)::

    {
      "stage": "export",
      "source": {"checkpoint": str, "manifest_sha256": str | null, "model_type": str},
      "task": "text-classification" | "image-classification",
      "labels": [str, ...],             # id order
      "max_length": int,                 # text only
      "image_size": {"height", "width"}, "processor": "preprocessor_config.json",
      "exporter": str,                   # image only (torch.onnx.export)
      "opset": int,
      "inputs": [str, ...], "outputs": ["logits"],
      "variants": {
        "<name>": {"file": str, "sha256": str, "bytes": int, "precision": "fp32|fp16|int8",
                   "provider": "CPUExecutionProvider|CUDAExecutionProvider",
                   "batch_invariant": bool | null,   # null: not measurable here (fp16 without CUDA)
                   "external_data": {"file", "sha256", "bytes"},  # only for models over 2 GB
                   "status": "pass|fail|unverified", "parity": {...},
                   "optimization": {...}, "quantization": {...}, "graph_ops": {op: count}}
      },
      "default_variant": {"cpu": str | null, "gpu": str | null},
      "default_variant_rule": {"cpu": str, "gpu": str},
      "settings": {...}, "timings": {...}, "versions": {...}, "created": str

The default CPU variant is the first of int8-static, fp32 that passed its gate and is
batch-invariant (dynamic int8 only when forced with --cpu-default); the default GPU
variant is fp16 unless it failed (unverified is allowed: only CUDA can verify it), else fp32.
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



@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """A variant is one graph file run by one engine at one precision."""

    file: str
    engine: str  # "onnxruntime" | "openvino"
    precision: str  # "fp32" | "bf16" | "int8" | "fp16"
    device: str = "cpu"  # where it is meant to run: "cpu" or "cuda"


# Every variant ferry knows, in the order export makes and reports them. Several variants
# share a file: OpenVINO reads the same ONNX graphs ONNX Runtime runs.
VARIANTS: dict[str, VariantSpec] = {
    "fp32": VariantSpec("model.onnx", "onnxruntime", "fp32"),
    "int8": VariantSpec("model_int8.onnx", "onnxruntime", "int8"),
    "int8-static": VariantSpec("model_int8_static.onnx", "onnxruntime", "int8"),
    "fp16": VariantSpec("model_fp16.onnx", "onnxruntime", "fp16", "cuda"),
    "fp16-tensorrt": VariantSpec("model_plain.onnx", "onnxruntime", "fp16", "cuda"),
    "openvino-fp32": VariantSpec("model.onnx", "openvino", "fp32"),
    "openvino-bf16": VariantSpec("model.onnx", "openvino", "bf16"),
    "openvino-int8-static": VariantSpec("model_int8_static.onnx", "openvino", "int8"),
}
# The file each variant is written to.
VARIANT_FILES = {name: spec.file for name, spec in VARIANTS.items()}


@dataclasses.dataclass
class Variant:
    name: str
    path: Path
    info: dict[str, Any]

    @property
    def spec(self) -> VariantSpec:
        """Engine and precision: the manifest's, else the known variant's (artifacts before engines: ONNX Runtime)."""
        known = VARIANTS.get(self.name)
        return VariantSpec(
            self.info.get("file") or (known.file if known else self.path.name),
            str(self.info.get("engine") or (known.engine if known else "onnxruntime")),
            str(self.info.get("precision") or (known.precision if known else "fp32")),
            str(self.info.get("device") or (known.device if known else "cpu")),
        )

    @property
    def engine(self) -> str:
        return self.spec.engine

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
        checks = [(self.path, self.info.get("sha256"))]
        ext = self.info.get("external_data")
        if ext:  # models over 2 GB keep their weights in a second file
            checks.append((self.path.parent / ext["file"], ext.get("sha256")))
        for path, expected in checks:
            if not path.is_file():
                raise ArtifactError(f"{path}: file of variant '{self.name}' is missing; re-export it")
            actual = sha256_file(path)
            if actual != expected:
                raise ArtifactError(
                    f"{path}: sha256 {actual[:12]}… does not match the manifest's "
                    f"{str(expected)[:12]}…; the file was modified or corrupted, re-export it"
                )


@dataclasses.dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def task(self) -> str:
        """"text-classification" or "image-classification" (artifacts before images: text)."""
        return str(self.manifest.get("task") or "text-classification")

    @property
    def processor(self) -> Path | None:
        """The image preprocessor_config.json of an image artifact."""
        p = self.path / "preprocessor_config.json"
        return p if self.task == "image-classification" and p.is_file() else None

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

    def select(self, names: list[str] | None) -> list[str]:
        """The named variants (all when ``names`` is empty), each checked against its sha256.

        Raises:
            ArtifactError: a name not in the artifact, or a modified model file.
        """
        variants = self.variants
        names = list(names or variants)
        unknown = [n for n in names if n not in variants]
        if unknown:
            raise ArtifactError(f"--variants '{unknown[0]}' not in {self.path}; variants are: {', '.join(variants)}")
        for n in names:
            variants[n].verify()
        return names


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

"""The artifact format, written by `ferry export` and read by parity, bench and serve.

An artifact directory holds one ``.onnx`` file per variant, the tokenizer (text) or
``preprocessor_config.json`` (images) and config of the source checkpoint, and ``ferry.json`` (written last)::

    {
      "stage": "export",
      "source": {"checkpoint": str, "manifest_sha256": str | null, "model_type": str},
      "task": str,                       # a task name of ferry/tasks.py
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
      "reference": {"file", "sha256", ...},  # text only: PyTorch's logits on held-out texts
      "settings": {...}, "timings": {...}, "versions": {...}, "created": str,
      "files": {"<path inside the artifact>": "<sha256>", ...},  # every file but ferry.json
      "content_sha256": str              # sha256 of this manifest's canonical JSON without this key

The default CPU variant is the first of int8-static, fp32 that passed its gate and is
batch-invariant (dynamic int8 only when forced with --cpu-default); the default GPU
variant is fp16 unless it failed (unverified is allowed: only CUDA can verify it), else fp32.
    }

Integrity. ``files`` and ``content_sha256`` (made by :func:`seal`) let a reader refuse an
artifact whose tokenizer, config, reference logits or graphs changed after export, or whose
manifest was edited (labels, statuses, gates): :func:`check_valid_artifact_dir` checks the
manifest's content hash and that every path it names stays inside the artifact;
:meth:`Artifact.verify_files` hashes every listed file; :meth:`Artifact.read_verified` and
:meth:`Variant.read_verified` return the bytes they hashed, so what is loaded is what was checked.
When a ``files`` map is present, a file the server reads must be in it. An artifact written before
these fields exists is read as before (its graphs and reference logits are still checked), with
a note saying what was not verified.

Nothing here imports PyTorch: a served artifact needs ONNX Runtime and a tokenizer only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ferry.tasks import TEXT_TASK
from ferry.errors import ArtifactError, FerryError
from ferry.files import MANIFEST, read_manifest, sha256_file

STAGE = "export"
MAKE_ONE = "ferry export CHECKPOINT --output DIR makes one"
PASS, FAIL, UNVERIFIED = "pass", "fail", "unverified"
FILES, CONTENT = "files", "content_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")



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
    # the sha256 the manifest's files map gives this variant's files: {path inside the artifact: sha256},
    # or None for an artifact without one
    listed: dict[str, str] | None = None

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

    def _checks(self) -> list[tuple[str, Path, Any]]:
        """(name inside the artifact, path, the variant entry's sha256) of each of the variant's files."""
        name = str(self.info.get("file") or self.path.name)
        checks = [(name, self.path, self.info.get("sha256"))]
        ext = self.info.get("external_data")
        if ext:  # models over 2 GB keep their weights in a second file, next to the graph
            ext_name = str(Path(name).parent / ext["file"]) if "/" in name else str(ext["file"])
            checks.append((ext_name, self.path.parent / ext["file"], ext.get("sha256")))
        return checks

    def _expect(self, name: str, path: Path, data_sha: str, expected: Any) -> None:
        """Refuse ``path`` whose content hashed to ``data_sha`` unless it matches the variant's entry
        and the files map (when the manifest has one, it must list the file)."""
        if data_sha != expected:
            raise ArtifactError(
                f"{path}: sha256 {data_sha[:12]}… does not match the manifest's "
                f"{str(expected)[:12]}…; the file was modified or corrupted, re-export it"
            )
        if self.listed is not None:
            if name not in self.listed:
                raise ArtifactError(f"{path}: not in the manifest's files map, which must list every file the server loads; re-export it")
            if self.listed[name] != data_sha:
                raise ArtifactError(
                    f"{path}: sha256 {data_sha[:12]}… does not match the manifest's files map "
                    f"{self.listed[name][:12]}…; the file was modified or corrupted, re-export it"
                )

    def verify(self) -> None:
        """Refuse a model file whose sha256 differs from the manifest."""
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: model file of variant '{self.name}' is missing")
        for name, path, expected in self._checks():
            if not path.is_file():
                raise ArtifactError(f"{path}: file of variant '{self.name}' is missing; re-export it")
            self._expect(name, path, sha256_file(path), expected)

    def read_verified(self) -> bytes | None:
        """The graph's bytes, read once and checked against the manifest, for the engine to load
        (so what runs is what was hashed); None for a graph with external data, which an engine
        must open by path: :meth:`verify` it again once opened."""
        if self.info.get("external_data"):
            self.verify()
            return None
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: model file of variant '{self.name}' is missing")
        data = self.path.read_bytes()
        name, path, expected = self._checks()[0]
        self._expect(name, path, hashlib.sha256(data).hexdigest(), expected)
        return data


@dataclasses.dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def task(self) -> str:
        """The name of the artifact's task (ferry/tasks.py; artifacts before images: the text task's)."""
        return str(self.manifest.get("task") or TEXT_TASK)

    @property
    def max_length(self) -> int:
        return int(self.manifest.get("max_length", 512))

    @property
    def files(self) -> dict[str, str] | None:
        """The manifest's files map {path inside the artifact: sha256}, or None (an artifact before it)."""
        files = self.manifest.get(FILES)
        return dict(files) if isinstance(files, dict) else None

    @property
    def variants(self) -> dict[str, Variant]:
        return {
            name: Variant(name, self.path / info["file"], info, self.files) for name, info in self.manifest["variants"].items()
        }

    def integrity_notes(self) -> list[str]:
        """What a reader cannot verify in this artifact (written before its integrity fields), for the log."""
        missing = [what for key, what in ((FILES, "no per-file sha256 ('files'): its tokenizer, config and preprocessor "
                                                  "files are not verified"),
                                           (CONTENT, "no content_sha256: edits to its labels, statuses or gates cannot be "
                                                     "detected")) if key not in self.manifest]
        if not missing:
            return []
        return [f"{self.path / MANIFEST} has {'; and '.join(missing)} (exported before ferry sealed artifacts; re-export to seal it)"]

    def verify_files(self) -> list[str]:
        """Hash every file the manifest's files map lists; returns their names (none without a map).

        Raises:
            ArtifactError: a listed file missing, or whose sha256 differs, named.
        """
        files = self.files or {}
        for name, expected in sorted(files.items()):
            path = self.path / name
            if not path.is_file():
                raise ArtifactError(f"{path}: listed in the manifest's files map but missing; re-export the checkpoint")
            self._check(path, sha256_file(path), expected)
        return sorted(files)

    def read_verified(self, name: str) -> bytes:
        """The bytes of the artifact's file ``name``, checked against the files map when there is one
        (which must then list it); read once, so the caller uses exactly what was checked.

        Raises:
            ArtifactError: not listed, missing, or a sha256 that differs.
        """
        path = member(self.path, name, "file")
        files = self.files
        if files is not None and name not in files:
            raise ArtifactError(f"{path}: not in the manifest's files map, which must list every file the server loads; re-export it")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: no such file; re-export the checkpoint") from None
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read it ({e.strerror})") from None
        if files is not None:
            self._check(path, hashlib.sha256(data).hexdigest(), files[name])
        return data

    def _check(self, path: Path, actual: str, expected: str) -> None:
        if actual != expected:
            raise ArtifactError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest's {str(expected)[:12]}…; "
                "the file was modified or corrupted, re-export the checkpoint"
            )

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


def member(root: Path, name: Any, what: str) -> Path:
    """``root / name`` for a manifest entry naming a file inside the artifact.

    Raises:
        ArtifactError: a name that is not a relative POSIX path inside it (absolute, with a '..',
            '.' or empty part, a backslash or a NUL).
    """
    parts = name.split("/") if isinstance(name, str) else []
    if (not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise ArtifactError(
            f"{root / MANIFEST}: {what} {str(name)[:200]!r} is not a path inside the artifact "
            "(relative, '/'-separated, no '..'); re-export the checkpoint"
        )
    return root / name


def content_sha256(manifest: dict[str, Any]) -> str:
    """The sha256 of a manifest's canonical JSON (sorted keys, no spaces, UTF-8), ``content_sha256`` left out."""
    body = {k: v for k, v in manifest.items() if k != CONTENT}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")).hexdigest()


def seal(directory: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with the integrity fields added: ``files`` (every regular file under
    ``directory`` but ferry.json, by its '/'-separated path inside it, with its sha256) and
    ``content_sha256``. What `ferry export` calls on its staging directory just before writing
    ferry.json (``write_json(staging / MANIFEST, seal(staging, manifest))``).

    Raises:
        ArtifactError: a symbolic link or a special file in ``directory`` (an artifact holds its own files).
    """
    root = Path(directory)
    # the manifest as a reader will see it (ferry.files.write_json writes non-JSON values with str())
    out = json.loads(json.dumps(manifest, default=str))
    out.pop(CONTENT, None)
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise ArtifactError(f"{p}: a symbolic link or special file; an artifact holds only its own files")
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                files[rel] = sha256_file(Path(dirpath) / name)
    out[FILES] = dict(sorted(files.items()))
    out[CONTENT] = content_sha256(out)
    return out


def check_paths_and_content(p: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest names stays inside the artifact, and its content hash (when present) matches."""
    if CONTENT in manifest and manifest[CONTENT] != content_sha256(manifest):
        raise ArtifactError(
            f"{p / MANIFEST}: its content does not match its content_sha256: the manifest was edited after export "
            "(labels, statuses, gates...); re-export the checkpoint"
        )
    variants = manifest.get("variants")
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ArtifactError(f"{p / MANIFEST}: 'variants' must map names to objects; re-export the checkpoint")
    for name, info in variants.items():
        member(p, info.get("file"), f"variant '{name}' file")
        ext = info.get("external_data")
        if ext:
            member(p, ext.get("file") if isinstance(ext, dict) else None, f"variant '{name}' external data file")
    ref = manifest.get("reference")
    if ref:
        member(p, ref.get("file") if isinstance(ref, dict) else None, "reference file")
    files = manifest.get(FILES)
    if files is not None:
        if not isinstance(files, dict):
            raise ArtifactError(f"{p / MANIFEST}: 'files' must map paths to sha256 values; re-export the checkpoint")
        for name, sha in files.items():
            member(p, name, "files entry")
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise ArtifactError(f"{p / MANIFEST}: files entry {name!r} has no sha256; re-export the checkpoint")


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
    problem = manifest_problem(manifest)
    if problem:
        raise ArtifactError(f"{p / MANIFEST}: {problem}; re-export the checkpoint")
    check_paths_and_content(p, manifest)
    return Artifact(p, manifest)


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """The first key of an artifact manifest whose type is wrong (the readers then index it safely), or None."""
    def strings(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    for key in ("labels", "inputs", "outputs"):
        if not strings(manifest[key]) or not manifest[key]:
            return f"'{key}' must be a non-empty list of strings, not {json.dumps(manifest[key])[:80]}"
    variants = manifest["variants"]
    if not isinstance(variants, dict) or not variants:
        return f"'variants' must be a non-empty mapping of name to variant, not {json.dumps(variants)[:80]}"
    for name, info in variants.items():
        if not isinstance(info, dict) or not isinstance(info.get("file"), str):
            return f"variant '{name}' must be a mapping with a 'file' name"
        for key in ("status", "sha256", "engine", "precision", "device"):
            if key in info and not isinstance(info[key], str):
                return f"variant '{name}': '{key}' must be a string"
        for key in ("parity",):
            if key in info and info[key] is not None and not isinstance(info[key], dict):
                return f"variant '{name}': '{key}' must be a mapping"
    for key in ("default_variant", "reference", "source"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            return f"'{key}' must be a mapping"
    if "max_length" in manifest and (not isinstance(manifest["max_length"], int) or manifest["max_length"] < 2):
        return "'max_length' must be an integer >= 2"
    return None

"""What `ferry serve` and `ferry store` verify before serving or storing an artifact: every file the
manifest lists (tokenizer, config, reference logits, graphs), the manifest's own content, paths
that stay inside the artifact, the bytes ONNX Runtime loads, no symbolic links into the store.

The manifest's integrity fields are written by hand here, as `ferry export` is to write them:
``files`` maps each file's path inside the artifact to its sha256, and ``content_sha256`` is the
sha256 of the manifest's canonical JSON (sorted keys, no spaces, UTF-8) without that key.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from ferry.cli import main
from ferry.errors import ArtifactError
from runtime.artifact import check_valid_artifact_dir


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def canonical_sha256(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def write_manifest(art, m: dict, reseal: bool = True) -> None:
    if reseal:
        m["content_sha256"] = canonical_sha256(m)
    (art / "ferry.json").write_text(json.dumps(m, indent=2))


def sealed(src, dst):
    """A copy of ``src`` whose manifest lists every file with its sha256 and seals its own content."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "ferry.json").read_text())
    m["files"] = {p.relative_to(dst).as_posix(): sha256(p) for p in sorted(dst.rglob("*")) if p.is_file() and p.name != "ferry.json"}
    write_manifest(dst, m)
    return dst


@pytest.fixture
def art(served_artifact, tmp_path):
    return sealed(served_artifact, tmp_path / "sealed")


@pytest.fixture(scope="module")
def busy_port():
    """A port something already listens on: a `ferry serve` that got past its checks stops there, never serves."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def serve_error(art, capsys, port: int, *extra) -> str:
    rc = main(["serve", str(art), "--variant", "fp32", "--host", "127.0.0.1", "--port", str(port), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_sealed_artifact_passes_every_check(art):
    from runtime.predictor import Runtime, check_startup

    m = json.loads((art / "ferry.json").read_text())
    assert {"tokenizer.json", "config.json", "reference.jsonl", "model.onnx"} <= set(m["files"])
    assert check_startup(art, "fp32", "cpu").name == "fp32"
    rt = Runtime(art, variant="fp32", device="cpu")
    assert rt.classify(["the match team goal"])[0]["label"] in m["labels"]
    assert not any("not verified" in n for n in rt.notes)


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "reference.jsonl", "vocab.txt", "tokenizer_config.json",
                                  "special_tokens_map.json"])
def test_an_edited_file_stops_the_start(art, capsys, name, busy_port):
    with open(art / name, "ab") as f:
        f.write(b"\n")  # still valid for its reader: only the sha256 tells
    err = serve_error(art, capsys, busy_port)
    assert name in err and "does not match the manifest" in err


def test_a_listed_file_that_is_missing_stops_the_start(art, capsys, busy_port):
    (art / "special_tokens_map.json").unlink()
    err = serve_error(art, capsys, busy_port)
    assert "special_tokens_map.json" in err and "missing" in err


@pytest.mark.parametrize("edit", ["labels", "status", "gates"])
def test_an_edited_manifest_stops_the_start(art, capsys, edit, busy_port):
    m = json.loads((art / "ferry.json").read_text())
    if edit == "labels":
        m["labels"] = list(reversed(m["labels"]))
    elif edit == "status":
        m["variants"]["int8"]["batch_invariant"] = True
    else:
        m["variants"]["fp32"]["parity"]["gates"] = {"max_abs_diff": 1.0}
    write_manifest(art, m, reseal=False)
    err = serve_error(art, capsys, busy_port)
    assert "ferry.json" in err and "content_sha256" in err and "edited" in err


def test_a_manifest_without_files_lists_what_a_worker_loads(art, capsys, busy_port):
    """A files map that leaves out a file the server loads is refused: the map is all or nothing."""
    m = json.loads((art / "ferry.json").read_text())
    del m["files"]["tokenizer.json"]
    write_manifest(art, m)
    err = serve_error(art, capsys, busy_port)
    assert "tokenizer.json" in err and "not in the manifest's files" in err


@pytest.mark.parametrize("entry", ["../outside.json", "/etc/hostname", "sub/../../x", "", "a\\..\\..\\b"])
def test_file_entries_outside_the_artifact_are_refused(art, capsys, entry, busy_port):
    m = json.loads((art / "ferry.json").read_text())
    m["files"][entry] = "0" * 64
    write_manifest(art, m)
    with pytest.raises(ArtifactError, match="inside the artifact"):
        check_valid_artifact_dir(art)
    err = serve_error(art, capsys, busy_port)
    assert "inside the artifact" in err


@pytest.mark.parametrize("where", ["variant", "reference"])
def test_a_variant_or_reference_file_outside_the_artifact_is_refused(served_artifact, tmp_path, where):
    art = tmp_path / "a"
    shutil.copytree(served_artifact, art)
    m = json.loads((art / "ferry.json").read_text())
    if where == "variant":
        m["variants"]["fp32"]["file"] = str((served_artifact / "model.onnx").resolve())
    else:
        m["reference"]["file"] = "../a/reference.jsonl"
    write_manifest(art, m)
    with pytest.raises(ArtifactError, match="inside the artifact"):
        check_valid_artifact_dir(art)


def test_onnx_runtime_loads_the_bytes_that_were_verified(art, monkeypatch):
    """The file is replaced between the check and the load: the session is built from the verified bytes."""
    import onnxruntime as ort

    from runtime.predictor import Runtime

    real, seen = ort.InferenceSession, []

    def swapped_after_the_check(model, *a, **k):
        seen.append(type(model).__name__)
        (art / "model.onnx").write_bytes(b"replaced after the sha256 check")
        return real(model, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", swapped_after_the_check)
    rt = Runtime(art, variant="fp32", device="cpu")
    assert seen and set(seen) == {"bytes"}
    assert rt.classify(["the match team goal"])[0]["label"] == "sport"


def test_an_artifact_without_integrity_fields_is_served_with_a_note(served_artifact, tmp_path):
    from runtime.predictor import Runtime

    art = tmp_path / "old"
    shutil.copytree(served_artifact, art)
    m = json.loads((art / "ferry.json").read_text())
    m.pop("files", None)
    m.pop("content_sha256", None)
    (art / "ferry.json").write_text(json.dumps(m))  # as exported before ferry sealed artifacts
    rt = Runtime(art, variant="fp32", device="cpu")
    assert any("no per-file sha256" in n for n in rt.notes)


# --- ferry store -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "dir", "inside"])
def test_store_refuses_symlinks(served_artifact, tmp_path, bentoml_home, capsys, kind):
    art = tmp_path / "linked"
    shutil.copytree(served_artifact, art)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("not part of the artifact")
    if kind == "file":
        (art / "notes.txt").symlink_to(secret / "key.txt")
    elif kind == "dir":
        (art / "extra").symlink_to(secret, target_is_directory=True)
    else:
        (art / "copy.json").symlink_to(art / "config.json")
    before = set((bentoml_home / "models").rglob("*")) if (bentoml_home / "models").exists() else set()
    rc = main(["store", str(art), "--name", f"linked-{kind}"])
    err = capsys.readouterr().err
    assert rc == 2 and "symbolic link" in err and len(err.strip().splitlines()) == 1, err
    after = set((bentoml_home / "models").rglob("*")) if (bentoml_home / "models").exists() else set()
    assert not any(p.name == "key.txt" for p in after - before)
    assert not (bentoml_home / "models" / f"linked-{kind}").exists() or not any((bentoml_home / "models" / f"linked-{kind}").iterdir())


def test_seal_writes_what_the_reader_checks(served_artifact, tmp_path):
    """runtime.artifact.seal is what `ferry export` is to call on its staging directory before writing ferry.json."""
    from runtime.artifact import seal

    art = tmp_path / "s"
    shutil.copytree(served_artifact, art)
    m = json.loads((art / "ferry.json").read_text())
    sealed_m = seal(art, m)
    assert sealed_m["files"] == {p.relative_to(art).as_posix(): sha256(p) for p in sorted(art.rglob("*")) if p.is_file() and p.name != "ferry.json"}
    assert sealed_m["content_sha256"] == canonical_sha256(sealed_m)
    (art / "ferry.json").write_text(json.dumps(sealed_m, indent=2))
    artifact = check_valid_artifact_dir(art)
    assert artifact.verify_files() == sorted(sealed_m["files"]) and artifact.integrity_notes() == []
    (art / "link").symlink_to(art / "config.json")
    with pytest.raises(ArtifactError, match="symbolic link"):
        seal(art, m)

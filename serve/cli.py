"""`ferry serve` and `ferry store`: run the BentoML service on an artifact, or register it in the model store.

`ferry serve` checks everything it can before any server starts (the BentoML version, the
artifact, the variant, the model file's sha256, the ONNX session, the tokenizer, the port),
then runs ``bentoml serve serve.service:Ferry`` as a child process configured through
``FERRY_*`` environment variables, and stops it cleanly on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from ferry.config import opt
from ferry.errors import ConfigError, FerryError
from runtime.artifact import check_valid_artifact_dir
from runtime.predictor import resolve_device, task_inputs
from serve.settings import DEFAULT_MODEL, RunOptions, ServedModel, ServeSettings, worker_split

SERVICE = "serve.service:Ferry"
ROOT = Path(__file__).resolve().parent.parent  # the directory holding the serve, export and ferry packages


def port_number(value: Any) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port in 1..65535"


@dataclasses.dataclass
class Listen:
    """Where the server listens."""

    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = opt(3000, "TCP port to listen on", check=port_number)


@dataclasses.dataclass
class ServeArgs(RunOptions, Listen, ServedModel):
    """Serve an artifact over HTTP with BentoML (adaptive batching, CPU or CUDA)."""

    # A dataclass lists its bases' fields last base first: ServedModel's, Listen's, RunOptions',
    # then these; that is the order of --help.
    import_model: bool = opt(
        False, "register the artifact in the BentoML model store first and serve it from there", short="--import"
    )
    name: str = opt(DEFAULT_MODEL, "model store name for --import")


@dataclasses.dataclass
class StoreArgs:
    """Register an artifact in the BentoML model store, so a Bento built with bentofile.yaml carries it."""

    artifact: str | None = opt(None, "the artifact directory written by ferry export", positional=True)
    name: str = opt(DEFAULT_MODEL, "model name in the store (bentofile.yaml's service serves ferry-classifier:latest)")


def check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except PermissionError:
            raise ConfigError(f"--port {port}: permission denied on {host}; use a port above 1023") from None
        except OSError as e:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); is a server already running there?") from None


def store_artifact(path: str | Path, name: str = DEFAULT_MODEL) -> str:
    """Copy a checked artifact into the BentoML model store; returns the tag."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    from ferry.files import sha256_file

    artifact = check_valid_artifact_dir(path)
    check_own_files(artifact.path)
    artifact.verify_files()  # never store a modified file: every one the manifest lists
    for variant in artifact.variants.values():
        variant.verify()
    m = artifact.manifest
    metadata = {
        "task": artifact.task,
        "labels": artifact.labels,
        # the input shape of the task (max_length, or image_size); BentoML metadata takes no None
        **{key: {} if value is None else value for key, value in task_inputs(artifact).info().items()},
        "default_variant": m.get("default_variant") or {},
        "variants": {
            n: {k: x for k, x in (("precision", v.info.get("precision")), ("status", v.status),
                                  ("batch_invariant", v.info.get("batch_invariant"))) if x is not None}  # unmeasured (fp16 without CUDA): absent
            for n, v in artifact.variants.items()
        },
        "source_model_type": (m.get("source") or {}).get("model_type"),
        "manifest_sha256": sha256_file(artifact.path / "ferry.json"),
        "artifact": str(artifact.path.resolve()),
    }
    try:
        with bentoml.models.create(name, labels={"stage": "export", "project": "ferry"}, metadata=metadata) as model:
            for item in artifact.path.iterdir():
                target = Path(model.path) / item.name
                # symlinks=True: a link made after the check above is copied as a link, never followed
                if item.is_dir() and not item.is_symlink():
                    shutil.copytree(item, target, symlinks=True, dirs_exist_ok=True)
                elif item.is_file() and not item.is_symlink():
                    shutil.copy2(item, target, follow_symlinks=False)
    except BentoMLException as e:
        raise FerryError(f"--name {name}: BentoML refused to store the model ({e})") from None
    return str(model.tag)


def check_own_files(root: Path) -> None:
    """Refuse an artifact holding a symbolic link or a special file: `ferry store` copies the
    artifact's own files into the model store, never what a link points to (outside it, perhaps).

    Raises:
        FerryError: naming the first such entry.
    """
    import stat

    for dirpath, dirnames, filenames in os.walk(root):  # does not follow links to directories
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                raise FerryError(f"{p}: a symbolic link (to {os.readlink(p)}); ferry store copies only the artifact's own "
                                 "files: replace the link by a copy of its target, or re-export")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise FerryError(f"{p}: not a regular file or directory; ferry store copies only the artifact's own files")


def store(args: StoreArgs) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    tag = store_artifact(args.artifact, args.name)  # type: ignore[arg-type]
    print(tag)
    return 0


def serve(args: ServeArgs) -> int:
    from serve.bento_batcher import check_bentoml

    if args.artifact is None:
        raise ConfigError("ARTIFACT is required")
    # Everything a worker will do at start, done here first, so bad input is one line and no server.
    check_bentoml()  # a BentoML whose internals ferry does not know: one line, not a server that fails
    artifact = check_valid_artifact_dir(args.artifact)  # paths inside it, the manifest's content hash
    artifact.verify_files()  # every file its files map lists; a worker checks again what it loads
    settings = ServeSettings.of(args)
    settings.artifact = str(Path(args.artifact).resolve())
    # The split first: the start-up choice times the candidates with the threads a worker will have.
    settings.workers, settings.threads, settings.split = worker_split(resolve_device(args.device), args.workers, args.threads)
    runtime = settings.open_runtime(artifact, settings.threads)
    for note in runtime.notes:
        print(f"ferry serve: warning: {note}", file=sys.stderr)
    if runtime.choice is not None:
        for line in runtime.choice.log_lines():
            print(f"ferry serve: {line}", file=sys.stderr)
        # the choice made here, so each worker opens (and re-checks) that one instead of timing them all again
        settings.variant = runtime.variant.name
        settings.choice = json.dumps(runtime.choice.as_dict())
    # what the check above resolved "auto" to, so a worker never retries an unusable GPU
    settings.device = runtime.device if args.device == "auto" else args.device
    batch, latency = settings.batching(runtime.device)
    tokens = settings.batch_tokens(runtime.device)
    route = runtime.task.route
    print(f"ferry serve: {runtime.describe()}", file=sys.stderr)
    del runtime
    check_port(args.host, args.port)
    if args.import_model:
        settings.model_tag = store_artifact(args.artifact, args.name)  # type: ignore[arg-type]
        settings.artifact = None
        print(f"ferry serve: registered the artifact as {settings.model_tag}; serving it from the model store", file=sys.stderr)
    print(
        f"ferry serve: http://{args.host}:{args.port} (POST {route}, GET /info, /readyz, /metrics), "
        f"max_batch_size={batch}, max_batch_tokens={tokens}, max_latency_ms={latency}, "
        f"workers={settings.workers} x threads {settings.threads or 'auto'} ({settings.split}); Ctrl-C stops it",
        file=sys.stderr,
    )
    return run_server(settings, args.host, args.port)


def server_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port), "--working-dir", str(ROOT)]


def server_env(settings: ServeSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(settings.to_env())
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The server must import this checkout's packages, wherever ferry was started from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def run_server(settings: ServeSettings, host: str, port: int) -> int:
    """Run the server until Ctrl-C / SIGTERM, which stop it gracefully (status 0); a server that
    exits by itself is an error, whatever its status."""
    # Installed explicitly: a process started in the background inherits SIGINT ignored.
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    # Its own process group, so a hard stop can take the workers down with the arbiter.
    proc = subprocess.Popen(server_command(host, port), env=server_env(settings), cwd=str(ROOT), start_new_session=True)
    try:
        rc = proc.wait()
    except (_Stop, KeyboardInterrupt):
        stop(proc)
        print("ferry serve: stopped", file=sys.stderr)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # Not asked to stop, so it stopped itself (a worker that could not load or warm up its model).
    raise FerryError(f"the BentoML server stopped by itself (status {rc}); its log above says why")


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGINT (BentoML's graceful shutdown), then SIGKILL if it does not exit in ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # BentoML's arbiter stops its workers gracefully on it
    try:
        proc.wait(grace)
    except (subprocess.TimeoutExpired, _Stop, KeyboardInterrupt):  # too slow, or a second Ctrl-C: stop now
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


"""Per-epoch resume state of an interrupted `ferry finetune` run.

The training loop keeps everything it needs to continue in one ``state`` dict
(:func:`finetune.loop.initial_state`); :func:`save` writes it after every epoch but the last, and
:func:`restore` puts it back. It lives in ``<staging>/resume/`` (the staging directory is
``.<output>.incomplete``):

- ``model.safetensors``: the weights after the last finished epoch;
- ``best.safetensors``: the weights of the best epoch so far (early stopping keeps them);
- ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt`` with fp16): state dicts, loaded with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers
  (never arbitrary pickle);
- ``rng.safetensors``: every rank's torch (and CUDA) RNG state, for dropout, and the image
  augmentation generator's (``augment_rank<N>``);
- ``state.json``: the counters (:data:`COUNTERS`: epoch, best metric and epoch, early-stopping
  counters, history, time spent) and the run's identity (:func:`identity`: the settings, data
  hashes and number of processes it was started with; ``--resume`` refuses others).

``state.json`` is written last, so a state without it is ignored as incomplete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ferry.config import to_dict
from ferry.errors import FerryError, first_line
from ferry.files import fsync_dir, fsync_tree, write_json
from finetune.distributed import Dist, restore_rng

DIR = "resume"
STATE = "state.json"
# The entries of the state dict that are numbers and lists, saved in state.json.
COUNTERS = ("epoch", "best_metric", "best_epoch", "bad_epochs", "phase_best", "history", "loss_log", "train_seconds",
            "train_cpu_seconds", "trained_samples")
# The keys of state.json that --resume reads.
INFO_KEYS = (*COUNTERS, "settings", "data")
# Settings that may differ between an interrupted run and its --resume.
NOT_COMPARED_ON_RESUME = ("resume", "overwrite", "quiet")


def identity(args: Any, sources: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What a ``--resume`` must share with the interrupted run: its settings (but
    :data:`NOT_COMPARED_ON_RESUME`), each data file's sha256 and rows, and the number of processes."""
    return {
        "settings": {k: v for k, v in to_dict(args).items() if k not in NOT_COMPARED_ON_RESUME},
        "data": {name: (src.get("sha256"), src.get("rows")) for name, src in sources.items() if src},
        "world_size": world_size,
    }


def check(staging: Path, output: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The state.json of the interrupted run for ``output``, once it matches ``expected`` (:func:`identity`).

    Raises:
        FerryError: there is no finished epoch to resume, or the settings, data or number of
            processes differ.
    """
    if not staging.is_dir():
        raise FerryError(f"--resume: there is no interrupted run for --output {output} (no {staging}); run without --resume")
    info = read_info(staging)
    if info is None:
        raise FerryError(
            f"--resume: the interrupted run in {staging} finished no epoch, so there is nothing to resume; run without --resume"
        )
    differ = [
        f"{k} {info['settings'].get(k)!r} -> {v!r}" for k, v in expected["settings"].items() if info["settings"].get(k) != v
    ]
    if differ:
        raise FerryError(
            f"--resume: settings differ from the interrupted run's ({'; '.join(differ)}); "
            "use the same settings, or run without --resume"
        )
    saved_data = {k: tuple(v) for k, v in info["data"].items()}
    if saved_data != expected["data"]:
        changed = sorted(k for k in set(saved_data) | set(expected["data"]) if saved_data.get(k) != expected["data"].get(k))
        raise FerryError(f"--resume: the {', '.join(changed)} data changed since the interrupted run; run without --resume")
    if info.get("world_size", 1) != expected["world_size"]:
        raise FerryError(
            f"--resume: the interrupted run used {info.get('world_size')} processes, this one {expected['world_size']}; use the same"
        )
    return info


def cpu_copy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Detached, contiguous CPU copies (no shared storage, so safetensors accepts them)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}


def save(staging: Path, state: dict[str, Any], rng: dict[str, Any], ident: dict[str, Any]) -> None:
    """Write ``state``, every rank's ``rng`` and the run's identity ``ident`` (:func:`identity`) into a fresh
    folder, then swap it in, so a crash mid-write keeps the old one."""
    import torch
    from safetensors.torch import save_file

    final = staging / DIR
    tmp = staging / f"{DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(cpu_copy(state["model"].state_dict()), str(tmp / "model.safetensors"))
    if state["best"] is not None:
        save_file(state["best"], str(tmp / "best.safetensors"))
    torch.save(state["optimizer"].state_dict(), tmp / "optimizer.pt")
    torch.save(state["scheduler"].state_dict(), tmp / "scheduler.pt")
    if state["scaler"] is not None:
        torch.save(state["scaler"].state_dict(), tmp / "scaler.pt")
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    write_json(tmp / STATE, {**{k: state[k] for k in COUNTERS}, **ident})
    fsync_tree(tmp)
    old = staging / f"{DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)  # killed right after this, read_info puts it back
    tmp.rename(final)
    fsync_dir(staging)
    shutil.rmtree(old, ignore_errors=True)


def restore(state: dict[str, Any], staging: Path, info: dict[str, Any], dist: Dist, generators: dict[str, Any]) -> None:
    """Put the saved state back into ``state``: the weights, optimizer, schedule, scaler, best weights,
    this rank's RNG states (torch's and ``generators``) and the counters of ``info`` (:func:`check`)."""
    saved = load(staging, dist.device)
    state["model"].load_state_dict(saved["model"])
    state["optimizer"].load_state_dict(saved["optimizer"])
    state["scheduler"].load_state_dict(saved["scheduler"])
    if state["scaler"] is not None and saved["scaler"] is not None:
        state["scaler"].load_state_dict(saved["scaler"])
    state["best"] = saved["best"]
    restore_rng(dist, saved["rng"], generators)
    state.update({k: info[k] for k in COUNTERS})


def read_info(staging: Path) -> dict[str, Any] | None:
    """The state.json of a finished epoch, or None when there is none."""
    path = staging / DIR / STATE
    old = staging / f"{DIR}.old"
    if not (staging / DIR).exists() and (old / STATE).is_file():
        old.rename(staging / DIR)  # a run killed in the middle of save(): the previous state is whole
    if not path.is_file():
        return None
    damaged = FerryError(f"--resume: {path} is damaged; rerun without --resume")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise damaged from None
    if not isinstance(info, dict) or any(k not in info for k in INFO_KEYS):
        raise damaged
    if not (isinstance(info["settings"], dict) and isinstance(info["data"], dict) and isinstance(info["epoch"], int)):
        raise damaged
    return info


def load(staging: Path, device: Any) -> dict[str, Any]:
    """Tensors of the saved state: model, best (or None), optimizer, scheduler, scaler, rng."""
    import torch
    from safetensors.torch import load_file

    d = staging / DIR
    try:
        return {
            "model": load_file(str(d / "model.safetensors")),
            "best": load_file(str(d / "best.safetensors")) if (d / "best.safetensors").is_file() else None,
            "optimizer": torch.load(d / "optimizer.pt", map_location=device, weights_only=True),
            "scheduler": torch.load(d / "scheduler.pt", weights_only=True),
            "scaler": torch.load(d / "scaler.pt", weights_only=True) if (d / "scaler.pt").is_file() else None,
            "rng": load_file(str(d / "rng.safetensors")),
        }
    except FerryError:
        raise
    except Exception as e:  # a truncated or tampered file: safetensors/torch raise many types
        first = first_line(e)
        raise FerryError(f"--resume: the saved state in {d} cannot be read ({first}); rerun without --resume") from None


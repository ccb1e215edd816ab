"""Per-epoch resume state of an interrupted `ferry finetune` run.

Lives in ``<staging>/resume/`` (the staging directory is ``.<output>.incomplete``):

- ``model.safetensors``: the weights after the last finished epoch;
- ``best.safetensors``: the weights of the best epoch so far (early stopping keeps them);
- ``optimizer.pt``, ``scheduler.pt``: state dicts, loaded with ``torch.load(weights_only=True)``,
  which refuses anything but tensors and plain containers (never arbitrary pickle);
- ``rng.safetensors``: every rank's torch (and CUDA) RNG state, for dropout, and the image
  augmentation generator's (``augment_rank<N>``);
- ``state.json``: epoch, best metric and epoch, early-stopping counter, history, and the
  settings and data hashes the run was started with (``--resume`` refuses others).

``state.json`` is written last, so a state without it is ignored as incomplete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ferry.errors import FerryError, first_line
from ferry.files import fsync_dir, fsync_tree, write_json

DIR = "resume"
STATE = "state.json"
# The keys of state.json that --resume reads (finetune.train writes them).
INFO_KEYS = ("epoch", "best_metric", "best_epoch", "bad_epochs", "phase_best", "history", "loss_log", "train_seconds",
             "train_cpu_seconds", "trained_samples", "settings", "data")


def cpu_copy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Detached, contiguous CPU copies (no shared storage, so safetensors accepts them)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}


def save(
    staging: Path,
    *,
    model_state: dict[str, Any],
    best_state: dict[str, Any] | None,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    rng: dict[str, Any],
    info: dict[str, Any],
) -> None:
    """Write the resume state into a fresh folder, then swap it in, so a crash mid-write keeps the old one."""
    import torch
    from safetensors.torch import save_file

    final = staging / DIR
    tmp = staging / f"{DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(cpu_copy(model_state), str(tmp / "model.safetensors"))
    if best_state is not None:
        save_file(best_state, str(tmp / "best.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    write_json(tmp / STATE, info)
    fsync_tree(tmp)
    old = staging / f"{DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)  # killed right after this, read_info puts it back
    tmp.rename(final)
    fsync_dir(staging)
    shutil.rmtree(old, ignore_errors=True)


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


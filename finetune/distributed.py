"""Single process or torchrun: rank, device, reductions. Only rank 0 writes files.

Under ``torchrun --nproc-per-node N`` the environment has WORLD_SIZE > 1: the process
group uses NCCL on GPUs and gloo on CPU. Every helper here is a no-op in a single process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup() -> Dist:
    """Read torchrun's environment, pick the device, start the process group, set CPU threads."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    set_threads(local_world)
    if world > 1:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, local_world, device)


def set_threads(processes: int = 1) -> None:
    """Share this machine's cores among the local processes, unless OMP_NUM_THREADS says otherwise."""
    import torch

    from runtime.hardware import usable_cpus

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, usable_cpus() // max(1, processes)))


def teardown(d: Dist) -> None:
    if d.active:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as td

        td.barrier()


def reduce_sum(d: Dist, values: Any) -> Any:
    """Sum a numpy array (or list of numbers) over ranks; returns a numpy array."""
    import numpy as np
    import torch

    arr = np.asarray(values)
    if not d.active:
        return arr
    import torch.distributed as td

    t = torch.as_tensor(arr, dtype=torch.float64 if arr.dtype.kind == "f" else torch.int64, device=d.device)
    td.all_reduce(t)
    return t.cpu().numpy().astype(arr.dtype)


def rng_states(d: Dist, generators: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every rank's RNG state (gathered to all ranks), keyed by rank, for the resume state: torch's
    global generator (dropout), CUDA's, and the named ``generators`` (e.g. the image augmentation's)."""
    import torch

    mine = {"torch": torch.get_rng_state()}
    mine.update({name: g.get_state() for name, g in (generators or {}).items()})
    if d.device is not None and d.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(d.device)
    gathered = [mine]
    if d.active:
        import torch.distributed as td

        gathered = [None] * d.world_size
        td.all_gather_object(gathered, mine)  # in memory over the process group, never from a file
    return {f"{kind}_rank{r}": state.cpu() for r, states in enumerate(gathered) for kind, state in states.items()}


def restore_rng(d: Dist, saved: dict[str, Any], generators: dict[str, Any] | None = None) -> None:
    import torch

    for name, g in (generators or {}).items():
        key = f"{name}_rank{d.rank}"
        if key in saved:
            g.set_state(saved[key])
    key = f"torch_rank{d.rank}"
    if key in saved:
        torch.set_rng_state(saved[key])
    key = f"cuda_rank{d.rank}"
    if key in saved and d.device is not None and d.device.type == "cuda":
        torch.cuda.set_rng_state(saved[key], d.device)

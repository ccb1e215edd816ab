"""What this CPU can do: its model name and the instruction sets that decide which engine and
precision run fastest (AVX2, AVX-512, VNNI, bf16, AMX).

Read from ``/proc/cpuinfo`` (Linux); the text can be passed in, so tests fake any CPU.
No PyTorch here.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path
from typing import Any

# The ISA features ferry's choices depend on, and the cpuinfo flags that show each one.
FEATURES: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx512vnni", "avx_vnni"),
    "bf16": ("avx512_bf16", "amx_bf16"),
    "amx": ("amx_tile", "amx_int8", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
}


@dataclasses.dataclass(frozen=True)
class Cpu:
    """One CPU's model name, architecture and the :data:`FEATURES` it has."""

    model: str
    machine: str
    flags: frozenset[str]

    def has(self, feature: str) -> bool:
        """Whether the CPU has ``feature`` (a key of :data:`FEATURES`)."""
        return any(f in self.flags for f in FEATURES[feature])

    @property
    def features(self) -> dict[str, bool]:
        return {name: self.has(name) for name in FEATURES}

    @property
    def isa(self) -> str:
        """The int8 quantization target: arm64, avx512_vnni or avx2 (also the fallback)."""
        if self.machine in ("arm64", "aarch64"):
            return "arm64"
        return "avx512_vnni" if any(f in self.flags for f in ("avx512_vnni", "avx512vnni")) else "avx2"

    def describe(self) -> str:
        have = [name for name, yes in self.features.items() if yes]
        return f"{self.model} ({self.machine}; {', '.join(have) or 'no AVX2'})"

    def as_dict(self) -> dict[str, Any]:
        """What manifests and bench reports record."""
        return {"model": self.model, "machine": self.machine, "features": self.features,
                "flags": sorted(f for f in self.flags if any(f in v for v in FEATURES.values()))}


def read_cpu(cpuinfo: str | None = None, machine: str | None = None) -> Cpu:
    """This machine's :class:`Cpu` (or the one described by ``cpuinfo``, the text of /proc/cpuinfo)."""
    machine = (machine or platform.machine()).lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or machine, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in (platform.processor() or machine, machine):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags.update(value.split())
    return Cpu(model or machine, machine, frozenset(flags))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or taskset's share), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def physical_cores() -> int:
    """The physical cores of this machine (the logical ones where psutil cannot tell): the default
    engine threads of an export, a bench and a server's workers."""
    try:
        import psutil  # a BentoML dependency, and part of the export extra
    except ImportError:  # pragma: no cover
        return os.cpu_count() or 1
    return int(psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)

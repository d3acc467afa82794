"""Which GPUs fall in which VRAM class, by the worker's own rule (`farm.vram.detect_class`).

Kubernetes selects nodes by the label NVIDIA's GPU feature discovery puts on them,
`nvidia.com/gpu.memory` (the card's total memory in MiB, as NVML reports it); SkyPilot by
accelerator name. Both follow from one rule: a card belongs to the largest class it holds at
least DETECT_TOLERANCE of, counting a class in decimal GB as `detect_class` does. A flat
`class * 1024 * 0.95` MiB would be wrong at the edges: an L4 reports 23034 MiB, under
24 * 1024 * 0.95 = 23347, yet the worker rightly counts it a 24 GB card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from farm import vram
from farm.errors import UsageError

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
MIB = 2**20


@dataclass(frozen=True)
class CloudGPU:
    name: str           # SkyPilot's accelerator name
    memory_mib: int     # total memory as nvidia-smi / NVML report it
    compute: str        # CUDA compute capability


# GPUs rented as spot capacity on the major clouds. Only Turing (7.5) and newer: the worker
# image's torch 2.13 is built for CUDA 13, which dropped Maxwell, Pascal and Volta (P4, P100,
# V100, K80, M60), so those cards cannot run the image at all.
CLOUD_GPUS: tuple[CloudGPU, ...] = (
    CloudGPU("T4", 15360, "7.5"),
    CloudGPU("A10G", 23028, "8.6"),
    CloudGPU("A10", 23028, "8.6"),
    CloudGPU("L4", 23034, "8.9"),
    CloudGPU("RTX3090", 24576, "8.6"),
    CloudGPU("RTX4090", 24564, "8.9"),
    CloudGPU("A100", 40960, "8.0"),
    CloudGPU("A40", 46068, "8.6"),
    CloudGPU("L40", 46068, "8.9"),
    CloudGPU("L40S", 46068, "8.9"),
    CloudGPU("A100-80GB", 81920, "8.0"),
    CloudGPU("H100", 81559, "9.0"),
    CloudGPU("H200", 143771, "9.0"),
)


def floor_mib(vram_class: int) -> int:
    """The least memory (MiB) a card of this class reports: the worker's detection threshold."""
    return math.ceil(vram.DETECT_TOLERANCE * vram_class * 1e9 / MIB)


def class_of(memory_mib: int, classes: tuple[int, ...]) -> int | None:
    """The class a worker on this card declares with `--vram auto`; None below all classes."""
    fitting = [c for c in classes if memory_mib >= floor_mib(c)]
    return max(fitting) if fitting else None


def memory_range(vram_class: int, classes: tuple[int, ...]) -> tuple[int, int | None]:
    """[low, high) in MiB of the cards that belong to this class; high None for the largest."""
    bigger = [c for c in classes if c > vram_class]
    return floor_mib(vram_class), (floor_mib(min(bigger)) if bigger else None)


def node_affinity(vram_class: int, classes: tuple[int, ...]) -> dict[str, object]:
    """A required nodeAffinity for nodes whose GPU belongs to this class (Gt and Lt are strict
    and take integers, as strings)."""
    low, high = memory_range(vram_class, classes)
    expressions: list[dict[str, object]] = [
        {"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(low - 1)]}]
    if high is not None:
        expressions.append({"key": GPU_MEMORY_LABEL, "operator": "Lt", "values": [str(high)]})
    return {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": expressions}]}}


def accelerators(vram_class: int, classes: tuple[int, ...]) -> dict[str, int]:
    """SkyPilot candidates for a worker of this class, one GPU each: the cloud GPUs of exactly
    this class; when no cloud sells one (4-12 GB), the smallest cards above it, whose workers
    then declare the smaller class."""
    exact = [g for g in CLOUD_GPUS if class_of(g.memory_mib, classes) == vram_class]
    if not exact:
        above = [g for g in CLOUD_GPUS if g.memory_mib >= floor_mib(vram_class)]
        if not above:
            largest = max(g.memory_mib for g in CLOUD_GPUS)
            raise UsageError(f"no cloud GPU holds {vram_class} GB (the largest listed has "
                             f"{largest} MiB); leave that class out of --classes")
        smallest = min(class_of(g.memory_mib, classes) or 0 for g in above)
        exact = [g for g in above if (class_of(g.memory_mib, classes) or 0) == smallest]
    return {g.name: 1 for g in exact}

"""Which GPUs fall in which VRAM class, by the worker's own rule (`farm.vram.detect_class`).

Kubernetes selects nodes by the label NVIDIA's GPU feature discovery puts on them,
`nvidia.com/gpu.memory` (the card's total memory in MiB, as NVML reports it); SkyPilot by
accelerator name. Both follow from one rule: a card belongs to the largest class it holds at
least DETECT_TOLERANCE of, counting a class in decimal GB as `detect_class` does. A flat
`class * 1024 * 0.95` MiB would be wrong at the edges: an L4 reports 23034 MiB, under
24 * 1024 * 0.95 = 23347, yet the worker rightly counts it a 24 GB card.

A class is only worth deploying where some GPU is a card of that class: its workers are given
exactly those cards (Kubernetes: a node affinity on the memory label; SkyPilot: the accelerator
names). With `--classes 8,12,24` a T4 (15360 MiB) counts as 12 GB and no listed card as 8 GB,
so 8 GB workers would wait for a node forever while 8 GB jobs wait for them. `farm deploy k8s`
and `farm deploy skypilot` therefore refuse a class that no listed GPU (SkyPilot: no GPU a
cloud rents) falls in, and say which cards its jobs could use; left out of `--classes`, such
jobs are planned for the next class up, whose workers run them. A larger worker also takes a
smaller class's queues when its own are empty (farm/queues.py `worker_queues`), but KEDA starts
it only for its own backlog, so a class without cards of its own cannot rely on that.
`farm deploy compose` pins each class to a card you name by index, so it checks nothing here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from farm import vram
from farm.errors import UsageError

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
MIB = 2**20


@dataclass(frozen=True)
class GPU:
    name: str           # SkyPilot's accelerator name where a cloud rents it
    memory_mib: int     # total memory as nvidia-smi / NVML report it (the GFD label's value)
    compute: str        # CUDA compute capability
    cloud: bool         # rented by the clouds SkyPilot launches on (else: your own machines)


# Common cloud and workstation GPUs for SDXL. Only Turing (7.5) and newer: the worker image's
# torch 2.13 is built for CUDA 13, which dropped Maxwell, Pascal and Volta (P4, P100, V100, K80,
# M60), so those cards cannot run the image at all. Cards under 15 GB are not listed: no cloud
# rents one, and a Kubernetes class of them would, on a cloud cluster, select no node.
GPUS: tuple[GPU, ...] = (
    GPU("T4", 15360, "7.5", cloud=True),
    GPU("RTX4080", 16376, "8.9", cloud=False),
    GPU("RTXA4000", 16376, "8.6", cloud=False),
    GPU("A10G", 23028, "8.6", cloud=True),
    GPU("A10", 23028, "8.6", cloud=True),
    GPU("L4", 23034, "8.9", cloud=True),
    GPU("RTX3090", 24576, "8.6", cloud=True),
    GPU("RTX4090", 24564, "8.9", cloud=True),
    GPU("RTXA5000", 24564, "8.6", cloud=False),
    GPU("RTX5090", 32607, "12.0", cloud=False),
    GPU("A100", 40960, "8.0", cloud=True),
    GPU("A40", 46068, "8.6", cloud=True),
    GPU("L40", 46068, "8.9", cloud=True),
    GPU("L40S", 46068, "8.9", cloud=True),
    GPU("RTXA6000", 49140, "8.6", cloud=False),
    GPU("RTX6000Ada", 49140, "8.9", cloud=False),
    GPU("A100-80GB", 81920, "8.0", cloud=True),
    GPU("H100", 81559, "9.0", cloud=True),
    GPU("H200", 143771, "9.0", cloud=True),
)
CLOUD_GPUS: tuple[GPU, ...] = tuple(g for g in GPUS if g.cloud)


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


def cards_of(vram_class: int, classes: tuple[int, ...],
             gpus: Sequence[GPU] = GPUS) -> list[GPU]:
    """The GPUs that are cards of this class: those its workers are given."""
    return [g for g in gpus if class_of(g.memory_mib, classes) == vram_class]


def check_classes(classes: tuple[int, ...], gpus: Sequence[GPU] = GPUS) -> None:
    """UsageError, in one line, when a class has no card of its own among `gpus`: which classes,
    and which cards their jobs could use instead."""
    empty = [c for c in classes if not cards_of(c, classes, gpus)]
    if not empty:
        return
    listed = ",".join(map(str, classes))
    largest = max(gpus, key=lambda g: g.memory_mib)
    too_big = [c for c in empty if floor_mib(c) > largest.memory_mib]
    if too_big:
        raise UsageError(
            f"--classes {listed}: no listed GPU holds {_join(too_big, 'or')} GB (the largest, "
            f"{largest.name}, has {largest.memory_mib} MiB); leave {_join(too_big, 'and')} out "
            f"of --classes")
    # the jobs of an empty class can run on the cards of the next class up that has any
    first = min(empty)
    nxt = min(c for c in classes if c > first and cards_of(c, classes, gpus))
    names = [g.name for g in cards_of(nxt, classes, gpus)]
    cards = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise UsageError(
        f"--classes {listed}: no listed GPU counts as {_join(empty, 'or')} GB (a card counts as "
        f"the largest class it holds 95% of), so those workers would never get one; {first} GB "
        f"jobs could use {cards} ({nxt} GB here) or a larger card: leave "
        f"{_join(empty, 'and')} out of --classes and such jobs are planned for the next class up")


def _join(numbers: list[int], word: str) -> str:
    items = [str(n) for n in numbers]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


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
    this class (check_classes with CLOUD_GPUS refuses a class without one)."""
    cards = cards_of(vram_class, classes, CLOUD_GPUS)
    assert cards, f"no cloud GPU is a {vram_class} GB card: check_classes refuses that"
    return {g.name: 1 for g in cards}

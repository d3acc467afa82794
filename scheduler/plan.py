"""Planning: each job becomes stages, and each stage gets the smallest VRAM class that can run
it (farm/vram.py holds the rules and the peak table)."""

from __future__ import annotations

from dataclasses import dataclass

from farm import vram
from farm.jobs import JobSpec
from farm.lifecycle import Stage
from farm.settings import Settings


@dataclass(frozen=True)
class Plan:
    first_stage: Stage             # full, base or pair (farm/lifecycle.py Stage)
    vram_class: int                # the first stage's class
    refiner_vram_class: int | None  # the refiner stage's, when the job is split


def placement(spec: JobSpec, settings: Settings, stage: str = "base") -> vram.Placement:
    """The smallest configured class that can run a stage of the job, at or above its
    `min_vram`. Raises ValidationError when no configured class can (e.g. "width x height
    needs 20 GB for sdxl-base (base); the largest class is 12 GB")."""
    table = vram.load_table(settings.vram_table)
    model = spec.refiner if stage == "refiner" and spec.refiner else spec.model
    return vram.place(model, stage, spec.width, spec.height, spec.min_vram,
                      settings.vram_classes, table)


def plan(spec: JobSpec, settings: Settings) -> Plan:
    base = placement(spec, settings).vram_class
    if spec.refiner is None:
        return Plan(Stage.FULL, base, None)
    refiner = placement(spec, settings, "refiner").vram_class
    if spec.split == "never":
        # one worker holds both models: it must be of the bigger class the two need
        return Plan(Stage.PAIR, max(base, refiner), None)
    return Plan(Stage.BASE, base, refiner)

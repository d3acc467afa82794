"""Planning: which VRAM class each job's stage goes to (farm/vram.py holds the rules)."""

from __future__ import annotations

from farm import vram
from farm.jobs import JobSpec
from farm.settings import Settings


def placement(spec: JobSpec, settings: Settings) -> vram.Placement:
    """The smallest configured class that can run the job, at or above its `min_vram`.

    Raises ValidationError when no configured class can (e.g. "width x height needs 28 GB for
    sdxl-base (base); the largest class is 12 GB").
    """
    table = vram.load_table(settings.vram_table)
    return vram.place(spec.model, "base", spec.width, spec.height, spec.min_vram,
                      settings.vram_classes, table)

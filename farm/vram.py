"""VRAM classes: how big a GPU a stage needs, and how a worker of each class loads SDXL.

A worker declares a class (`--vram 8`, or auto-detected from the GPU). Its class picks a load
profile (PROFILE_BY_CLASS). The scheduler gives every stage the smallest class whose profile
fits the stage's peak VRAM, read from a table per (model, stage, profile, pixel bucket)
(vram_table.json, measured on an H200 by benchmarks/gpu_vram_table.py) and replaceable by one
measured on your own GPUs (FARM_VRAM_TABLE).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from farm.errors import ConfigError, ValidationError

DEFAULT_CLASSES = (4, 6, 8, 12, 16, 24, 48, 80)

# A card sold as "24 GB" reports a little less to CUDA (an L4: 23.8 GB, a T4: 15.8 GB), so a
# class fits when the card has at least this share of it.
DETECT_TOLERANCE = 0.95
# Leave this share of a class free for fragmentation and other processes. Calibrated so the
# guide's own assignments hold (model offload at 5.77 GB runs on 6 GB cards, lean at 6.91 GB on
# 8 GB; measured on an H200: 5.23 and 7.07): a class is nominal GiB, the figures are torch's peak
# allocated memory.
HEADROOM = 0.97


@dataclass(frozen=True)
class Profile:
    """How a worker loads a pipeline. Applied in worker/pipelines.py."""

    name: str
    offload: str            # "none", "model" (one component on the GPU at a time), "sequential"
    vae: str                # "default", "fp16-fix", "tiny" (TAESD-XL)
    fp8_weights: bool       # UNet weights stored as float8_e4m3fn, computed in fp16
    resident_pair: bool     # base and refiner both resident (a worker that serves both)
    summary: str


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("sequential-offload", "sequential", "tiny", False, False,
            "weights stream to the GPU layer by layer, tiny VAE; fits 4 GB, very slow"),
    Profile("model-offload", "model", "fp16-fix", False, False,
            "one component on the GPU at a time (text encoders, UNet, VAE), fp16-fix VAE"),
    Profile("lean", "none", "tiny", False, False,
            "fp16 resident with the tiny VAE: the fastest recipe that fits 8 GB"),
    Profile("lean-fp8", "none", "tiny", True, False,
            "as lean, UNet weights stored in fp8 (about 5% slower, ~2.5 GB less)"),
    Profile("resident", "none", "fp16-fix", False, False,
            "the whole fp16 pipeline resident, fp16-fix VAE"),
    Profile("resident-pair", "none", "fp16-fix", False, True,
            "base and refiner both resident, fp16-fix VAE"),
)}

# fp8 weight storage is the 6 GB class's default: it is what makes the resident recipe fit a
# 6 GB card (lean-fp8 peaks at 4.65 GB at 1 MP and 5.42 GB at 2 MP, within 6 x HEADROOM = 5.82;
# fp16 lean needs 7.07), where fp16 has to move each component on and off the GPU for every
# image (model-offload, 5.23 GB). fp8 costs about 5% of speed and moves pixels a little, so a
# class whose fp16 recipe fits keeps fp16: 8 GB (lean, 7.07 GB of 7.76 at 1 MP, every standard
# bucket) and up. At 4 GB no resident recipe fits even in fp8 (4.65 > 3.88): sequential offload.
PROFILE_BY_CLASS: dict[int, str] = {
    4: "sequential-offload", 6: "lean-fp8", 8: "lean", 12: "resident", 16: "resident",
    24: "resident-pair", 48: "resident-pair", 80: "resident-pair",
}

# Pixel buckets of the peak table: all nine standard SDXL resolutions are about 1 MP.
BUCKETS = (("1mp", 1024 * 1024 * 1.1), ("2mp", 1536 * 1536 * 1.05), ("4mp", 2048 * 2048 * 1.0))


def catalog_variant(profile: Profile) -> str:
    """The variant a worker of `profile` takes when a job names a catalog model by its bare
    name (farm/catalog.py `find`): the weights it holds in memory, so nothing is converted."""
    return "fp8" if profile.fp8_weights else "fp16"


def profile_for(vram_class: int) -> Profile:
    """The profile a worker of this class applies: the one of the nearest class at or below."""
    below = [c for c in PROFILE_BY_CLASS if c <= vram_class]
    name = PROFILE_BY_CLASS[max(below)] if below else PROFILE_BY_CLASS[min(PROFILE_BY_CLASS)]
    return PROFILES[name]


def detect_class(total_bytes: int, classes: tuple[int, ...]) -> int:
    """The largest class a card with `total_bytes` of memory holds; ConfigError below all."""
    fitting = [c for c in classes if total_bytes >= DETECT_TOLERANCE * c * 1e9]
    if not fitting:
        raise ConfigError(f"a GPU with {total_bytes / 1e9:.1f} GB is below the smallest VRAM "
                          f"class ({min(classes)} GB)")
    return max(fitting)


def bucket_of(width: int, height: int) -> str:
    pixels = width * height
    for name, limit in BUCKETS:
        if pixels <= limit:
            return name
    return BUCKETS[-1][0]


@dataclass(frozen=True)
class PeakTable:
    """Peak VRAM in GB per (model, stage, profile, bucket), with where each figure came from."""

    rows: dict[tuple[str, str, str, str], float]
    sources: dict[tuple[str, str, str, str], str]

    def peak(self, model: str, stage: str, profile: str, bucket: str) -> float | None:
        return self.rows.get((_family(model, stage), stage, profile, bucket))

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], origin: str) -> PeakTable:
        table: dict[tuple[str, str, str, str], float] = {}
        sources: dict[tuple[str, str, str, str], str] = {}
        for i, row in enumerate(rows):
            try:
                key = (row["model"], row["stage"], row["profile"], row["bucket"])
                table[key] = float(row["peak_gb"])
                sources[key] = str(row.get("source", origin))
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{origin}: row {i} needs model, stage, profile, bucket and "
                                  f"peak_gb: {exc}") from None
        return cls(table, sources)

    def merged(self, other: PeakTable) -> PeakTable:
        return PeakTable({**self.rows, **other.rows}, {**self.sources, **other.sources})


@lru_cache(maxsize=8)
def load_table(override: Path | None = None) -> PeakTable:
    """The seeded table, with the rows of `override` (measured figures) replacing its own."""
    seeded = json.loads(resources.files("farm").joinpath("vram_table.json").read_text())
    table = PeakTable.from_rows(seeded["rows"], "vram_table.json")
    if override is not None:
        try:
            data = json.loads(Path(override).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"FARM_VRAM_TABLE {override}: {exc}") from None
        table = table.merged(PeakTable.from_rows(data.get("rows", []), str(override)))
    return table


@dataclass(frozen=True)
class Placement:
    vram_class: int
    profile: str
    peak_gb: float


def place(model: str, stage: str, width: int, height: int, min_vram: int,
          classes: tuple[int, ...], table: PeakTable) -> Placement:
    """The smallest class that can run the stage, at or above the user's `min_vram`."""
    largest = max(classes)
    if min_vram > largest:
        raise ValidationError("min_vram", f"must be at most the largest class ({largest} GB)",
                              min_vram)
    bucket = bucket_of(width, height)
    needed: float | None = None
    for c in sorted(classes):
        profile = profile_for(c)
        peak = table.peak(model, stage, profile.name, bucket)
        if peak is None:
            continue
        needed = peak if needed is None else min(needed, peak)
        if c >= min_vram and peak <= c * HEADROOM:
            return Placement(c, profile.name, peak)
    if needed is None:
        raise ValidationError("model", f"has no VRAM figures for its {stage} stage at "
                              f"{bucket}", model)
    # the figure that would have to fit: what the largest class's own profile needs
    top = table.peak(model, stage, profile_for(largest).name, bucket) or needed
    raise ValidationError(
        "width", f"x height needs {top / HEADROOM:.0f} GB for {model} ({stage}); "
        f"the largest class is {largest} GB", f"{width}x{height}")


def _family(model: str, stage: str) -> str:
    """Local paths and the catalog's own models are planned as SDXL of the stage they run: an
    SDXL refiner in a refiner stage, an SDXL base otherwise (submit checks a catalog model's
    role against its stage: scheduler/parse.py `check_catalog_names`)."""
    from farm.models import CATALOG_REF, REGISTRY

    catalog = bool(CATALOG_REF.match(model)) and model not in REGISTRY
    if model.startswith("/") or catalog:
        return "sdxl-refiner" if stage == "refiner" else "sdxl-base"
    return model

"""Which models a job may name: an allow-list of names, or an explicit local path.

No arbitrary URLs, no path tricks: a model is either a name below, a Hugging Face Hub id that is
on the list, a model of the store's catalog (farm/catalog.py: `name`, `name@version`,
`sha256:<digest>`), or an absolute path to a local folder (diffusers layout) or a single-file
checkpoint (`.safetensors`). Loading itself lives in `worker/pipelines.py`, which takes a
model from the catalog first when the catalog holds it (under a name below too).

A catalog name is only a shape here; whether the catalog holds it is checked where the store is
at hand: `farm submit` (scheduler/parse.py, `check_catalog`) and the worker that pulls it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from farm.errors import ValidationError


@dataclass(frozen=True)
class ModelSpec:
    name: str            # what jobs and queues call it
    source: str          # "tiny" (built locally), "hub" (Hub id), "path" (local folder or file),
                         # "store" (the store's catalog)
    ref: str             # Hub id, local path, or the tiny model's folder name
    role: str            # "base" or "refiner"
    default_width: int
    default_height: int
    default_steps: int


# Tiny SDXL-architecture models with seeded random weights: what tests and the demo run, since no
# machine here can download weights. Small default size so a CPU renders one in about a second.
TINY_BASE = ModelSpec("tiny-sdxl", "tiny", "tiny-sdxl", "base", 128, 128, 20)
TINY_REFINER = ModelSpec("tiny-sdxl-refiner", "tiny", "tiny-sdxl-refiner", "refiner", 128, 128, 20)
SDXL_BASE = ModelSpec("sdxl-base", "hub", "stabilityai/stable-diffusion-xl-base-1.0", "base",
                      1024, 1024, 30)
SDXL_REFINER = ModelSpec("sdxl-refiner", "hub", "stabilityai/stable-diffusion-xl-refiner-1.0",
                         "refiner", 1024, 1024, 30)

REGISTRY: dict[str, ModelSpec] = {m.name: m for m in (TINY_BASE, TINY_REFINER, SDXL_BASE,
                                                      SDXL_REFINER)}
# the Hub ids themselves are accepted as aliases of their names
ALIASES: dict[str, str] = {m.ref: m.name for m in REGISTRY.values() if m.source == "hub"}

DEFAULT_MODEL = TINY_BASE.name
# the refiner each known base was made with: what the quality preset adds (farm/presets.py)
REFINER_OF: dict[str, str] = {TINY_BASE.name: TINY_REFINER.name,
                              SDXL_BASE.name: SDXL_REFINER.name}



@dataclass(frozen=True)
class VaeSpec:
    """A drop-in VAE the load profiles swap in (farm/vram.py `Profile.vae`) for real models."""

    kind: str            # the profile's name for it: "tiny" or "fp16-fix"
    name: str            # its name in the store's catalog (`farm models push HUB_ID` gives it)
    hub_id: str          # where it comes from when the catalog does not hold it
    cls: str             # its diffusers class


# A worker takes each from the store's catalog first (pushed once: README, "Models"), then the
# Hub, so a fleet whose store holds them downloads nothing from the Hub.
VAES: dict[str, VaeSpec] = {v.kind: v for v in (
    VaeSpec("tiny", "taesdxl", "madebyollin/taesdxl", "AutoencoderTiny"),
    VaeSpec("fp16-fix", "sdxl-vae-fp16-fix", "madebyollin/sdxl-vae-fp16-fix", "AutoencoderKL"),
)}

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+@=-]+$")
# the shape of a catalog reference (farm/catalog.py): name, name@version, sha256:<digest>
CATALOG_REF = re.compile(r"^([a-z0-9][a-z0-9._-]{0,63}(@[0-9]{1,6})?|sha256:[0-9a-f]{12,64})$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def resolve(name: str, role: str | None = None, field: str = "model") -> ModelSpec:
    """The model a job names, or ValidationError on `field`. With `role`, the model must be a
    base ("base") or a refiner ("refiner"); a local path takes the role it is given."""
    if not isinstance(name, str) or not name:
        raise ValidationError(field, "must be a model name or an absolute path", name)
    if name in REGISTRY or name in ALIASES:
        spec = REGISTRY[ALIASES.get(name, name)]
        if role is not None and spec.role != role:
            others = ", ".join(sorted(m.name for m in REGISTRY.values() if m.role == role))
            raise ValidationError(field, f"must be a {role} model ({others}), not a "
                                         f"{spec.role}", name)
        return spec
    if "://" in name:
        raise ValidationError(field, "must be a known model name or a local path, not a URL",
                              name)
    if name.startswith("/"):
        parts = PurePosixPath(name).parts
        if ".." in parts or not _SAFE_PATH.match(name):
            raise ValidationError(
                field, "must be an absolute path without '..' or unusual characters", name)
        return ModelSpec(name, "path", name, role or "base", 1024, 1024, 30)
    if CATALOG_REF.match(name):
        return ModelSpec(name, "store", name, role or "base", 1024, 1024, 30)
    raise ValidationError(field, unknown_rule(), name)


def unknown_rule(catalog: str | None = None) -> str:
    """The rule a model name breaks; `catalog`: what the store's catalog holds, when it has one."""
    known = ", ".join(sorted(REGISTRY))
    if catalog is None:
        return f"must be one of {known} or an absolute local path"
    return (f"must be one of {known}, a model of the store's catalog (it holds: {catalog}) or "
            "an absolute local path")


def pair_name(base: str, refiner: str) -> str:
    """The route of a job whose base and refiner run on one worker (split policy "never")."""
    return f"{base}+{refiner}"


def queue_slug(name: str) -> str:
    """A model name as it may appear in a queue name (paths become a short stable digest)."""
    if "+" in name:
        return "+".join(queue_slug(part) for part in name.split("+", 1))
    if name in REGISTRY:
        return name
    if name in ALIASES:
        return ALIASES[name]
    import hashlib

    return "path-" + hashlib.sha1(name.encode()).hexdigest()[:12]

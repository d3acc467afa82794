"""A pipeline as a worker holds it: loaded once (worker/pipelines.py), rendered with for every
job (worker/render.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from farm.models import ModelSpec


@dataclass
class LoadedModel:
    name: str
    spec: ModelSpec
    pipe: Any                         # StableDiffusionXL(Img2Img)Pipeline
    device: str
    dtype: torch.dtype
    weights_hash: str                 # sha256 over the weight files: worker/weights.py
    load_seconds: float
    # the scheduler config the model shipped with: every job's scheduler is built from this,
    # never from the previous job's, so switching samplers back and forth cannot drift
    scheduler_config: dict[str, Any]
    profile: str = "resident"         # the load profile applied (farm/vram.py)
    # the VAE the profile chose ("default", "fp16-fix" or "tiny") and the module itself, and the
    # tiny VAE (TAESD-XL) when the worker has one, for jobs that ask for it (the fast preset)
    vae_name: str = "default"
    profile_vae: Any = None
    tiny_vae: Any = None
    # the worker's recipe options applied (farm/recipe.py)
    recipe: tuple[str, ...] = ()
    # the catalog's model it was pulled as (farm/catalog.py): name, version, variant and the
    # manifest's digest; None for a model loaded from the Hub, a tiny build or a local path
    catalog: dict[str, Any] | None = None

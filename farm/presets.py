"""Presets: named sets of job defaults, from the SDXL optimisation guide. A job's own fields win
over its preset's; the README says what each trades.

    balanced  the model's steps, full CFG, the model's VAE (the default)
    fast      30 steps, CFG off after 75% of them, the tiny VAE (TAESD-XL) for decoding: the
              guide's fastest recipe (with a compiled UNet: 2.0 s on an H100 for 1024²)
    quality   50 steps, full CFG, the model's VAE, and the model's refiner (farm/models.py
              REFINER_OF) taking over at 0.9: the guide's ensemble of expert denoisers. A job
              on a model with no known refiner names its own, or is refused.
    turbo     as balanced, with the deep feature cache (worker/deepcache.py): the full UNet on
              every other step, its shallow blocks only on the rest (the guide measured DeepCache
              at about half the time, at some loss of detail). Opt-in.
"""

from __future__ import annotations

from typing import Any


class _ModelsRefiner:
    """A preset's refiner: whichever one the job's model is paired with (models.REFINER_OF)."""

    def __repr__(self) -> str:
        return "the model's refiner"


MODELS_REFINER = _ModelsRefiner()

PRESETS: dict[str, dict[str, Any]] = {
    "balanced": {},
    "fast": {"steps": 30, "cfg_cutoff": 0.75, "vae": "tiny"},
    "quality": {"steps": 50, "cfg_cutoff": 0.0, "vae": "default",
                "refiner": MODELS_REFINER, "switch": 0.9},
    "turbo": {"deep_cache": 2},
}
DEFAULT_PRESET = "balanced"
VAES = ("default", "tiny")

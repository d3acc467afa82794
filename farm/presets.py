"""Presets: named sets of job defaults, from the SDXL optimisation guide. A job's own fields win
over its preset's; the README says what each trades.

    balanced  the model's steps, full CFG, the model's VAE (the default)
    fast      30 steps, CFG off after 75% of them, the tiny VAE (TAESD-XL) for decoding: the
              guide's fastest recipe (with a compiled UNet: 2.0 s on an H100 for 1024²)
    quality   50 steps, full CFG, the model's VAE; a refiner takes over at 0.9
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "balanced": {},
    "fast": {"steps": 30, "cfg_cutoff": 0.75, "vae": "tiny"},
    "quality": {"steps": 50, "cfg_cutoff": 0.0, "vae": "default", "switch": 0.9},
}
DEFAULT_PRESET = "balanced"
VAES = ("default", "tiny")

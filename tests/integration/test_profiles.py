"""Each class's load profile is applied to a real (tiny) pipeline on CPU and still renders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from farm import models, vram
from farm.jobs import JobSpec
from farm.settings import Settings
from farm.worker import pipelines


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("profiles")
    return Settings(home=Path(home), threads=1)


@pytest.mark.parametrize("profile", list(vram.PROFILES))
def test_profile_is_applied_and_renders(settings: Settings, profile: str) -> None:
    chosen = vram.PROFILES[profile]
    model = pipelines.load_model(models.TINY_BASE, settings, "cpu", chosen)
    assert model.profile == profile
    vae = model.pipe.vae
    assert isinstance(vae, AutoencoderTiny if chosen.vae == "tiny" else AutoencoderKL)
    linear = next(m for m in model.pipe.unet.modules() if isinstance(m, torch.nn.Linear))
    expected = torch.float8_e4m3fn if chosen.fp8_weights else torch.float32
    assert linear.weight.dtype == expected
    spec = JobSpec.from_dict({"prompt": "a cat", "seed": 1, "steps": 2, "width": 64,
                              "height": 64}, settings)
    (image,) = pipelines.render(model, spec)
    assert image.size == (64, 64)

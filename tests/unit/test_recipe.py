"""A worker's recipe options (farm/recipe.py): what it accepts and what it refuses, in one line."""

from __future__ import annotations

import pytest
import torch

from farm import recipe
from farm.errors import ConfigError
from farm.settings import Settings


def test_options_come_back_in_one_order_and_none_means_none() -> None:
    assert recipe.parse("channels-last, fuse-qkv", "cpu") == ("fuse-qkv", "channels-last")
    assert recipe.parse("none", "cuda:0") == ()
    assert recipe.parse(None, "cpu") == recipe.DEFAULTS["cpu"]
    assert recipe.parse(None, "cuda:1") == recipe.DEFAULTS["cuda"]


@pytest.mark.parametrize("text", ["turbo", "fuse-qkv,warp", "", " , "])
def test_an_unknown_option_is_refused_naming_the_known_ones(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        recipe.parse(text, "cpu")
    assert str(err.value) == ("recipe must be `none` or options from fuse-qkv, channels-last, "
                              f"compile-vae, cuda-graphs, fp8 (comma-separated), got {text!r}")


def test_settings_check_the_recipe_names() -> None:
    assert Settings.load(env={"FARM_RECIPE": "fuse-qkv"}).recipe == "fuse-qkv"
    with pytest.raises(ConfigError, match="^recipe must be"):
        Settings.load(env={"FARM_RECIPE": "fuse_qkv"})


@pytest.mark.parametrize(("chosen", "device", "backend", "capability", "message"), [
    (("cuda-graphs",), "cpu", "inductor", None,
     "recipe option cuda-graphs needs a CUDA GPU; this worker runs on cpu"),
    (("fp8",), "cpu", "none", None, "recipe option fp8 needs a CUDA GPU; this worker runs on cpu"),
    (("fp8",), "cuda:0", "inductor", (8, 6),
     "recipe option fp8 needs a GPU of compute capability 8.9 or later (Ada, Hopper); this one "
     "is 8.6"),
    (("cuda-graphs",), "cuda:0", "regional", (9, 0),
     "recipe option cuda-graphs needs --compile inductor, got regional"),
    (("compile-vae",), "cpu", "none", None,
     "recipe option compile-vae needs --compile inductor or regional, got none"),
])
def test_a_recipe_the_worker_cannot_run_is_refused_in_one_line(
        chosen: tuple[str, ...], device: str, backend: str,
        capability: tuple[int, int] | None, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        recipe.check(chosen, device, backend, capability)
    assert str(err.value) == message


def test_what_a_gpu_can_run_passes() -> None:
    recipe.check(("fuse-qkv", "channels-last", "compile-vae", "cuda-graphs", "fp8"), "cuda:0",
                 "inductor", (9, 0))
    recipe.check(("fuse-qkv", "channels-last"), "cpu", "none", None)


def test_fp8_takes_the_linear_layers_torchao_can_quantize() -> None:
    from farm.worker import recipe as worker_recipe
    from farm.worker.tiny import make_pipeline

    unet = make_pipeline("tiny-sdxl").unet
    linears = {name: m for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    taken = {name for name, m in linears.items() if worker_recipe.fp8_fits(m)}
    square = {name for name, m in linears.items() if (m.out_features, m.in_features) == (128, 128)}
    odd = {name for name, m in linears.items() if m.out_features % 16 or m.in_features % 16}
    assert square, "the tiny UNet has a 128 x 128 layer (time_embedding.linear_2)"
    assert taken == set(linears) - square - odd
    assert taken  # most of the UNet's linear layers are quantized
    assert not worker_recipe.fp8_fits(unet.conv_in)

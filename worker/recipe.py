"""Applying a worker's recipe (farm/recipe.py) to a loaded pipeline.

    1. at load (apply_at_load): fused QKV projections, channels-last memory format, fp8 compute
    2. at compile (compile_mode, compile_vae, used by worker/compile.py): the CUDA-graph mode
       and the compiled VAE decoder(s)
"""

from __future__ import annotations

from typing import Any

import torch

from farm import recipe as recipes
from farm.errors import ConfigError

FP8_NEEDS = ("recipe option fp8 needs torchao (pip install torchao, a release that matches "
             "this torch); this worker does not have it")


def capability(device: str) -> tuple[int, int] | None:
    if not device.startswith("cuda"):
        return None
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return int(major), int(minor)


def resolve(text: str | None, device: str, backend: str) -> tuple[str, ...]:
    """The recipe a worker runs: parsed, checked against its device and compile backend (one
    line of ConfigError when it cannot run it)."""
    chosen = recipes.parse(text, device)
    recipes.check(chosen, device, backend, capability(device))
    if "fp8" in chosen:
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise ConfigError(FP8_NEEDS) from None
    return chosen


def apply_at_load(pipe: Any, chosen: tuple[str, ...], vaes: tuple[Any, ...] = ()) -> None:
    """The load-time options on `pipe` (and on extra VAEs it may swap in per job)."""
    if "fuse-qkv" in chosen:
        # one projection per attention instead of three; the VAE's mid-block attention too
        pipe.fuse_qkv_projections()
    if "channels-last" in chosen:
        for module in (pipe.unet, pipe.vae, *vaes):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if "fp8" in chosen:
        quantize_fp8(pipe.unet)


def quantize_fp8(unet: Any) -> None:
    """torchao's float8 dynamic-activation / float8-weight quantization of the UNet's linear
    layers that fp8_fits takes."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(),
              filter_fn=lambda module, _name: fp8_fits(module))


def fp8_fits(module: Any) -> bool:
    """A linear layer whose sizes fp8 matmuls take (multiples of 16), and not 128 x 128:
    torchao 0.18 (0.17 has the same check) reads a per-tensor scaled weight of exactly that
    shape as one scaled in 128 x 128 blocks and refuses its input ("input_tensor must be 1x128
    scaled"). Full-size SDXL has no such layer; the tiny test models do."""
    if not isinstance(module, torch.nn.Linear):
        return False
    rows, cols = module.out_features, module.in_features
    return rows % 16 == 0 and cols % 16 == 0 and (rows, cols) != (128, 128)


def compile_mode(chosen: tuple[str, ...]) -> str | None:
    """torch.compile's mode: CUDA graphs over each warmed shape, or inductor's default."""
    return "reduce-overhead" if "cuda-graphs" in chosen else None


def compile_vae(vaes: tuple[Any, ...], chosen: tuple[str, ...]) -> None:
    """Compile each VAE's decoder in place (its module tree and weights unchanged)."""
    if "compile-vae" not in chosen:
        return
    seen: set[int] = set()
    for vae in vaes:
        if vae is None or id(vae) in seen:
            continue
        seen.add(id(vae))
        vae.decoder.compile(dynamic=False, mode=compile_mode(chosen))

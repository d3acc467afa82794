"""A worker's GPU recipe: optional changes to how it runs its pipelines, each measured against
eager on the same weights for speed and pixels (benchmarks/bench_recipe.py on a CPU,
benchmarks/gpu_recipe.py on a GPU; docs/performance.md has the figures).

    fuse-qkv       one matmul for each attention's query, key and value (diffusers'
                   fuse_qkv_projections): fewer, larger kernels; exact up to rounding
    channels-last  UNet and VAE weights and activations in NHWC (the layout GPU convolution
                   kernels prefer); exact up to rounding
    compile-vae    compile the VAE decoder as well as the UNet (needs a compile backend)
    cuda-graphs    compile with mode="reduce-overhead": each warmed bucket shape is replayed as a
                   CUDA graph, removing per-kernel launch costs (CUDA only; needs --compile
                   inductor; a shape not warmed is captured mid-job)
    fp8            UNet linear layers computed in float8 (torchao's dynamic-activation /
                   float8-weight quantization): needs torchao and a GPU of compute capability
                   8.9 or later (Ada, Hopper); changes pixels (see the PSNR in the docs)

A worker's recipe is FARM_RECIPE / `farm worker --recipe` (comma-separated, or `none`); unset,
the device's default below. Options stay off by default until measured to pay on that device.
"""

from __future__ import annotations

from farm.errors import ConfigError

OPTIONS = ("fuse-qkv", "channels-last", "compile-vae", "cuda-graphs", "fp8")
CUDA_ONLY = ("cuda-graphs", "fp8")
# fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
FP8_CAPABILITY = (8, 9)

# The recipe a worker applies when none is given. CPU (tiny-sdxl, benchmarks/bench_recipe.py):
# no option paid there (docs/performance.md). CUDA (benchmarks/gpu_recipe.py, an H200, eager):
# fuse-qkv gained nothing, and channels-last's 0.82 of eager's time was one run in sequence,
# inside eager's own spread that session; the compiled options are not measured yet.
DEFAULTS: dict[str, tuple[str, ...]] = {"cpu": (), "cuda": ()}


def parse(text: str | None, device: str) -> tuple[str, ...]:
    """The options of `text` ("fuse-qkv,channels-last", "none", or None: the device's default),
    in OPTIONS order. Raises ConfigError naming an unknown one."""
    if text is None:
        return DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in OPTIONS]
    if unknown or not names:
        raise ConfigError(f"recipe must be `none` or options from {', '.join(OPTIONS)} "
                          f"(comma-separated), got {text!r}")
    return tuple(o for o in OPTIONS if o in names)


def check(recipe: tuple[str, ...], device: str, backend: str,
          capability: tuple[int, int] | None = None) -> None:
    """Refuse, in one line, a recipe this worker cannot run: CUDA-only options off CUDA, fp8
    below compute capability 8.9, options that need a compiler on a worker that compiles none."""
    on_cuda = device.startswith("cuda")
    for option in recipe:
        if option in CUDA_ONLY and not on_cuda:
            raise ConfigError(f"recipe option {option} needs a CUDA GPU; this worker runs on "
                              f"{device}")
    if "cuda-graphs" in recipe and backend != "inductor":
        raise ConfigError(f"recipe option cuda-graphs needs --compile inductor, got {backend}")
    if "compile-vae" in recipe and backend not in ("inductor", "regional"):
        raise ConfigError(f"recipe option compile-vae needs --compile inductor or regional, "
                          f"got {backend}")
    if "fp8" in recipe and capability is not None and capability < FP8_CAPABILITY:
        raise ConfigError(f"recipe option fp8 needs a GPU of compute capability 8.9 or later "
                          f"(Ada, Hopper); this one is {capability[0]}.{capability[1]}")

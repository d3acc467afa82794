"""Measure the peak-VRAM table the scheduler plans with (farm/vram_table.json) on a real GPU.

    python -m benchmarks.gpu_vram_table --out vram-measured.json
    export FARM_VRAM_TABLE=$PWD/vram-measured.json     # on every submitting machine

For each profile (farm/vram.py) and pixel bucket, it applies the profile exactly as a worker does
(worker.pipelines.apply_profile) to full-size SDXL base and refiner with random weights, renders
a few steps plus the VAE decode, and records torch's peak allocated memory. Not part of
`make bench` (it needs CUDA). `--cpu-smoke` runs the same code on the tiny models on a CPU, to
check the script itself where there is no GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch

from benchmarks import _sdxl_full
from farm import vram
from farm.worker.pipelines import apply_profile

BUCKET_SIZES = {"1mp": (1024, 1024), "2mp": (1536, 1536), "4mp": (2048, 2048)}
MODEL_OF = {"base": "sdxl-base", "refiner": "sdxl-refiner"}


def measure(pipe: Any, role: str, width: int, height: int, steps: int, device: str,
            smoke: bool) -> float:
    """Peak GB of one render (denoising and decode) with the pipeline as it is placed now."""
    if smoke:
        width, height = width // 16, height // 16
    generator = torch.Generator("cpu").manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if role == "base":
        pipe(prompt="a lighthouse at dusk", width=width, height=height,
             num_inference_steps=steps, generator=generator)
    else:
        latents = torch.randn(1, 4, height // 8, width // 8, generator=generator)
        pipe(prompt="a lighthouse at dusk", image=latents.to(pipe.unet.dtype),
             num_inference_steps=steps * 5, denoising_start=0.8, generator=generator)
    if not device.startswith("cuda"):
        return 0.0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def save(path: str, gpu: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"about": f"measured by benchmarks/gpu_vram_table.py on {gpu}", "rows": rows},
                  f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="vram-measured.json")
    parser.add_argument("--steps", type=int, default=4,
                        help="denoising steps per render: the peak is reached in the first")
    parser.add_argument("--buckets", default="1mp,2mp,4mp")
    parser.add_argument("--profiles", default=",".join(vram.PROFILES))
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda:0"
    dtype = torch.float32 if smoke else torch.float16
    gpu = "cpu (smoke run)" if smoke else torch.cuda.get_device_name(0)

    t0 = time.perf_counter()
    # built on the GPU (seconds, not minutes), then parked on the CPU: each profile places its
    # own copy, and the peak counts only what that placement puts on the GPU
    base = _sdxl_full.build("base", dtype, tiny_models=smoke, device=device)
    refiner = _sdxl_full.build("refiner", dtype, tiny_models=smoke, vae=base.vae,
                               text_encoder_2=base.text_encoder_2, device=device)
    base, refiner = base.to("cpu"), refiner.to("cpu")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"built base ({_sdxl_full.parameters(base.unet) / 1e9:.2f} B UNet params) and refiner "
          f"in {time.perf_counter() - t0:.0f} s on {gpu}")
    rows = []
    for name in args.profiles.split(","):
        profile = vram.PROFILES[name]
        for role, original in (("base", base), ("refiner", refiner)):
            pipe = copy.deepcopy(original)
            vae = (_sdxl_full.tiny_vae(dtype, tiny_models=smoke) if profile.vae == "tiny"
                   else _sdxl_full.fp16_fix_vae(pipe.vae) if profile.vae == "fp16-fix"
                   else None)
            apply_profile(pipe, profile, device, dtype, vae)
            partner = None
            if profile.resident_pair:  # the other model of the pair sits on the GPU too
                partner = copy.deepcopy(refiner if role == "base" else base).to(device)
            for bucket in args.buckets.split(","):
                width, height = BUCKET_SIZES[bucket]
                try:
                    peak = measure(pipe, role, width, height, args.steps, device, smoke)
                except torch.cuda.OutOfMemoryError:
                    peak = float("inf")
                print(f"{MODEL_OF[role]:<13} {name:<19} {bucket}  {peak:7.2f} GB", flush=True)
                if peak != float("inf"):
                    rows.append({"model": MODEL_OF[role], "stage": role, "profile": name,
                                 "bucket": bucket, "peak_gb": round(peak, 2),
                                 "source": f"measured: {gpu}, torch {torch.__version__}, "
                                           f"{time.strftime('%Y-%m-%d')}"})
            del pipe, partner
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            save(args.out, gpu, [] if smoke else rows)  # as it goes: a cut-short run keeps rows
    print(f"wrote {len(rows) if not smoke else 0} rows to {args.out} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

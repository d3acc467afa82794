"""Full-size SDXL on a GPU with random weights: eager vs compiled, the compile and the cached
cold start, peak VRAM, and the `fast` preset. 1024x1024, 30 steps.

    python -m benchmarks.gpu_sdxl --out gpu-sdxl.json          # on a CUDA machine (< 8 min)
    python -m benchmarks.gpu_sdxl --cpu-smoke                  # the same code, tiny, on a CPU

It renders through the worker's own code (worker.render, worker.compile), on a pipeline built
from the published SDXL configs with random weights (compute does not depend on the values).
The cached cold start is a second process with an empty local inductor cache that loads the
artefacts the first one saved: what a new cloud worker does with the fleet cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _sdxl_full
from farm import models
from farm.jobs import JobSpec
from farm.settings import Settings
from farm.worker import compile
from farm.worker.pipelines import LoadedModel
from farm.worker.render import render, warm_buckets


def _model(smoke: bool) -> LoadedModel:
    device = "cpu" if smoke else "cuda:0"
    dtype = torch.float32 if smoke else torch.float16
    pipe = _sdxl_full.build("base", dtype, tiny_models=smoke, device=device)
    pipe.vae = _sdxl_full.fp16_fix_vae(pipe.vae)  # the resident profile's VAE
    pipe.set_progress_bar_config(disable=True)
    tiny_vae = _sdxl_full.tiny_vae(dtype, tiny_models=smoke, device=device)
    return LoadedModel(name="sdxl-base", spec=models.SDXL_BASE, pipe=pipe, device=device,
                       dtype=dtype, weights_hash="random", load_seconds=0.0,
                       scheduler_config=dict(pipe.scheduler.config), profile="resident",
                       vae_name="default", profile_vae=pipe.vae, tiny_vae=tiny_vae)


def _size(smoke: bool) -> tuple[int, int]:
    return (64, 64) if smoke else (1024, 1024)


def _spec(smoke: bool, **fields: Any) -> JobSpec:
    w, h = _size(smoke)
    settings = Settings(buckets=f"{w}x{h}")
    return JobSpec.from_dict({"prompt": "a lighthouse on a basalt cliff at dusk", "seed": 1,
                              "steps": 30, "width": w, "height": h, "model": "sdxl-base",
                              **fields}, settings)


def _timed(model: LoadedModel, spec: JobSpec, n: int) -> list[float]:
    out = []
    for _ in range(n):
        if model.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        render(model, spec)
        if model.device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def cached_cold_start(smoke: bool, artefacts: str) -> None:
    """The second process: build, load the fleet artefacts, compile and warm (timed)."""
    model = _model(smoke)
    t = time.perf_counter()
    torch.compiler.load_cache_artifacts(Path(artefacts).read_bytes())
    compile.wrap(model, "inductor")
    warm_buckets(model, (_size(smoke),))
    print(json.dumps({"cached_cold_start_s": time.perf_counter() - t}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-sdxl.json")
    parser.add_argument("--images", type=int, default=3, help="timed images per variant")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--cached-cold-start", help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if args.cached_cold_start:
        cached_cold_start(smoke, args.cached_cold_start)
        return
    t_all = time.perf_counter()
    gpu = "cpu (smoke run)" if smoke else torch.cuda.get_device_name(0)
    figures: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "size": list(_size(smoke)),
                               "steps": 30}

    def note(**found: Any) -> None:  # written as it goes: a run cut short keeps what it has
        figures.update(found, total_s=time.perf_counter() - t_all)
        Path(args.out).write_text(json.dumps(figures, indent=2))
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in found.items()), flush=True)

    model = _model(smoke)
    note(build_s=time.perf_counter() - t_all)
    spec, fast = _spec(smoke), _spec(smoke, preset="fast")
    _timed(model, spec, 1)  # first-call costs
    eager = _timed(model, spec, args.images)
    note(eager_s_per_image=sorted(eager)[len(eager) // 2])
    if not smoke:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    compile.wrap(model, "inductor")
    warm_buckets(model, (_size(smoke),))
    note(compile_s=time.perf_counter() - t)
    compiled = _timed(model, spec, args.images)
    note(compiled_s_per_image=sorted(compiled)[len(compiled) // 2])
    fast_times = _timed(model, fast, args.images)
    peak = 0.0 if smoke else torch.cuda.max_memory_allocated() / 2**30
    note(fast_preset_s_per_image=sorted(fast_times)[len(fast_times) // 2], peak_vram_gb=peak)
    saved = torch.compiler.save_cache_artifacts()
    artefacts = Path(tempfile.mkdtemp()) / "artefacts.bin"
    artefacts.write_bytes(saved[0] if saved else b"")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
    cmd = [sys.executable, "-m", "benchmarks.gpu_sdxl", "--cached-cold-start", str(artefacts)]
    probe = subprocess.run(cmd + (["--cpu-smoke"] if smoke else []), env=env, check=True,
                           capture_output=True, text=True)
    cached_s = json.loads(probe.stdout.strip().splitlines()[-1])["cached_cold_start_s"]
    note(cached_cold_start_s=cached_s, artefact_bytes=artefacts.stat().st_size,
         compiled_over_eager=figures["compiled_s_per_image"] / figures["eager_s_per_image"])


if __name__ == "__main__":
    main()

"""One worker's compile of every bucket, in a fresh process (run by bench_compile_buckets.py
and benchmarks/gpu_session.sh).

    python -m benchmarks._bucket_probe MODE BACKEND MODEL ROUNDS [CACHE_IN|- [CACHE_OUT|-]]

MODE `static` (dynamic=False): each bucket and CFG state is its own graph. MODE `dynamic`
(dynamic=True, the worker's way: worker/compile.py DYNAMIC_SHAPES): one graph with symbolic
height and width (a UNet batch of 1, CFG off, is still its own graph, since dynamo
specialises size-1 dimensions). BACKEND: `regional` or `inductor`. MODEL: `tiny`
(tiny-sdxl at its nine SDXL-shaped buckets, CPU) or `sdxl` (full-size SDXL base with random
weights at the nine SDXL buckets, CUDA, benchmarks/_sdxl_full.py).

Per bucket, in order: seconds to warm it compiled (CFG on and off, worker/render.py
warm_buckets) minus the same warm-up eager = its compile seconds (with CACHE_IN: the whole
warm-up, as a new worker does no eager one), and the graphs after it;
`ready_s`: process start to every bucket compiled and warm (eager figures not counted). On a
GPU the eager images come from the same pipeline before it is compiled, in the run with
nothing cached only.
Then ROUNDS images per bucket, compiled and eager interleaved: seconds per image and the
largest pixel difference. CACHE_IN: fleet-cache artefacts to load first; CACHE_OUT: where to
save them. Prints one JSON line.

With PROBE_REFERENCE=FILE.npz the first bucket is also rendered as a job of each preset that
renders the base alone (balanced, fast): eager in the run with nothing cached (its pixels saved
to FILE), and compiled once every bucket is warm, in each run (seconds per image, the median of
PROBE_IMAGES after one untimed, and the PSNR against the eager pixels in FILE): what a ready
worker renders, and whether a worker warmed from the fleet cache renders the same pixels.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRESETS = ("balanced", "fast")  # the presets that render the base alone


def _load(model: str, settings: Any) -> tuple[Any, Any, tuple[tuple[int, int], ...]]:
    from farm import buckets, models
    from farm.worker import pipelines

    if model == "tiny":
        sizes = tuple((w // 8, h // 8) for w, h in buckets.SDXL_BUCKETS)
        return (pipelines.load_model(models.TINY_BASE, settings, "cpu"),
                pipelines.load_model(models.TINY_BASE, settings, "cpu"), sizes)
    import torch

    from benchmarks import _sdxl_full
    from farm.worker.model import LoadedModel

    pipe = _sdxl_full.build("base", torch.float16, device="cuda:0")
    pipe.vae = _sdxl_full.fp16_fix_vae(pipe.vae)  # the resident profile's VAE
    pipe.set_progress_bar_config(disable=True)
    tiny_vae = _sdxl_full.tiny_vae(torch.float16, device="cuda:0")  # the fast preset's VAE
    loaded = LoadedModel(name="sdxl-base", spec=models.SDXL_BASE, pipe=pipe, device="cuda:0",
                         dtype=torch.float16, weights_hash="random", load_seconds=0.0,
                         scheduler_config=dict(pipe.scheduler.config), profile="resident",
                         vae_name="fp16-fix", profile_vae=pipe.vae,
                         tiny_vae=tiny_vae)
    # one pipeline: the eager figures are taken from it before its UNet is wrapped (see main)
    return loaded, None, buckets.SDXL_BUCKETS


def main() -> None:
    mode, backend, model_name, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cache_in = sys.argv[5] if len(sys.argv) > 5 else "-"
    cache_out = sys.argv[6] if len(sys.argv) > 6 else "-"
    started = time.perf_counter()
    import numpy as np
    import torch

    from farm.jobs import JobSpec
    from farm.settings import Settings
    from farm.worker import compile, pipelines

    if model_name == "tiny":
        torch.set_num_threads(1)
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="farm-bucket-probe-")), threads=1)
    model, eager, sizes = _load(model_name, settings)
    loaded_s = time.perf_counter() - started

    def sync() -> None:
        if model.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn: Any) -> tuple[float, Any]:
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out

    steps = 8 if model_name == "tiny" else 30

    def spec(w: int, h: int, preset: str = "balanced") -> JobSpec:
        return JobSpec.from_dict({"prompt": "a lighthouse", "seed": 3, "steps": steps,
                                  "width": w, "height": h, "model": model.name,
                                  "preset": preset}, settings)

    figures: dict[str, Any] = {"mode": mode, "backend": backend, "model": model_name,
                               "steps": steps, "loaded_s": loaded_s, "device": model.device}

    def report(**more: Any) -> None:
        """One JSON line of everything so far: a run cut short keeps what it measured."""
        figures.update(more)
        print(json.dumps(figures), flush=True)

    # 1. eager: the warm-up of each bucket (subtracted below) and, for one pipeline on a GPU,
    #    the per-image reference before the UNet is wrapped
    #    (not in the run with the fleet cache: a new worker warms nothing eager, so its
    #    compile seconds are its whole warm-up)
    reference = eager or model
    eager_warm = {f"{w}x{h}": timed(lambda w=w, h=h: pipelines.warm_buckets(
        reference, ((w, h),)))[0] if cache_in == "-" else 0.0 for w, h in sizes}
    eager_images: dict[str, list[float]] = {f"{w}x{h}": [] for w, h in sizes}
    eager_pixels: dict[str, Any] = {}
    if eager is None and cache_in == "-":  # the cached run skips them: the cold one has them
        for w, h in sizes:
            for _ in range(rounds):
                took, out = timed(lambda w=w, h=h: pipelines.render(model, spec(w, h)))
                eager_images[f"{w}x{h}"].append(took)
                eager_pixels[f"{w}x{h}"] = np.array(out[0]).astype(int)

    reference_file = os.environ.get("PROBE_REFERENCE")
    # at the first bucket, per preset: eager and compiled seconds, PSNR
    presets: dict[str, dict[str, float]] = {}
    if reference_file and cache_in == "-":
        w, h = sizes[0]
        pixels: dict[str, Any] = {}
        for preset in PRESETS:
            took, out = timed(lambda w=w, h=h, p=preset: pipelines.render(model, spec(w, h, p)))
            presets[preset] = {"eager_s": took}
            pixels[preset] = np.asarray(out[0])
        np.savez(reference_file, **pixels)
        report(presets=presets, presets_bucket=f"{w}x{h}")

    # 2. compile: the fleet cache's artefacts first when given, then every bucket in turn
    t0 = time.perf_counter()
    if cache_in != "-":
        torch.compiler.load_cache_artifacts(Path(cache_in).read_bytes())
    compile.configure()
    if backend == "regional":
        model.pipe.unet.compile_repeated_blocks(dynamic=mode == "dynamic")
    else:
        model.pipe.unet = torch.compile(model.pipe.unet, dynamic=mode == "dynamic")
    all_buckets_s = time.perf_counter() - t0
    per_bucket = []
    for w, h in sizes:
        took, _ = timed(lambda w=w, h=h: pipelines.warm_buckets(model, ((w, h),)))
        all_buckets_s += took
        per_bucket.append({"bucket": f"{w}x{h}", "warm_s": took,
                           "compile_s": max(0.0, took - eager_warm[f"{w}x{h}"]),
                           "graphs": compile.graphs()})
        if cache_out != "-":  # after every bucket (not timed): a run cut short leaves them
            saved = torch.compiler.save_cache_artifacts()
            if saved is not None:
                Path(cache_out).write_bytes(saved[0])
        report(per_bucket=per_bucket, eager_images=eager_images, all_buckets_s=all_buckets_s,
               ready_s=loaded_s + all_buckets_s)
    graphs_warm = compile.graphs()
    if reference_file:  # the ready worker: each preset's job at the first bucket
        from benchmarks._stats import psnr

        w, h = sizes[0]
        eager_pixels_of = dict(np.load(reference_file)) if Path(reference_file).exists() else {}
        for preset in PRESETS:
            pipelines.render(model, spec(w, h, preset))  # untimed: the tiny VAE's first call
            times, out = [], None
            for _ in range(int(os.environ.get("PROBE_IMAGES", "3"))):
                took, out = timed(lambda w=w, h=h, p=preset: pipelines.render(model,
                                                                                spec(w, h, p)))
                times.append(took)
            found = presets.setdefault(preset, {})
            found["compiled_s"] = sorted(times)[len(times) // 2]
            if preset in eager_pixels_of and out is not None:
                found["psnr_db_vs_eager"] = psnr(out[0], eager_pixels_of[preset])
            report(presets=presets, presets_bucket=f"{w}x{h}")

    # 3. per image, each bucket, CFG on all steps: compiled (and eager, interleaved, on CPU)
    per_image: dict[str, dict[str, list[float]]] = {}
    diff = 0
    for w, h in sizes:
        key = f"{w}x{h}"
        per_image[key] = {"compiled": [], "eager": eager_images[key]}
        for _ in range(rounds):
            if eager is not None:
                took, out = timed(lambda w=w, h=h: pipelines.render(eager, spec(w, h)))
                per_image[key]["eager"].append(took)
                eager_pixels[key] = np.array(out[0]).astype(int)
            took, out = timed(lambda w=w, h=h: pipelines.render(model, spec(w, h)))
            per_image[key]["compiled"].append(took)
            if key in eager_pixels:
                diff = max(diff, int(np.abs(np.array(out[0]).astype(int)
                                            - eager_pixels[key]).max()))
        report(per_image=per_image)
    from torch._dynamo.utils import counters

    report(graphs=graphs_warm,
           new_graphs_while_rendering=compile.graphs() - graphs_warm, max_pixel_diff=diff,
           fxgraph_cache={k: int(v) for k, v in counters["inductor"].items()
                          if k.startswith("fxgraph_cache")},
           device_name=torch.cuda.get_device_name() if model.device.startswith("cuda")
           else "cpu", done=True)


if __name__ == "__main__":
    main()

"""The recipe options, the turbo preset and batched rendering on CPU with tiny-sdxl: seconds per
image against eager `balanced` on the same weights, and the pixel difference (PSNR, dB) of
each against it.

    python -m benchmarks recipe

Every variant renders the same job (one prompt, one seed) through the worker's own code
(worker.pipelines.load_model with the recipe, worker.render.render), one thread as a CPU worker
runs; the variants take turns round after round so a busy machine slows all of them alike.
The VAE compile is measured with the UNet eager, so its ratio is the decoder's share alone.
Batched: one pipeline call for B jobs of the same bucket and steps (their own prompts and
seeds), images per second against the same B jobs one by one, and the PSNR of each batched
image against the same job rendered alone.

Batched in the worker, end to end (`worker_throughput`): a real `farm worker --device cpu`
process (tiny-sdxl, one thread) with FARM_BATCH_JOBS=1, then another with FARM_BATCH_JOBS=4,
each given the same queued jobs, all queued before it starts (a warm-up batch, then the
measured ones). A batch's time runs from its first job's start to its last job's end, as the
job records have them; images/s of each and their ratio.

    python -c "from benchmarks.bench_recipe import worker_throughput; worker_throughput()"
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from benchmarks._farm import LocalFarm
from benchmarks._stats import machine_busy, psnr, summary, table
from farm import models
from farm.jobs import JobSpec
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.worker import pipelines, recipe
from farm.worker.model import LoadedModel

ROUNDS = 5
SIZE, STEPS = 128, 20         # tiny-sdxl's default bucket and steps
BATCHES = (2, 4)
PROMPTS = ("a lighthouse on a basalt cliff at dusk", "a red fox in fresh snow",
           "a tram crossing a bridge in the rain", "a bowl of ramen, steam rising")


def _spec(settings: Settings, **fields: Any) -> JobSpec:
    return JobSpec.from_dict({"prompt": PROMPTS[0], "seed": 7, "steps": STEPS, "width": SIZE,
                              "height": SIZE, **fields}, settings)


def _render(model: LoadedModel, spec: JobSpec) -> tuple[float, PIL.Image.Image]:
    t = time.perf_counter()
    image = pipelines.render(model, spec)[0]
    return time.perf_counter() - t, image


def _batched(model: LoadedModel, specs: list[JobSpec]) -> list[PIL.Image.Image]:
    """B jobs of one bucket and step count in one pipeline call: their prompts and their own
    generators batched, as a batching worker would."""
    pipe = model.pipe
    pipe.scheduler = pipelines.make_scheduler(model, "euler")
    out = pipe(prompt=[s.prompt for s in specs], width=SIZE, height=SIZE,
               num_inference_steps=STEPS, guidance_scale=specs[0].guidance,
               generator=[torch.Generator("cpu").manual_seed(s.seed) for s in specs],
               output_type="pil")
    return list(out.images)


def run() -> dict[str, Any]:
    torch.set_num_threads(1)
    busy = machine_busy()
    home = Path(tempfile.mkdtemp(prefix="farm-recipe-"))
    settings = Settings(home=home, threads=1)
    load = {name: pipelines.load_model(models.TINY_BASE, settings.replace(recipe=text), "cpu")
            for name, text in (("eager", "none"), ("fuse-qkv", "fuse-qkv"),
                               ("channels-last", "channels-last"),
                               ("fuse-qkv+channels-last", "fuse-qkv,channels-last"))}
    balanced, turbo = _spec(settings), _spec(settings, preset="turbo")
    turbo3 = _spec(settings, preset="turbo", deep_cache=3)
    # the VAE decoder compiled, the UNet eager: what compile-vae adds on top of a UNet compile
    vae_model = pipelines.load_model(models.TINY_BASE, settings.replace(recipe="none"), "cpu")
    t0 = time.perf_counter()
    recipe.compile_vae((vae_model.pipe.vae,), ("compile-vae",))
    _render(vae_model, balanced)
    vae_compile_s = time.perf_counter() - t0
    variants: dict[str, tuple[LoadedModel, JobSpec]] = {
        "eager (balanced)": (load["eager"], balanced),
        "fuse-qkv": (load["fuse-qkv"], balanced),
        "channels-last": (load["channels-last"], balanced),
        "fuse-qkv+channels-last": (load["fuse-qkv+channels-last"], balanced),
        "compile-vae (UNet eager)": (vae_model, balanced),
        "turbo (deep_cache 2)": (load["eager"], turbo),
        "deep_cache 3": (load["eager"], turbo3),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    images: dict[str, PIL.Image.Image] = {}
    for model, spec in variants.values():
        _render(model, spec)  # first-call costs
    for _ in range(ROUNDS):
        for name, (model, spec) in variants.items():
            seconds, image = _render(model, spec)
            times[name].append(seconds)
            images[name] = image
    reference = images["eager (balanced)"]
    ref_s = summary(times["eager (balanced)"])["median"]
    rows, figures = [], {}
    for name in variants:
        s = summary(times[name])
        figures[name] = {"s_per_image": s, "over_eager": s["median"] / ref_s,
                         "psnr_db_vs_eager": psnr(images[name], reference)}
        rows.append([name, f"{s['median'] * 1000:.0f}", f"{s['median'] / ref_s:.2f}",
                     f"{figures[name]['psnr_db_vs_eager']:.1f}"])
    batched = _batch_throughput(load["eager"], settings)
    worker = worker_throughput()
    for b, f in batched.items():
        rows.append([f"batch of {b} (images/s vs one by one)", f"{f['batch_s'] * 1000 / b:.0f}",
                     f"{f['speedup']:.2f}x", f"{f['min_psnr_db_vs_alone']:.1f}"])
    print(f"tiny-sdxl, {SIZE}x{SIZE}, {STEPS} steps, CPU, 1 thread, medians of {ROUNDS} "
          f"interleaved rounds; machine at start: {busy}")
    print(table(["variant", "ms/image", "ratio", "PSNR dB"], rows))
    print(f"compile-vae: compiling the tiny VAE decoder took {vae_compile_s:.1f} s")
    return {"variants": figures, "batched": batched, "worker_batched": worker,
            "vae_compile_s": vae_compile_s,
            "machine_at_start": busy, "size": SIZE, "steps": STEPS, "rounds": ROUNDS,
            "torch": torch.__version__}


def _batch_throughput(model: LoadedModel, settings: Settings) -> dict[int, dict[str, Any]]:
    """Images per second of B jobs in one call against the same jobs one by one."""
    out: dict[int, dict[str, Any]] = {}
    for b in BATCHES:
        specs = [JobSpec.from_dict({"prompt": PROMPTS[i % len(PROMPTS)], "seed": 100 + i,
                                    "steps": STEPS, "width": SIZE, "height": SIZE}, settings)
                 for i in range(b)]
        _batched(model, specs)  # first-call costs at this batch size
        one: list[float] = []
        many: list[float] = []
        alone: list[PIL.Image.Image] = []
        together: list[PIL.Image.Image] = []
        for _ in range(max(2, ROUNDS - 2)):
            t = time.perf_counter()
            alone = [pipelines.render(model, s)[0] for s in specs]
            one.append(time.perf_counter() - t)
            t = time.perf_counter()
            together = _batched(model, specs)
            many.append(time.perf_counter() - t)
        one_s, many_s = summary(one)["median"], summary(many)["median"]
        out[b] = {"one_by_one_s": one_s, "batch_s": many_s, "speedup": one_s / many_s,
                  "images_per_s_one_by_one": b / one_s, "images_per_s_batched": b / many_s,
                  "min_psnr_db_vs_alone": min(psnr(x, y) for x, y
                                              in zip(together, alone, strict=True))}
    return out


def worker_throughput(jobs: int = 16, batches: int = 3, batch_jobs: int = 4
                      ) -> dict[str, Any]:
    """Images/s of a worker process with FARM_BATCH_JOBS=1 and =`batch_jobs` on the same queued
    jobs: a warm-up batch of `batch_jobs` jobs, then `batches` measured batches of `jobs`."""
    busy = machine_busy()
    out: dict[str, Any] = {"jobs_per_batch": jobs, "batches": batches, "size": SIZE,
                           "steps": STEPS, "machine_at_start": busy}
    with LocalFarm("batching") as farm:
        for n in (1, batch_jobs):
            name = f"batch-jobs-{n}"
            measured = []
            for b in range(batches + 1):
                count = batch_jobs if b == 0 else jobs
                specs = [JobSpec.from_dict({"prompt": PROMPTS[i % len(PROMPTS)] + f" {b}",
                                            "seed": 100 * b + i, "steps": STEPS,
                                            "width": SIZE, "height": SIZE}, farm.settings)
                         for i in range(count)]
                submitted = submit(farm.settings, specs, source=f"bench-{name}")
                if b:
                    measured.append(submitted)
            # every job queued before the worker starts: what it can take together is all there
            farm.env["FARM_BATCH_JOBS"] = str(n)
            farm.start_workers([name], kind="farm")
            farm.wait_ready([name])
            farm.wait_batches([name], [m.batch for m in measured], jobs * batches,
                              timeout=1200)
            farm.stop_workers([name])
            spans = []
            for m in measured:
                times = farm.job_times(m.batch, [j.id for j in m.jobs])
                spans.append(max(t["finished_at"] for t in times)
                             - min(t["started_at"] for t in times))
            s = summary(spans)
            out[f"batch_jobs_{n}"] = {"batch_s": s, "images_per_s": jobs / s["median"]}
    one, many = out["batch_jobs_1"], out[f"batch_jobs_{batch_jobs}"]
    out["ratio"] = many["images_per_s"] / one["images_per_s"]
    print(f"worker process, tiny-sdxl {SIZE}x{SIZE}, {STEPS} steps, CPU, 1 thread, {batches} "
          f"batches of {jobs} queued jobs; machine at start: {busy}")
    print(table(["FARM_BATCH_JOBS", "s per batch (median)", "images/s"],
                [[str(n), f"{out[f'batch_jobs_{n}']['batch_s']['median']:.2f}",
                  f"{out[f'batch_jobs_{n}']['images_per_s']:.2f}"] for n in (1, batch_jobs)]))
    print(f"images/s, FARM_BATCH_JOBS={batch_jobs} / FARM_BATCH_JOBS=1: {out['ratio']:.2f}x")
    return out


if __name__ == "__main__":
    run()

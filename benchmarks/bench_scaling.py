"""Scaling on real renders: tiny-model images per second with 1 and 2 `farm worker` processes
(one torch thread each, FARM_THREADS=1) on this machine's cores.

Worker A stays up for the whole benchmark; for each 2-worker round worker B is started, waited
for until ready (its boot is never timed), and stopped afterwards. Rounds alternate which
variant goes first. A round is timed from the `submit()` call until the last job's final
record is in the store.

What the cores allow: each worker renders on one thread, so with 2 cores two workers can at
best double one worker's rate; Redis, the store writes (PNG encoding) and this process's
polling share the same two cores, so a little less is the expected ceiling.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks._farm import LocalFarm, code_version
from benchmarks._stats import machine_busy, spread, summary, table
from farm.jobs import JobSpec
from farm.scheduler.submit import submit

N_JOBS = 24          # jobs per round, one image each
ROUNDS = 3           # rounds of each variant
STEPS, SIZE = 8, 128


def one_round(farm: LocalFarm, names: list[str], specs: list[JobSpec]) -> dict[str, Any]:
    t0 = time.time()
    sub = submit(farm.settings, specs, source="bench-scaling")
    farm.wait_batches(names, [sub.batch], len(specs), interval=0.05)
    jobs = farm.job_times(sub.batch, [j.id for j in sub.jobs])
    seconds = max(t["written_at"] for t in jobs) - t0
    return {"images_per_s": len(specs) / seconds,
            "render_ms": 1000 * sum(t["render_s"] for t in jobs) / len(jobs)}


def run() -> dict[str, Any]:
    wall = time.perf_counter()
    machine = machine_busy()
    cores = os.cpu_count() or 1
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with LocalFarm("scaling") as farm:
        specs = [JobSpec.from_dict({"prompt": f"scaling probe {i}", "seed": 2000 + i,
                                    "steps": STEPS, "width": SIZE, "height": SIZE},
                                   farm.settings) for i in range(N_JOBS)]
        farm.start_workers(["scale-a"], kind="farm")
        farm.wait_ready(["scale-a"])
        one_round(farm, ["scale-a"], specs[:4])  # warm-up, not counted
        for r in range(ROUNDS):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                if workers == 1:
                    results[1].append(one_round(farm, ["scale-a"], specs))
                    continue
                farm.start_workers([f"scale-b{r}"], kind="farm")
                try:
                    farm.wait_ready([f"scale-b{r}"])
                    farm.wait_consuming(["scale-a", f"scale-b{r}"])
                    results[2].append(one_round(farm, ["scale-a", f"scale-b{r}"], specs))
                finally:
                    farm.stop_workers([f"scale-b{r}"])

    one = summary([g["images_per_s"] for g in results[1]])
    two = summary([g["images_per_s"] for g in results[2]])
    speedups = [b["images_per_s"] / a["images_per_s"]
                for a, b in zip(results[1], results[2], strict=True)]
    figures: dict[str, Any] = {
        "cores": cores, "jobs_per_round": N_JOBS, "rounds": ROUNDS, "steps": STEPS,
        "size": f"{SIZE}x{SIZE}", "threads_per_worker": 1,
        "images_per_s": {"1": one, "2": two},
        "render_ms_per_image": {str(k): summary([g["render_ms"] for g in v])
                                for k, v in results.items()},
        "speedup_2_over_1": summary(speedups),
        "ceiling": min(2, cores),
        "machine_before": machine,
        "code": code_version(),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    rows = [[k, spread(figures["images_per_s"][str(k)], 2),
             spread(figures["render_ms_per_image"][str(k)])] for k in (1, 2)]
    print(f"tiny-sdxl {SIZE}x{SIZE}, {STEPS} steps, {N_JOBS} jobs per round, {ROUNDS} rounds "
          f"each, 1 torch thread per worker, {cores} cores; median (min-max)")
    print(table(["workers", "images/s", "render ms/image"], rows))
    print(f"speedup 2 workers / 1: {spread(figures['speedup_2_over_1'], 2)} "
          f"(the cores allow at most {figures['ceiling']}x: one thread per worker, with Redis "
          f"and the store writes on the same cores); took {figures['wall_s']} s")
    print(f"machine before start: {machine['busy_pct']}% of {machine['cores']} cores busy, "
          f"load average {machine['loadavg_1m']}")
    return figures

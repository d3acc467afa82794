"""Farm overhead: a batch of tiny-model jobs through the farm vs the same renders in-process.

Farm: the embedded broker (Valkey on a unix socket), a file store, and one warm `farm worker
--device cpu` process (FARM_THREADS=1), started and reported ready before anything is timed.
The clock runs from the `submit()` call to the moment the last job's final record reaches the
store. Direct: worker.pipelines.render on the same specs, in this process, one torch thread.
The two alternate (farm first on even rounds, direct first on odd ones) after one warm-up
round of each.

Where the extra time goes, per job, from the job records (started_at, finished_at,
timings{render_s, write_s, total_s}) and the records' modification times:
  submit         the submit() call: manifest write + one message per job
  queue          previous job's final record written -> this job's started_at: the Celery ack,
                 heartbeat, BRPOP, message decode, minus `checks`
  checks         the duplicate check and manifest read every job starts with (read_record +
                 read_manifest, timed in this process on the same batch: an estimate)
  images         PNG encoding and the create-once image + sidecar writes (write_s)
  status         the "running" and "succeeded" job-record writes
  steps          the Redis calls the step callback makes inside render() (cancel checks,
                 counted with INFO commandstats, priced at one round trip each: an estimate)
  render diff    the worker's render_s, less `steps`, minus the same renders in this process
                 (noise and contention, not farm work)
The headline is the end-to-end ratio, farm / in-process: what a user waits for. Beside it,
"farm-added time", the sum of all parts but render diff (what the farm itself spends per job),
and render diff, how much slower (or faster) the worker process renders the same jobs. The worker
keeps freed memory for the next render (worker/allocator.py); this process renders with
glibc's defaults, as a user's script would.

This process waits for a batch by reading its tally every POLL_S seconds: rarely, so that its
own wake-ups take little from the worker's core. No figure depends on when it notices: every
time comes from the records and their modification times.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks._farm import LocalFarm, code_version
from benchmarks._stats import machine_busy, spread, summary, table
from farm.jobs import JobSpec
from farm.lifecycle import read_record
from farm.records import read_manifest
from farm.scheduler.submit import submit
from farm.settings import Settings

N_JOBS = 10          # jobs per batch
ROUNDS = 8           # measured rounds of each variant, after one warm-up round
STEPS, SIZE = 8, 128  # a tiny job: about 0.2 s on one core
WORKER = "overhead-1"
POLL_S = 0.25
TARGET_RATIO = 1.03   # end to end, farm / in-process (issue #16)

PARTS = ("submit", "queue", "checks", "images", "status", "steps", "render_diff")


def job_specs(settings: Settings) -> list[JobSpec]:
    return [JobSpec.from_dict({"prompt": f"overhead probe {i}", "seed": 1000 + i,
                               "steps": STEPS, "width": SIZE, "height": SIZE}, settings)
            for i in range(N_JOBS)]


def direct_round(model: Any, specs: list[JobSpec]) -> dict[str, Any]:
    from farm.worker import pipelines

    start = time.perf_counter()
    for spec in specs:
        pipelines.render(model, spec)
    return {"seconds": time.perf_counter() - start}


def check_cost(farm: LocalFarm, batch: str, repeat: int = 5) -> float:
    """Seconds a worker spends reading before each job: its record (absent on a first
    delivery) and the batch manifest (decoded whole)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        read_record(farm.store, batch, "no-such-job")
        read_manifest(farm.store, batch, farm.settings)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def redis_call_s(farm: LocalFarm, repeat: int = 200) -> float:
    """Seconds for one small Redis round trip (EXISTS of a missing key) from this process."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        farm.redis.exists("farm:bench:none")
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def farm_round(farm: LocalFarm, specs: list[JobSpec]) -> dict[str, Any]:
    before = farm.command_calls()
    polls = farm.own_commands["hmget"]
    t0 = time.time()
    sub = submit(farm.settings, specs, source="bench-overhead")
    t1 = time.time()
    farm.wait_batches([WORKER], [sub.batch], len(specs), interval=POLL_S)
    calls = farm.command_calls() - before
    calls.pop("info", None)
    calls["hmget"] -= farm.own_commands["hmget"] - polls
    jobs = sorted(farm.job_times(sub.batch, [j.id for j in sub.jobs]),
                  key=lambda t: t["started_at"])
    gaps, prev = [], t1
    for t in jobs:
        gaps.append(t["started_at"] - prev)
        prev = t["written_at"]
    checks = check_cost(farm, sub.batch)
    n = len(jobs)
    # Redis calls the step callback makes inside render() (cancel checks: EXISTS), at most
    # one per step, priced at one round trip each
    in_render = min(calls["exists"] / n, STEPS) * redis_call_s(farm)
    return {
        "redis_commands_per_job": {k: v / n for k, v in (+calls).most_common()},
        "seconds": max(t["written_at"] for t in jobs) - t0,
        "render_s": sum(t["render_s"] for t in jobs),
        "per_job_s": {
            "submit": (t1 - t0) / n,
            "queue": sum(gaps) / n - checks,
            "checks": checks,
            "images": sum(t["write_s"] for t in jobs) / n,
            "status": sum((t["total_s"] - t["render_s"] - t["write_s"])
                          + (t["written_at"] - t["finished_at"]) for t in jobs) / n,
            "steps": in_render,
        },
    }


def png_cost(repeat: int = 3) -> dict[str, dict[str, float]]:
    """Milliseconds to encode one 1024x1024 PNG as the worker does (farm.images), for
    incompressible noise (the worst case) and a smooth gradient: SDXL's size, on this CPU."""
    import os

    import PIL.Image

    from farm.images import encode_png

    noise = PIL.Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3))
    smooth = PIL.Image.linear_gradient("L").resize((1024, 1024)).convert("RGB")
    out = {}
    for name, image in (("noise", noise), ("smooth", smooth)):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            encode_png(image, "parameters")
            times.append((time.perf_counter() - start) * 1000)
        out[name] = summary(times)
    return out


def run() -> dict[str, Any]:
    import torch

    from farm import models
    from farm.worker import pipelines

    wall = time.perf_counter()
    machine = machine_busy()
    with LocalFarm("overhead") as farm:
        # 1. one warm worker: loaded and warmed before the clock ever starts
        # (no --max-jobs: a worker that exits drops its heartbeat, which counts the jobs)
        farm.start_workers([WORKER], kind="farm")
        boot_s = farm.wait_ready([WORKER])
        # 2. the same model in this process, one thread like the worker
        torch.set_num_threads(1)
        settings = farm.settings.replace(threads=1)
        model = pipelines.load_model(models.resolve("tiny-sdxl"), settings, "cpu")
        pipelines.warm(model)
        specs = job_specs(settings)

        # 3. one warm-up round of each, then interleaved measured rounds
        farm_round(farm, specs)
        direct_round(model, specs)
        rounds = []
        for r in range(ROUNDS):
            order = ("farm", "direct") if r % 2 == 0 else ("direct", "farm")
            got: dict[str, dict[str, Any]] = {}
            for variant in order:
                if variant == "farm":
                    got["farm"] = farm_round(farm, specs)
                else:
                    got["direct"] = direct_round(model, specs)
            rounds.append(got)

    # 4. per round: ratio, overhead per job, and where it went
    ratio, e2e_ms, e2e_pct, added_ms, added_pct, direct_ms = [], [], [], [], [], []
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    residual = []
    for got in rounds:
        f, d = got["farm"], got["direct"]
        per_job = (f["seconds"] - d["seconds"]) / N_JOBS
        direct = d["seconds"] / N_JOBS
        split = dict(f["per_job_s"])
        split["render_diff"] = (f["render_s"] - d["seconds"]) / N_JOBS - split["steps"]
        # the farm's time outside render(), and its Redis calls from the step callback
        added = (f["seconds"] - f["render_s"]) / N_JOBS + split["steps"]
        ratio.append(f["seconds"] / d["seconds"])
        e2e_ms.append(per_job * 1000)
        e2e_pct.append(100 * per_job / direct)
        added_ms.append(added * 1000)
        added_pct.append(100 * added / direct)
        direct_ms.append(direct * 1000)
        for p in PARTS:
            parts[p].append(split[p] * 1000)
        residual.append((per_job - sum(split.values())) * 1000)

    png = png_cost()
    figures: dict[str, Any] = {
        "jobs_per_batch": N_JOBS, "rounds": ROUNDS, "steps": STEPS, "size": f"{SIZE}x{SIZE}",
        "worker_boot_s": round(boot_s, 2),
        "direct_ms_per_job": summary(direct_ms),
        "ratio_farm_over_direct": summary(ratio),
        "end_to_end_overhead_ms_per_job": summary(e2e_ms),
        "end_to_end_overhead_pct": summary(e2e_pct),
        "farm_added_ms_per_job": summary(added_ms),
        "farm_added_pct": summary(added_pct),
        "overhead_parts_ms_per_job": {p: summary(v) for p, v in parts.items()},
        "unattributed_ms_per_job": summary(residual),
        "png_encode_1024_ms": png,
        "redis_commands_per_job": rounds[-1]["farm"]["redis_commands_per_job"],
        "machine_before": machine,
        "code": code_version(),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    figures["targets"] = {
        f"end to end, farm / in-process <= {TARGET_RATIO}":
            figures["ratio_farm_over_direct"]["median"] <= TARGET_RATIO,
        "farm-added time <= 5% of a job": figures["farm_added_pct"]["median"] <= 5.0,
    }

    rows: list[list[object]] = [
        ["END TO END, farm / in-process (ratio)", spread(figures["ratio_farm_over_direct"], 3)],
        ["direct render, ms/job", spread(figures["direct_ms_per_job"])],
        ["end-to-end difference, ms/job", spread(figures["end_to_end_overhead_ms_per_job"])],
        ["end-to-end difference, % of a job", spread(figures["end_to_end_overhead_pct"])],
        ["farm-added time, ms/job", spread(figures["farm_added_ms_per_job"], 2)],
        ["farm-added time, % of a job", spread(figures["farm_added_pct"], 2)],
    ]
    labels = {"submit": "submit (manifest + enqueue)", "queue": "queue (ack, BRPOP, decode)",
              "checks": "checks (record + manifest reads)", "images": "images (PNG + 2 writes)",
              "status": "status (2 record writes)",
              "steps": "step callbacks (Redis calls in them)",
              "render_diff": "render diff (worker process vs this one)"}
    rows += [[f"  {labels[p]}, ms/job", spread(figures["overhead_parts_ms_per_job"][p], 2)]
             for p in PARTS]
    rows.append(["  unattributed, ms/job", spread(figures["unattributed_ms_per_job"], 2)])
    rows.append(["PNG encode 1024x1024, noise / smooth, ms",
                 f"{png['noise']['median']:.0f} / {png['smooth']['median']:.0f}"])
    print(f"{N_JOBS} jobs of tiny-sdxl {SIZE}x{SIZE}, {STEPS} steps, one warm CPU worker "
          f"(1 thread) vs in-process; {ROUNDS} interleaved rounds, median (min-max)")
    print(table(["figure", "value"], rows))
    print("farm-added time = the parts above but render diff: end to end minus the worker's "
          "render time, plus the step callbacks' Redis calls inside it")
    print("Redis commands per job: " + ", ".join(
        f"{k} {v:g}" for k, v in rounds[-1]["farm"]["redis_commands_per_job"].items()))
    print(f"machine before start: {machine['busy_pct']}% of {machine['cores']} cores busy, "
          f"load average {machine['loadavg_1m']}")
    for target, met in figures["targets"].items():
        print(f"target: {target} -> {'met' if met else 'MISSED'}")
    print(f"took {figures['wall_s']} s")
    return figures

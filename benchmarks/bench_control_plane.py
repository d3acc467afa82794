"""Control-plane throughput: jobs per second through the real queue and store, with the
stand-in stage (worker/standin.py: no diffusion), for 1, 2 and 4 worker processes.

Each run submits N_JOBS jobs to workers that are up and consuming (separate processes: the real
`Worker` with backend=StandIn) and is timed from the `submit()` call until the last job's final
record is in the store. Within a round the workers are added 1 -> 2 -> 4 or taken away
4 -> 2 -> 1, alternating by round, so no variant always runs first or last; every round starts
fresh workers. With 4 workers a second run sends the same jobs as batches of SMALL_BATCH
jobs: every job reads its batch manifest whole, so this shows what the batch size costs.

The peer: plain Celery (benchmarks/_plain_celery.py: Celery's defaults, a task that writes the
same PNG and JSON sidecar into the same store, nothing else) on the same broker, with 1, 2 and 4
worker processes, in the same rounds: each round runs the farm and the peer one after the
other, the farm first on even rounds. A peer run is timed from the first `send_task` until the
last sidecar is in the store. farm / plain is the ratio of their jobs/s.

Counted per job:
  Redis commands   INFO commandstats before the submit and after the last job, less this
                   process's own polling (HMGET of the batches' tallies) and INFO calls: every
                   command the server ran, the ones inside Lua scripts included
  sent commands    the same less the commands the tally's Lua scripts ran inside the server
                   (measured per note and per batch on a scratch batch: `script_commands`):
                   the requests the workers and the submitter send
  store calls      every put/get the workers make, counted by the launcher's CountingStore
                   (over all runs together: the count per job does not depend on the workers)
  CPU              user + system seconds of the worker processes (/proc) and of Redis (INFO
                   cpu), and of this process during submit(); apart, the workers' system
                   seconds (the kernel's work for them: new files, sockets, scheduling)
Also: Redis commands per idle worker per second (heartbeats, BRPOP timeouts), how long one
manifest read takes for this batch and for a 10,000-job batch, and what one status read
(`farm status`, each refresh of --watch) costs the store. Before each system's turn in each
round, and once after the last, the CPU cost of a new file in the store's folder
(_stats.file_create_us): every job writes new files (the farm four, plain Celery two), and on
this project's shared machine that cost swings from about 20 to 700 us within minutes (ext4
without a journal), which moves both systems' rates and their ratio. The farm lives in a
temporary folder: `TMPDIR=/dev/shm python -m benchmarks control_plane` runs it on tmpfs.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import _plain_celery
from benchmarks._farm import BenchError, LocalFarm, code_version
from benchmarks._standin_worker import CountingStore
from benchmarks._stats import file_create_us, file_system, machine_busy, spread, summary, table
from farm import tally
from farm.jobs import JobSpec, job_id
from farm.keys import manifest_key
from farm.records import read_manifest
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.store import get_json, put_json

N_JOBS = 400
STEPS = 8            # denoising steps per job: the stand-in calls the step callback as often
# Redis commands per job are also counted at these step counts (the step callback may talk to
# Redis), with PER_STEP_JOBS jobs each: 30 is what an SDXL job runs
STEP_COUNTS = (8, 30)
PER_STEP_JOBS = 50
WORKER_COUNTS = (1, 2, 4)
SMALL_BATCH = 10
ROUNDS = 3
IDLE_WINDOW_S = 5.0   # seconds of an idle fleet to count commands over
# the largest batch a user may submit (FARM_MAX_JOBS_PER_BATCH's default)
BIG_BATCH = 10_000
CPU_PARTS = ("workers", "broker", "submit")


def job_specs(farm: LocalFarm, n: int = N_JOBS, steps: int = STEPS) -> list[JobSpec]:
    return [JobSpec.from_dict({"prompt": f"load test {i}", "seed": i, "steps": steps,
                               "width": 64, "height": 64}, farm.settings)
            for i in range(n)]


def idle_rate(farm: LocalFarm, names: list[str]) -> dict[str, float]:
    """Redis commands per second per idle worker, by command."""
    before = farm.command_calls()
    time.sleep(IDLE_WINDOW_S)
    calls = farm.command_calls() - before
    calls.pop("info", None)
    return {k: v / len(names) / IDLE_WINDOW_S for k, v in calls.most_common()}


def cpu_since(farm: LocalFarm, names: list[str], user: float, kernel: float
              ) -> tuple[float, float]:
    """The named workers' CPU seconds since `farm.cpu_split` said (user, kernel): (all, of
    them the kernel's)."""
    user_now, kernel_now = farm.cpu_split(names)
    return user_now + kernel_now - user - kernel, kernel_now - kernel


def one_run(farm: LocalFarm, names: list[str], batch_size: int, n_jobs: int = N_JOBS,
            steps: int = STEPS) -> dict[str, Any]:
    """n_jobs jobs, in batches of `batch_size`, through the named workers (up, consuming)."""
    specs = job_specs(farm, n_jobs, steps)
    before = farm.command_calls()
    polls_before = farm.own_commands["hmget"]
    (user, kernel), cpu_broker = farm.cpu_split(names), farm.broker_cpu_seconds()
    t0, cpu_submit = time.time(), time.process_time()
    batches = [submit(farm.settings, specs[i:i + batch_size], source="bench-control-plane")
               for i in range(0, len(specs), batch_size)]
    t1, cpu_submit = time.time(), time.process_time() - cpu_submit
    farm.wait_batches(names, [b.batch for b in batches], n_jobs, interval=0.02)
    cpu_workers, kernel = cpu_since(farm, names, user, kernel)
    cpu_broker = farm.broker_cpu_seconds() - cpu_broker
    calls = farm.command_calls() - before
    calls.pop("info", None)
    calls["hmget"] -= farm.own_commands["hmget"] - polls_before
    calls = +calls  # drop zero counts

    jobs = [t for b in batches for t in farm.job_times(b.batch, [j.id for j in b.jobs])]
    end = max(t["written_at"] for t in jobs)
    return {
        "batch": batches[-1].batch,
        "jobs_per_s": n_jobs / (end - t0),
        "drain_jobs_per_s": n_jobs / (end - min(t["started_at"] for t in jobs)),
        "submit_jobs_per_s": n_jobs / (t1 - t0),
        "redis_commands_per_job": sum(calls.values()) / n_jobs,
        "redis_commands_by_name_per_job": {k: v / n_jobs for k, v in calls.most_common()},
        "cpu_ms_per_job": {"workers": cpu_workers / n_jobs * 1000,
                           "broker": cpu_broker / n_jobs * 1000,
                           "submit": cpu_submit / n_jobs * 1000},
        "workers_kernel_ms_per_job": kernel / n_jobs * 1000,
    }


def plain_run(farm: LocalFarm, app: Any, names: list[str], n_jobs: int = N_JOBS,
               steps: int = STEPS) -> dict[str, Any]:
    """n_jobs jobs through plain Celery workers (up, consuming): the same images, no farm."""
    batch = f"plain-{uuid.uuid4().hex[:10]}"
    images = farm.store_root() / "plain" / batch / "images"
    jobs = [{"batch": batch, "index": i, "prompt": f"load test {i}", "seed": i, "steps": steps,
             "width": 64, "height": 64} for i in range(n_jobs)]
    before = farm.command_calls()
    (user, kernel), cpu_broker = farm.cpu_split(names), farm.broker_cpu_seconds()
    t0, cpu_submit = time.time(), time.process_time()
    with app.producer_or_acquire() as producer:
        for job in jobs:
            app.send_task(_plain_celery.TASK, args=[job], queue=_plain_celery.QUEUE,
                          producer=producer)
    cpu_submit = time.process_time() - cpu_submit
    deadline = time.monotonic() + 300
    while True:
        done = [e for e in os.scandir(images) if e.name.endswith(".json")] \
            if images.is_dir() else []
        if len(done) >= n_jobs:
            break
        farm._check_alive(names)
        if time.monotonic() > deadline:
            raise BenchError(f"plain Celery wrote {len(done)} of {n_jobs} sidecars in 300 s")
        time.sleep(0.02)
    cpu_workers, kernel = cpu_since(farm, names, user, kernel)
    cpu_broker = farm.broker_cpu_seconds() - cpu_broker
    calls = farm.command_calls() - before
    calls.pop("info", None)
    end = max(e.stat().st_mtime for e in done)
    return {"jobs_per_s": n_jobs / (end - t0),
            "redis_commands_per_job": sum(calls.values()) / n_jobs,
            "redis_commands_by_name_per_job": {k: v / n_jobs for k, v in (+calls).most_common()},
            "cpu_ms_per_job": {"workers": cpu_workers / n_jobs * 1000,
                               "broker": cpu_broker / n_jobs * 1000,
                               "submit": cpu_submit / n_jobs * 1000},
            "workers_kernel_ms_per_job": kernel / n_jobs * 1000}


def script_commands(farm: LocalFarm) -> dict[str, float]:
    """Commands the tally's Lua scripts run inside the server (INFO commandstats counts them,
    though no client sends them), measured on a scratch batch of this broker: per batch
    (`tally.start`, at submit) and per job (its "running" note and its final one, which
    deletes the worker's in-flight record: the message's ack, worker/finisher.py)."""
    from farm.lifecycle import JobRecord, JobState
    from farm.recovery import INFLIGHT

    batch = f"probe-{uuid.uuid4().hex[:8]}"
    record = INFLIGHT + batch
    farm.redis.set(record, "{}")
    before = farm.command_calls()
    tally.start(farm.redis, batch, 1)
    started = farm.command_calls()
    counter = tally.Tally(farm.redis)
    counter.note(JobRecord(job=f"{batch}-0000", batch=batch, state=JobState.RUNNING, seq=1))
    counter.note(JobRecord(job=f"{batch}-0000", batch=batch, state=JobState.SUCCEEDED, seq=2),
                 ack=record)
    noted = farm.command_calls()
    farm.redis.delete(tally.tally_key(batch))
    per_batch, per_job = started - before, noted - started
    for calls in (per_batch, per_job):
        for sent in ("info", "eval", "evalsha", "script|load"):
            calls.pop(sent, None)
    return {"per_batch": sum(per_batch.values()), "per_job": sum(per_job.values())}


def set_workers(farm: LocalFarm, up: list[str], count: int, label: str, stats_dir: Path,
                kind: str = "standin") -> None:
    """Grow or shrink the running workers `up` of `kind` (in place) to `count`."""
    if count > len(up):
        new = [f"{label}-{i}" for i in range(len(up), count)]
        if kind == "plain":
            farm.start_workers(new, kind="plain")
        else:
            farm.start_workers(new, kind="standin", stats_dir=stats_dir)
            farm.wait_ready(new)
        up.extend(new)
        farm.wait_consuming(up)
    elif count < len(up):
        farm.stop_workers(up[count:])
        del up[count:]


def manifest_read(farm: LocalFarm, batch: str, jobs: int, repeat: int = 3) -> dict[str, float]:
    """Milliseconds for one read_manifest of a batch of `jobs` jobs (a copy of `batch`'s
    manifest with its job list repeated), what every job of such a batch pays first, and the
    manifest's size in bytes."""
    data = get_json(farm.store, manifest_key(batch))
    if jobs != len(data["jobs"]):
        copy = f"{batch}-x{jobs}"
        template = data["jobs"]
        data = {**data, "batch": copy, "jobs": [
            {**template[i % len(template)], "id": job_id(copy, i), "index": i}
            for i in range(jobs)]}
        put_json(farm.store, manifest_key(copy), data)
        batch = copy
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        read_manifest(farm.store, batch, farm.settings)
        times.append((time.perf_counter() - start) * 1000)
    return {"ms": sorted(times)[len(times) // 2],
            "bytes": len(farm.store.get(manifest_key(batch)))}


def status_read(farm: LocalFarm, batch: str) -> dict[str, Any]:
    """What one `farm status BATCH` (and each 0.5 s refresh of --watch) costs the store."""
    store = CountingStore(farm.store)
    start = time.perf_counter()
    batch_status(store, batch, farm.settings)
    return {"ms": (time.perf_counter() - start) * 1000, "store_calls": dict(store.counts)}


def variant_figures(got: list[dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {key: summary([g[key] for g in got]) for key in (
        "jobs_per_s", "drain_jobs_per_s", "submit_jobs_per_s", "redis_commands_per_job")}
    names = sorted({n for g in got for n in g["redis_commands_by_name_per_job"]})
    entry["redis_commands_by_name_per_job"] = {
        n: round(summary([g["redis_commands_by_name_per_job"].get(n, 0.0)
                          for g in got])["median"], 3) for n in names}
    entry["cpu_ms_per_job"] = {p: summary([g["cpu_ms_per_job"][p] for g in got])
                               for p in CPU_PARTS}
    entry["workers_kernel_ms_per_job"] = summary([g["workers_kernel_ms_per_job"] for g in got])
    return entry


def run() -> dict[str, Any]:
    wall = time.perf_counter()
    machine = machine_busy()
    top = max(WORKER_COUNTS)
    small = f"{top}, batches of {SMALL_BATCH}"
    runs: dict[str, list[dict[str, Any]]] = {str(k): [] for k in WORKER_COUNTS}
    runs[small] = []
    plain: dict[str, list[dict[str, Any]]] = {str(k): [] for k in WORKER_COUNTS}
    idle: list[dict[str, float]] = []
    creates: list[float] = []  # the store's cost of a new file, before each system's turn
    with LocalFarm("control-plane") as farm:
        store_fs = file_system(farm.store_root())
        stats_dir = farm.tmp / "stats"
        stats_dir.mkdir()
        scripts = script_commands(farm)
        app = _plain_celery.app_for(farm.settings)
        for r in range(ROUNDS):
            order = WORKER_COUNTS if r % 2 == 0 else tuple(reversed(WORKER_COUNTS))
            for system in (("farm", "plain") if r % 2 == 0 else ("plain", "farm")):
                up: list[str] = []
                creates.append(file_create_us(farm.store_root()))
                for k in order:
                    if system == "plain":
                        set_workers(farm, up, k, f"pl{r}", stats_dir, kind="plain")
                        plain[str(k)].append(plain_run(farm, app, list(up)))
                        continue
                    set_workers(farm, up, k, f"cp{r}", stats_dir)
                    if k == top:
                        idle.append(idle_rate(farm, up))
                        runs[small].append(one_run(farm, list(up), SMALL_BATCH))
                    runs[str(k)].append(one_run(farm, list(up), N_JOBS))
                farm.stop_workers(up)
        app.close()
        creates.append(file_create_us(farm.store_root()))
        # Redis commands per job against denoising steps, on one worker
        by_steps: dict[str, float] = {}
        up = []
        set_workers(farm, up, 1, "steps", stats_dir)
        for steps in STEP_COUNTS:
            counted = one_run(farm, up, PER_STEP_JOBS, PER_STEP_JOBS, steps)
            by_steps[str(steps)] = counted["redis_commands_per_job"]
        farm.stop_workers(up)
        last = runs[str(top)][-1]["batch"]
        manifest = {str(N_JOBS): manifest_read(farm, last, N_JOBS),
                    str(BIG_BATCH): manifest_read(farm, last, BIG_BATCH)}
        status = status_read(farm, last)
        # every worker counted its store calls and wrote them down when it stopped
        store_calls: Counter[str] = Counter()
        stats_jobs = 0
        for path in stats_dir.glob("*.json"):
            stats = json.loads(path.read_text())
            store_calls.update(stats["store_calls"])
            stats_jobs += stats["jobs"]
        stats_jobs = max(1, stats_jobs)

    figures: dict[str, Any] = {"jobs_per_run": N_JOBS, "rounds": ROUNDS, "workers": {},
                               "plain_celery": {}}
    rows = []
    for name, got in runs.items():
        entry = figures["workers"][name] = variant_figures(got)
        batches = N_JOBS // (SMALL_BATCH if name == small else N_JOBS)
        scripted = scripts["per_job"] + scripts["per_batch"] * batches / N_JOBS
        entry["scripted_commands_per_job"] = scripted
        entry["sent_commands_per_job"] = entry["redis_commands_per_job"]["median"] - scripted
        rows.append([f"farm {name}", spread(entry["jobs_per_s"]),
                     spread(entry["drain_jobs_per_s"]),
                     spread(entry["redis_commands_per_job"], 2),
                     f"{entry['sent_commands_per_job']:.2f}",
                     " / ".join(f"{entry['cpu_ms_per_job'][p]['median']:.1f}"
                                for p in CPU_PARTS),
                     spread(entry["workers_kernel_ms_per_job"], 2)])
    for name, got in plain.items():
        entry = figures["plain_celery"][name] = {
            "jobs_per_s": summary([g["jobs_per_s"] for g in got]),
            "redis_commands_per_job": summary([g["redis_commands_per_job"] for g in got]),
            "redis_commands_by_name_per_job": got[-1]["redis_commands_by_name_per_job"],
            "cpu_ms_per_job": {p: summary([g["cpu_ms_per_job"][p] for g in got])
                               for p in CPU_PARTS},
            "workers_kernel_ms_per_job": summary([g["workers_kernel_ms_per_job"]
                                                  for g in got])}
        rows.append([f"plain Celery {name}", spread(entry["jobs_per_s"]), "",
                     spread(entry["redis_commands_per_job"], 2),
                     f"{entry['redis_commands_per_job']['median']:.2f}",
                     " / ".join(f"{entry['cpu_ms_per_job'][p]['median']:.1f}"
                                for p in CPU_PARTS),
                     spread(entry["workers_kernel_ms_per_job"], 2)])
    # farm / plain per round (the two ran back to back in each), then its median
    figures["farm_over_plain"] = {
        str(k): summary([f["jobs_per_s"] / p["jobs_per_s"]
                         for f, p in zip(runs[str(k)], plain[str(k)], strict=True)])
        for k in WORKER_COUNTS}
    main = figures["workers"][str(top)]
    idle_total = summary([sum(i.values()) for i in idle])
    figures["redis_commands_per_job"] = main["redis_commands_per_job"]["median"]
    figures["sent_commands_per_job"] = main["sent_commands_per_job"]
    figures["script_commands"] = scripts
    figures["idle_commands_per_worker_s"] = idle_total
    figures["idle_commands_by_name_per_worker_s"] = idle[-1]
    low, high = STEP_COUNTS[0], STEP_COUNTS[-1]
    per_step = (by_steps[str(high)] - by_steps[str(low)]) / (high - low)
    figures["redis_commands_per_job_by_steps"] = by_steps
    figures["redis_commands_per_step"] = per_step
    figures["redis_commands_per_job_at_0_steps"] = by_steps[str(low)] - per_step * low
    figures["manifest_read"] = manifest
    figures["status_read"] = status
    figures["store_calls_per_job"] = {k: v / stats_jobs for k, v in sorted(store_calls.items())}
    figures["store_writes_per_job"] = sum(v for k, v in store_calls.items()
                                          if k.startswith("put")) / stats_jobs
    figures["store_reads_per_job"] = sum(v for k, v in store_calls.items()
                                         if not k.startswith("put")) / stats_jobs
    cpu_ms = sum(main["cpu_ms_per_job"][p]["median"] for p in CPU_PARTS)
    figures["cpu_bound_jobs_per_s"] = 1000 * machine["cores"] / cpu_ms
    figures["machine_before"] = machine
    figures["store_file_system"] = store_fs
    figures["file_create_us"] = {"summary": summary(creates), "in_order": creates}
    figures["code"] = code_version()
    ratio = figures["farm_over_plain"][str(top)]["median"]
    figures["targets"] = {
        f">= 600 jobs/s with {top} workers": main["jobs_per_s"]["median"] >= 600,
        "<= 10 Redis commands per job (all the server ran)": figures["redis_commands_per_job"]
        <= 10,
        "<= 10 Redis commands per job (sent)": figures["sent_commands_per_job"] <= 10,
        f"farm / plain Celery >= 0.7 with {top} workers": ratio >= 0.7,
    }
    figures["wall_s"] = round(time.perf_counter() - wall, 1)

    print(f"{N_JOBS} stand-in jobs of {STEPS} steps per run (no diffusion; 64x64 flat PNG + "
          f"sidecar), one batch unless said, {ROUNDS} rounds, median (min-max); "
          f"{machine['cores']} cores shared by Redis, workers and submitter")
    print(table(["workers", "jobs/s", "drain jobs/s", "Redis cmds/job", "sent cmds/job",
                 "CPU ms/job workers/Redis/submit", "of it workers' kernel"], rows))
    print("farm / plain Celery, jobs/s: " + ", ".join(
        f"{k} workers {spread(v, 2)}" for k, v in figures["farm_over_plain"].items()))
    by_name = ", ".join(f"{n} {v:g}" for n, v in sorted(
        main["redis_commands_by_name_per_job"].items(), key=lambda kv: -kv[1]) if v >= 0.01)
    print(f"Redis commands per job ({top} workers): {by_name}; of them inside the tally's "
          f"scripts: {scripts['per_job']:g} per job + {scripts['per_batch']:g} per batch")
    print("Redis commands per job by denoising steps (1 worker): " + ", ".join(
        f"{k} steps {v:.2f}" for k, v in by_steps.items())
        + f" -> {per_step:.2f} per step + {figures['redis_commands_per_job_at_0_steps']:.2f}")
    print(f"idle worker: {spread(idle_total, 2)} Redis commands/s each ("
          + ", ".join(f"{k} {v:.2f}" for k, v in idle[-1].items()) + ")")
    print("store calls per job (all runs): " + ", ".join(
        f"{k} {v:g}" for k, v in figures["store_calls_per_job"].items()))
    print(f"CPU: {cpu_ms:.1f} CPU-ms per job with {top} workers caps {machine['cores']} cores "
          f"at about {figures['cpu_bound_jobs_per_s']:.0f} jobs/s")
    small_m, big_m = manifest[str(N_JOBS)], manifest[str(BIG_BATCH)]
    print(f"one manifest read (once per batch and worker): {small_m['ms']:.1f} ms / "
          f"{small_m['bytes'] / 1e3:.0f} kB at {N_JOBS} jobs, {big_m['ms']:.1f} ms / "
          f"{big_m['bytes'] / 1e6:.1f} MB at {BIG_BATCH} jobs")
    print(f"one status read of a {N_JOBS}-job batch: {status['ms']:.0f} ms, store calls "
          + ", ".join(f"{k} {v}" for k, v in sorted(status["store_calls"].items())))
    print(f"machine before start: {machine['busy_pct']}% of {machine['cores']} cores busy, "
          f"load average {machine['loadavg_1m']}")
    print(f"store on {store_fs}: a new file cost {spread(summary(creates))} us of CPU before "
          f"each system's turn (in order: {', '.join(f'{c:.0f}' for c in creates)})")
    for target, met in figures["targets"].items():
        print(f"target: {target} -> {'met' if met else 'MISSED'}")
    print(f"took {figures['wall_s']} s")
    return figures

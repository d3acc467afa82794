"""A worker's own CPU time per job, and the file store's cost per write.

Worker CPU: one stand-in worker process (worker/standin.py: no diffusion; a 64x64 flat PNG and
its sidecar) drains jobs already queued, once SHORT jobs and once LONG; the user + system
seconds of the two processes, differenced, over LONG - SHORT jobs is the CPU one more job costs
(the process's start, imports and shutdown cancel out), and apart the system seconds (the
kernel's work: new files, sockets). ROUNDS rounds, median (min-max). The
control-plane benchmark measures the same workers under load, several at once; this one is the
quiet, single-process figure a change to the per-job path is judged by.

File store writes (farm/store.py FileStore.put) into a fresh folder beside the farm's, WRITES
each, ROUNDS rounds: a plain write (replace), a create-once write (an image, a sidecar) and a
job record's compare-and-set (create once, then write again if it is still the version read).
Before each round, the CPU cost of one new file in the farm's folder (_stats.file_create_us):
it swings twentyfold within minutes on this project's shared machine and moves both figures.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._farm import ROOT, LocalFarm
from benchmarks._stats import file_create_us, file_system, machine_busy, spread, summary, table
from benchmarks.bench_control_plane import job_specs
from farm.scheduler.submit import submit
from farm.store import FileStore

SHORT, LONG = 100, 1100
ROUNDS = 3
WRITES = 2000
RECORD = json.dumps({"job": "20261204-000000-abcdef-0001", "state": "running", "attempts": 1,
                     "worker": "w-1", "stages": {"full": {"worker": "w-1"}}}).encode()


def _children_cpu() -> tuple[float, float]:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime, used.ru_stime


def _drain(farm: LocalFarm, n: int, name: str) -> tuple[float, float]:
    """CPU seconds of one stand-in worker that takes n queued jobs and stops: (all, of them the
    kernel's)."""
    submit(farm.settings, job_specs(farm, n, 8), source="bench-worker-cpu")
    before = _children_cpu()
    done = subprocess.run([sys.executable, "-m", "benchmarks._standin_worker", "--name", name,
                           "--max-jobs", str(n)], cwd=ROOT, env=farm.env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} exited {done.returncode}: {done.stderr[-2000:]}")
    after = _children_cpu()
    return after[0] - before[0], after[1] - before[1]


def _writes(folder: Path) -> dict[str, float]:
    """Milliseconds per write of each kind."""
    store = FileStore(folder / f"store-{time.monotonic_ns()}")
    out = {}
    for n, kind in enumerate(("replace", "create once", "record compare-and-set")):
        t0 = time.perf_counter()
        for i in range(WRITES):
            key = f"batches/b{n}/jobs/{i}.json"
            if kind == "replace":
                store.put(key, RECORD)
            elif kind == "create once":
                store.put(key, RECORD, create_once=True)
            else:
                version = store.put(key, RECORD, create_once=True)
                store.put(key, RECORD + b" ", if_match=version)
        out[kind] = (time.perf_counter() - t0) / WRITES * 1000
    return out


def run() -> dict[str, Any]:
    busy = machine_busy()
    print(f"machine before: {busy}")
    per_job: list[float] = []
    kernel: list[float] = []
    writes: list[dict[str, float]] = []
    creates: list[float] = []
    with LocalFarm("worker-cpu") as farm:
        store_fs = file_system(farm.tmp)
        for r in range(ROUNDS):
            creates.append(file_create_us(farm.tmp))
            short = _drain(farm, SHORT, f"cpu-{r}-s")
            long = _drain(farm, LONG, f"cpu-{r}-l")
            per_job.append((long[0] - short[0]) / (LONG - SHORT) * 1000)
            kernel.append((long[1] - short[1]) / (LONG - SHORT) * 1000)
            with tempfile.TemporaryDirectory(dir=farm.tmp) as folder:
                writes.append(_writes(Path(folder)))
    figures: dict[str, Any] = {
        "machine_before": busy, "rounds": ROUNDS, "jobs": [SHORT, LONG],
        "worker_cpu_ms_per_job": summary(per_job), "of_it_kernel_ms_per_job": summary(kernel),
        "store_file_system": store_fs, "file_create_us": summary(creates),
        "file_store_ms_per_write": {k: summary([w[k] for w in writes]) for k in writes[0]}}
    print(table(["figure", "median (min-max)"],
                [["worker CPU ms per job", spread(figures["worker_cpu_ms_per_job"], 2)],
                 ["of it the kernel's", spread(figures["of_it_kernel_ms_per_job"], 2)],
                 *[[f"file store ms per write: {k}", spread(v, 3)]
                   for k, v in figures["file_store_ms_per_write"].items()],
                 [f"a new file on {store_fs} (CPU us, before each round)",
                  spread(figures["file_create_us"])]]))
    return figures

"""Routing by VRAM class, own-class-first consumption and priorities, on real CPU worker
processes of classes 4, 8 and 24 GB and one broker, checked from the job records and sidecars.

Each claim is forced, not likely: every job is on its queue before the first worker starts, and
the workers run one after another, each alone until it stops after a set number of jobs
(`--max-jobs`). A lone worker takes its jobs in the order of its one BRPOP (farm/queues.py), so
which jobs it takes, and in what order, follow from the queues alone:

    queued first   the backlog, priority 2: 3 jobs of each class (4, 8 and 24 GB)
    queued next    the urgent batch, priority 9: 2 jobs of each class
    1. a 4 GB worker, 2 jobs    the two urgent 4 GB jobs, ahead of the older backlog
    2. an 8 GB worker, 6 jobs   its own class first, urgent then backlog (2 + 3), then one 4 GB
                                job: a bigger worker helps a smaller class once its own is
                                empty; never a 24 GB job, though they wait all along
    3. a 24 GB worker, 7 jobs   its own class (2 + 3), then the last two 4 GB jobs
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from farm import broker
from farm.records import read_manifest, read_records
from farm.settings import Settings
from farm.store import get_json, open_store
from tests.conftest import ROOT, farm_cmd, run_farm

# min_vram → the class the tiny model lands in with classes 4, 8, 24
CLASS_OF = {0: 4, 6: 8, 20: 24}
PROFILE_OF = {4: "sequential-offload", 8: "lean", 24: "resident-pair"}
BACKLOG, URGENT = 2, 9  # priorities
# each worker, alone in turn: its class, and (planned class, priority) of the jobs it must run,
# in the order it must run them
PHASES = (
    (4, [(4, URGENT)] * 2),
    (8, [(8, URGENT)] * 2 + [(8, BACKLOG)] * 3 + [(4, BACKLOG)]),
    (24, [(24, URGENT)] * 2 + [(24, BACKLOG)] * 3 + [(4, BACKLOG)] * 2),
)


def _batch(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _jobs(prefix: str, priority: int, per_class: int) -> list[dict]:
    return [{"prompt": f"{prefix} {i}", "seed": 100 * priority + i, "steps": 4,
             "priority": priority, "min_vram": min_vram}
            for i, min_vram in enumerate(m for m in CLASS_OF for _ in range(per_class))]


def test_fleet_routes_by_class_serves_own_class_first_and_honours_priority(
        env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "FARM_VRAM_CLASSES": "4,8,24"}  # the classes this farm routes to
    settings = Settings.load(env=env)
    store = open_store(settings)
    try:
        batches = []
        for name, priority, per_class in (("backlog", BACKLOG, 3), ("urgent", URGENT, 2)):
            rows = _jobs(name, priority, per_class)
            sub = run_farm(env, "submit", str(_batch(tmp_path / f"{name}.jsonl", rows)), "--json")
            assert sub.returncode == 0, sub.stderr
            batches.append(json.loads(sub.stdout)["batch"])
        jobs = {j.id: j for b in batches for j in read_manifest(store, b, settings).jobs}
        assert sorted(CLASS_OF[j.spec.min_vram] for j in jobs.values()) == sorted(
            j.vram_class for j in jobs.values())

        ran: dict[str, list[str]] = {}  # worker → the jobs it ran, in the order it ran them
        for vram, expected in PHASES:
            name = f"w-{vram}gb"
            worker = subprocess.run(
                farm_cmd("worker", "--device", "cpu", "--vram", str(vram), "--name", name,
                         "--max-jobs", str(len(expected))),
                env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert worker.returncode == 0, worker.stderr[-3000:]
            records = {k: r for b in batches for k, r in read_records(store, b).items()}
            mine = sorted((r for r in records.values() if r.worker == name),
                          key=lambda r: r.started_at or 0.0)
            ran[name] = [r.job for r in mine]
            assert [(jobs[r.job].vram_class, jobs[r.job].spec.priority) for r in mine] == \
                expected, (name, ran[name])
            if vram == 4:
                # a job no live worker can take waits, and status says why
                status = run_farm(env, "status", batches[0])
                assert "waiting: no live worker serves tiny-sdxl at >=8 GB" in status.stdout
                assert "waiting: no live worker serves tiny-sdxl at >=24 GB" in status.stdout
        big = run_farm(env, "submit", "-", "--model", "sdxl-base", "--min-vram", "8", "--json",
                       input="a real one\n")
        assert big.returncode == 0, big.stderr
        waiting = run_farm(env, "status", json.loads(big.stdout)["batch"])
        assert "waiting: no live worker serves sdxl-base at >=8 GB" in waiting.stdout
    finally:
        broker.stop_broker(settings)

    # every job ran once, on the worker its phase says, at or above its class, with the
    # profile of the class it ran at
    assert sorted(k for run in ran.values() for k in run) == sorted(jobs)
    records = {k: r for b in batches for k, r in read_records(store, b).items()}
    for job in jobs.values():
        record = records[job.id]
        assert record.state == "succeeded" and record.attempts == 1, record
        side = get_json(store, record.images[0].replace(".png", ".json"))
        assert side["worker"] == record.worker
        assert side["planned_vram_class"] == job.vram_class <= side["vram_class"]
        assert side["profile"] == PROFILE_OF[side["vram_class"]]

"""A fleet of six CPU workers of classes 4, 8 and 24 GB on one broker: routing by class,
own-class-first consumption, and priorities, checked from the sidecars and the manifest."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from farm.records import Manifest, read_manifest, read_records
from farm.settings import Settings
from farm.store import get_json, open_store
from tests.conftest import run_farm

# min_vram → the class the tiny model lands in with classes 4, 8, 24
CLASS_OF = {0: 4, 6: 8, 20: 24}
SLACK = 0.5  # seconds: a message popped just before an event may record its start just after


def _batch(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fleet_routes_by_class_serves_own_class_first_and_honours_priority(
        env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "FARM_VRAM_CLASSES": "4,8,24"}  # the classes this farm routes to
    settings = Settings.load(env=env)
    up = run_farm(env, "up", "--workers", "6", "--vram", "4,8,24", "--device", "cpu",
                  timeout=600)
    assert up.returncode == 0, up.stderr[-2000:]
    try:
        listed = json.loads(run_farm(env, "workers", "--json").stdout)
        assert sorted(w["vram_class"] for w in listed) == [4, 4, 8, 8, 24, 24]
        assert {w["vram_class"]: w["profile"] for w in listed} == {
            4: "sequential-offload", 8: "lean", 24: "resident-pair"}
        assert all(w["state"] == "ready" for w in listed)

        # 1. a low-priority backlog: 54 jobs, a third for each class
        backlog = [{"prompt": f"backlog {i}", "seed": i, "steps": 20, "priority": 2,
                    "min_vram": (0, 6, 20)[i % 3]} for i in range(54)]
        a = json.loads(run_farm(env, "submit", str(_batch(tmp_path / "a.jsonl", backlog)),
                                "--json").stdout)
        enqueued = {a["batch"]: time.time()}  # every message of the batch is on Redis by now
        # 2. then an urgent batch, while most of the backlog still waits
        urgent = [{"prompt": f"urgent {i}", "seed": 1000 + i, "steps": 20, "priority": 9,
                   "min_vram": (0, 6, 20)[i % 3]} for i in range(12)]
        b = json.loads(run_farm(env, "submit", str(_batch(tmp_path / "b.jsonl", urgent)),
                                "--json").stdout)
        enqueued[b["batch"]] = time.time()
        for batch in (b["batch"], a["batch"]):
            watch = run_farm(env, "status", batch, "--watch", timeout=600)
            assert watch.returncode == 0 and ": succeeded" in watch.stdout, watch.stdout[-2000:]

        # 3. a job no live worker can take is accepted, and status says why it waits
        big = run_farm(env, "submit", "-", "--model", "sdxl-base", "--min-vram", "8", "--json",
                       input="a real one\n")
        assert big.returncode == 0, big.stderr
        waiting = run_farm(env, "status", json.loads(big.stdout)["batch"])
        assert "waiting: no live worker serves sdxl-base at >=8 GB" in waiting.stdout
        seen = run_farm(env, "workers")
        assert seen.stdout.count("tiny-sdxl") == 6 and "24 GB" in seen.stdout
    finally:
        down = run_farm(env, "down")
    assert down.returncode == 0

    store = open_store(settings)
    runs = []  # (batch, job, planned class, class that ran it, started, finished)
    manifests: dict[str, Manifest] = {}
    for batch in (a["batch"], b["batch"]):
        manifests[batch] = read_manifest(store, batch, settings)
        records = read_records(store, batch)
        for job in manifests[batch].jobs:
            record = records[job.id]
            assert record.state == "succeeded" and record.attempts == 1
            assert job.vram_class == CLASS_OF[job.spec.min_vram]
            side = get_json(store, record.images[0].replace(".png", ".json"))
            assert side["planned_vram_class"] == job.vram_class
            assert side["profile"] == {4: "sequential-offload", 8: "lean",
                                       24: "resident-pair"}[side["vram_class"]]
            runs.append((batch, job, job.vram_class, side["vram_class"], record.started_at,
                         record.finished_at))

    # no stage ran below its class
    assert all(ran >= planned for _, _, planned, ran, _, _ in runs)
    # bigger workers did help smaller classes (or this test proves little)
    assert any(ran > planned for _, _, planned, ran, _, _ in runs)

    # the 24 GB workers took a smaller job only when no 24 GB job was waiting (a 24 GB job
    # counts as waiting once its whole batch was on the queue)
    big_jobs = [r for r in runs if r[2] == 24]
    for _, job, planned, ran, started, _ in runs:
        if ran == 24 and planned < 24:
            still_waiting = [k for k in big_jobs
                             if enqueued[k[0]] < started and k[4] > started + SLACK]
            assert not still_waiting, (job.id, [k[1].id for k in still_waiting])

    # urgent jobs overtook the backlog: after the urgent batch arrived, no backlog job of a
    # class started while an urgent job of that class still waited
    t_urgent = enqueued[b["batch"]]
    overtaken = [r for r in runs if r[0] == a["batch"] and r[4] > t_urgent + SLACK]
    assert len(overtaken) >= 12, "the backlog drained before the urgent batch arrived"
    for _, job, planned, _, started, _ in (r for r in runs if r[0] == b["batch"]):
        jumped = [r[1].id for r in overtaken if r[2] == planned and r[4] < started - SLACK]
        assert not jumped, (job.id, jumped)
    urgent_done = statistics.median(r[5] for r in runs if r[0] == b["batch"])
    backlog_done = statistics.median(r[5] for r in overtaken)
    assert urgent_done < backlog_done

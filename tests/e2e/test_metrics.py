"""The fleet's Prometheus metrics, scraped from real processes and checked against the batch:
stand-in worker processes (worker/standin.py) serving /metrics on ports the system picks
(FARM_METRICS_PORT=0, read back from their heartbeats), and `farm metrics serve|show` reading
the same Redis. Numbers are summed across workers, so no test depends on who took which job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from farm import broker, fleet, queues
from farm.jobs import JobSpec
from farm.scheduler.submit import submit
from farm.settings import Settings
from tests.conftest import ROOT, farm_cmd, run_farm
from tests.e2e.test_lifecycle import Workers, finished, wait

FAST = {"FARM_HEARTBEAT_INTERVAL": "0.5", "FARM_HEARTBEAT_TTL": "2", "FARM_METRICS_PORT": "0"}
STEPS, IMAGES = 4, 2

Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> list[Sample]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == want for k, want in labels.items()))


@pytest.fixture
def farm(env: dict[str, str], redis_url: str, tmp_path: Path
         ) -> Iterator[tuple[Settings, Workers]]:
    env = {**env, **FAST, "FARM_BROKER_URL": redis_url}
    settings = Settings.load(env=env)
    workers = Workers(env, tmp_path / "logs")
    try:
        yield settings, workers
    finally:
        workers.stop()


def specs(settings: Settings, count: int, **fields: Any) -> list[JobSpec]:
    return [JobSpec.from_dict({"prompt": f"a fox {i}", "seed": i + 1, "steps": STEPS, "n": IMAGES,
                               "width": 64, "height": 64, **fields}, settings)
            for i in range(count)]


def metric_ports(settings: Settings, names: set[str], workers: Workers) -> dict[str, int]:
    """Each named worker's metrics port, from its heartbeat, once it is ready."""
    client = broker.redis_client(settings)

    def ready() -> dict[str, int]:
        found = {w.name: int(w.extra["metrics_port"]) for w in fleet.live_workers(client)
                 if w.name in names and w.state == fleet.WorkerState.READY}
        return found if set(found) == names else {}

    return wait("the workers' metrics ports", ready, logs=workers)


def test_worker_metrics_add_up_to_the_batch(farm: Any) -> None:
    settings, workers = farm
    n = 12
    result = submit(settings, specs(settings, n))
    names = {"m-1", "m-2"}
    for name in sorted(names):
        workers.start(name, "--render-seconds", "0.05")
    ports = metric_ports(settings, names, workers)

    # during the batch: each worker is in exactly one state, and its heartbeat is fresh
    for port in ports.values():
        during = scrape(port)
        assert total(during, "farm_worker_state") == 1, during
        assert 0 <= total(during, "farm_worker_heartbeat_age_seconds") < 2.0

    wait("the batch", lambda: finished(settings, result.batch, n), logs=workers)
    after = [s for port in ports.values() for s in scrape(port)]
    done = {"outcome": "succeeded"}
    assert total(after, "farm_worker_stages_total", stage="full", model="tiny-sdxl", **done) == n
    assert total(after, "farm_worker_stages_total") == n  # nothing else ended anywhere
    assert total(after, "farm_worker_jobs_total", model="tiny-sdxl", **done) == n
    assert total(after, "farm_worker_stage_seconds_count", stage="full") == n
    assert total(after, "farm_worker_stage_seconds_sum") > 0
    assert total(after, "farm_worker_images_total", model="tiny-sdxl") == n * IMAGES
    assert total(after, "farm_worker_steps_total", stage="full") == n * IMAGES * STEPS
    assert total(after, "farm_worker_dead_letters_total") == 0
    assert total(after, "farm_worker_handbacks_total") == 0
    for port in ports.values():
        mine = scrape(port)
        ran = total(mine, "farm_worker_stage_seconds_count")
        # the histogram's +Inf bucket counts every observation
        assert total(mine, "farm_worker_stage_seconds_bucket", le="+Inf") == ran
        if ran:
            assert total(mine, "farm_worker_steps_per_second") > 0
        # stand-ins compile nothing: one cache lookup per model, "off"
        assert total(mine, "farm_worker_compile_cache_total", result="off") == 1
        info = [lab for name, lab, _ in mine if name == "farm_worker_info"]
        assert len(info) == 1 and info[0]["worker"] in names, info
        assert total(mine, "farm_worker_state", state="ready") == 1
        assert total(mine, "farm_worker_gpu_memory_used_bytes") == 0  # a CPU worker: none

    # the exporter sees the same fleet: two ready workers of their class, both consuming the
    # batch's queue, nothing waiting, no job open
    cls = info[0]["vram_class"]
    # a worker's heartbeat publishes its state once an interval (no Redis write per job): wait
    # for the beat after the last job before reading the fleet as the exporter does
    client = broker.redis_client(settings)
    wait("both workers' heartbeats saying ready", lambda: sum(
        w.state == fleet.WorkerState.READY for w in fleet.live_workers(client)) == 2,
        logs=workers)
    shown = parse(run_farm(workers.env, "metrics", "show", "--model", "tiny-sdxl").stdout)
    assert total(shown, "farm_workers", vram_class=cls, state="ready") == 2
    assert total(shown, "farm_workers") == 2
    queue = queues.parse_queue(queues.stage_queue(result.jobs[0]))
    assert queue is not None
    assert total(shown, "farm_queue_consumers", model=queue[0], vram_class=str(queue[1]),
                 priority=str(queue[2])) == 2
    assert total(shown, "farm_queue_depth") == 0
    assert total(shown, "farm_jobs_open") == 0


def test_a_dead_lettered_job_is_counted_by_the_worker_that_took_it_over(farm: Any) -> None:
    """A worker crashes on a job alone; with FARM_MAX_ATTEMPTS=1 the next worker's sweep puts
    the stage back and, taking it over, dead-letters it: one takeover, one dead letter."""
    settings, workers = farm
    workers.env["FARM_MAX_ATTEMPTS"] = "1"
    settings = settings.replace(max_attempts=1)
    result = submit(settings, specs(settings, 1, prompt="POISON"))
    crasher = workers.start("m-crash", "--crash-on", "POISON")
    assert crasher.wait(timeout=120) != 0
    workers.start("m-next")
    port = metric_ports(settings, {"m-next"}, workers)["m-next"]
    wait("the dead letter", lambda: finished(settings, result.batch, 1), logs=workers)
    # the job's record is final before the stage's end is counted: wait for the count
    after = wait("the count", lambda: (lambda s: s if total(
        s, "farm_worker_dead_letters_total") else None)(scrape(port)), logs=workers)
    assert total(after, "farm_worker_dead_letters_total", model="tiny-sdxl", stage="full") == 1
    assert total(after, "farm_worker_takeovers_total", stage="full") == 1
    assert total(after, "farm_worker_recoveries_total", path="sweep") == 1
    assert total(after, "farm_worker_jobs_total", outcome="failed") == 1
    assert total(after, "farm_worker_stage_seconds_count") == 0  # it never ran to its end


def test_exporter_queue_depth_is_each_lists_length(farm: Any, redis_url: str) -> None:
    settings, workers = farm
    urgent = submit(settings, specs(settings, 3, priority=9))
    later = submit(settings, specs(settings, 4, priority=2))
    client = redis.Redis.from_url(redis_url)

    server = subprocess.Popen(farm_cmd("metrics", "serve", "--port", "0", "--model", "tiny-sdxl"),
                              env=workers.env, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        found = re.search(r"serving on port (\d+)", line)
        assert found, line + server.stderr.read() if server.poll() is not None else line
        served = scrape(int(found.group(1)))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 0

    depths = [(lab, v) for n, lab, v in served if n == "farm_queue_depth"]
    for labels, value in depths:
        name = queues.queue_name(labels["model"], int(labels["vram_class"]),
                                 int(labels["priority"]))
        assert value == client.llen(name), (name, value)
    assert sum(v for _, v in depths) == 7
    job = {9: urgent.jobs[0], 2: later.jobs[0]}
    for priority, count in ((9, 3), (2, 4)):
        model, vram_class, p = queues.parse_queue(queues.stage_queue(job[priority])) or ("", 0, 0)
        assert total(served, "farm_queue_depth", model=model, vram_class=str(vram_class),
                     priority=str(p)) == count
    assert total(served, "farm_queue_consumers") == 0
    assert total(served, "farm_workers") == 0
    assert total(served, "farm_batches", state="active") == 2
    assert total(served, "farm_jobs_open") == 7
    assert total(served, "farm_exporter_redis_up") == 1


def test_exporter_reports_an_unreachable_redis(env: dict[str, str]) -> None:
    env = {**env, "FARM_BROKER_URL": "redis://127.0.0.1:1/0"}
    began = time.monotonic()
    shown = run_farm(env, "metrics", "show")
    assert shown.returncode == 0, shown.stderr
    assert total(parse(shown.stdout), "farm_exporter_redis_up") == 0
    assert time.monotonic() - began < 60

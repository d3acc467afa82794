"""The exporter needs nothing beyond what scheduler/exporter.py declares: a Redis user allowed only
EXPORTER_COMMANDS, reading only EXPORTER_KEYS, scrapes a real farm in full (the user an ACL for
`farm metrics serve` is made from)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest

from farm import fleet, lifecycle, models, queues, recovery, tally
from farm.jobs import JobSpec
from farm.scheduler import exporter
from farm.scheduler.submit import submit
from farm.settings import Settings
from tests.e2e.test_metrics import parse, total


@pytest.fixture
def exporter_client(redis_url: str) -> Iterator[Any]:
    admin = redis.Redis.from_url(redis_url)
    name, password = f"farm-test-exporter-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rules = ["on", f">{password}", "resetkeys", "resetchannels", "-@all", "+@connection",
             *(f"+{c}" for c in exporter.EXPORTER_COMMANDS),
             *(f"%R~{k}" for k in exporter.EXPORTER_KEYS)]
    admin.execute_command("ACL", "SETUSER", name, *rules)
    db = int(redis_url.rsplit("/", 1)[1])
    try:
        yield redis.Redis(host="127.0.0.1", port=6379, db=db, username=name, password=password)
    finally:
        admin.execute_command("ACL", "DELUSER", name)


def test_a_user_with_only_the_exporters_commands_and_keys_reads_everything(
        env: dict[str, str], redis_url: str, exporter_client: Any) -> None:
    settings = Settings.load(env={**env, "FARM_BROKER_URL": redis_url})
    admin = redis.Redis.from_url(redis_url)
    specs = [JobSpec.from_dict({"prompt": f"a fox {i}", "seed": i + 1, "steps": 4, "width": 64,
                                "height": 64}, settings) for i in range(3)]
    batch = submit(settings, specs)
    queue = queues.stage_queue(batch.jobs[0])
    fleet.publish(admin, fleet.WorkerInfo(
        name="w-1", host="h", pid=1, device="cpu", models=["tiny-sdxl"], queues=[queue],
        vram_class=80, state=fleet.WorkerState.BUSY, last_seen=time.time()), ttl=60)
    admin.hset(recovery.UNACKED, "tag-1", "{}")     # a companion (worker/batching.py)
    admin.set(recovery.INFLIGHT + "w-1", recovery.claim("tag-2", queue, batch.jobs[2].id, "full"))
    record = lifecycle.JobRecord(job=batch.jobs[0].id, batch=batch.batch, seq=3,
                                 state=lifecycle.JobState.SUCCEEDED)
    assert tally.Tally(admin).note(record) is not None

    with pytest.raises(redis.exceptions.NoPermissionError):
        exporter_client.lpush(queue, "x")  # read-only
    shown = parse(generate_latest(exporter.registry(exporter_client, settings,
                                                    ["tiny-sdxl"])).decode())
    assert total(shown, "farm_exporter_redis_up") == 1
    assert total(shown, "farm_queue_depth") == admin.llen(queue) == 3
    assert total(shown, "farm_queue_consumers") == 1   # the one queue the worker lists
    assert total(shown, "farm_workers", vram_class="80", state="busy") == 1
    assert total(shown, "farm_batches", state="active") == 1
    assert total(shown, "farm_jobs_open") == 2            # the tally counts one final
    assert total(shown, "farm_stages_running") == 2       # a record's and a companion's


def test_a_queue_no_model_or_worker_names_is_reported_while_it_holds_stages(
        env: dict[str, str], redis_url: str, exporter_client: Any) -> None:
    # a catalog base and refiner's pair queue: its name comes from no built-in model, and the
    # workers that consumed it have stopped; a queue of no farm shape is not reported
    settings = Settings.load(env={**env, "FARM_BROKER_URL": redis_url})
    admin = redis.Redis.from_url(redis_url)
    pair = queues.queue_name(models.pair_name("house-base", "house-refiner"), 24, 5)
    admin.rpush(pair, "m1", "m2")
    admin.rpush("farm.not-a-queue", "x")
    admin.set(queues.queue_name("house-other", 24, 5), "a string, not a list")
    shown = parse(generate_latest(exporter.registry(exporter_client, settings,
                                                    ["tiny-sdxl"])).decode())
    slug = queues.parse_queue(pair)
    assert slug is not None
    assert total(shown, "farm_queue_depth", model=slug[0], vram_class="24", priority="5") == 2
    assert total(shown, "farm_queue_depth") == 2
    admin.delete(pair)   # drained: the list is gone, and so is the queue from the scrape
    scraped = generate_latest(exporter.registry(exporter_client, settings, ["tiny-sdxl"]))
    assert f'model="{slug[0]}"' not in scraped.decode()

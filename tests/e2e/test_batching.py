"""The throughput mode (FARM_BATCH_JOBS, worker/batching.py) with stand-in worker processes: a
job canceled while its batch renders, and a worker killed mid-batch. Each test holds the batch
half-way with a gate file (tests/faults.py --gate) until the worker's in-flight record names
every message it took, so nothing depends on timing."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from farm import queues, recovery
from farm.jobs import JobSpec
from farm.keys import image_key, sidecar_of
from farm.lifecycle import JobState, read_record
from farm.scheduler.status import batch_status
from farm.scheduler.submit import Submitted, submit
from farm.settings import Settings
from farm.store import get_json, open_store
from tests.e2e.test_lost_messages import _farm
from tests.e2e.test_poison import StandInFleet


def _submit(settings: Settings, n: int) -> Submitted:
    specs = [JobSpec.from_dict({"prompt": f"batched {i}", "seed": i, "steps": 4, "width": 64,
                                "height": 64}, settings) for i in range(n)]
    return submit(settings, specs, source="test-batching")


def _held(client: Any, worker: str, count: int, crew: StandInFleet) -> dict[str, Any]:
    """Wait until `worker` holds `count` messages besides its lead (its in-flight record)."""
    deadline = time.monotonic() + 60
    while True:
        raw = client.get(recovery.INFLIGHT + worker)
        if raw is not None and len(json.loads(raw).get("held") or []) == count:
            return dict(json.loads(raw))
        assert time.monotonic() < deadline, crew.tails()
        time.sleep(0.05)


def _all_acked(client: Any) -> None:
    """Wait until no message is unacknowledged: no in-flight record holds one, none is in
    kombu's `unacked`."""
    def records() -> list[bytes]:
        return list(client.scan_iter(match=recovery.INFLIGHT + "*"))

    deadline = time.monotonic() + 10
    while client.hlen(recovery.UNACKED) or records():
        assert time.monotonic() < deadline, (client.hkeys(recovery.UNACKED), records())
        time.sleep(0.05)


def _finished(settings: Settings, result: Submitted, crew: StandInFleet) -> None:
    store = open_store(settings)
    deadline = time.monotonic() + 60
    while not batch_status(store, result.batch, settings).finished:
        crew.supervise()
        assert time.monotonic() < deadline, crew.tails()
        time.sleep(0.1)


def test_a_job_canceled_while_its_batch_renders_ends_canceled_without_images(
        env: dict[str, str], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with _farm({**env, "FARM_BATCH_JOBS": "3"}, tmp_path, "--gate", str(gate)) as (
            settings, client, crew):
        result = _submit(settings, 3)
        # queued before the worker starts: it surely takes all three
        assert client.llen(queues.stage_queue(result.jobs[0])) == 3
        name = crew.start("batch")
        inflight = _held(client, name, 2, crew)
        by_id = {job.id: job for job in result.jobs}
        held = [h["job"] for h in inflight["held"]]
        assert {inflight["job"], *held} == set(by_id), inflight
        # a companion (not the message the consumer delivered) is canceled mid-batch
        lead, victim, other = by_id[inflight["job"]], by_id[held[0]], by_id[held[1]]
        recovery.set_canceled(client, victim.id)
        gate.touch()   # the batch renders on
        _finished(settings, result, crew)

        store = open_store(settings)
        for job in (lead, other):
            record = read_record(store, job.batch, job.id)
            assert record is not None and record.state == JobState.SUCCEEDED, record
            side = get_json(store, sidecar_of(image_key(job.batch, job.id, 0)))
            assert side["batched"] == 3 and side["worker"] == name, side
        record = read_record(store, victim.batch, victim.id)
        assert record is not None and record.state == JobState.CANCELED, record
        assert not [k for k in store.list_keys(f"batches/{victim.batch}/images/")
                    if f"/{victim.id}-" in k]
        # every message acked: none left unacknowledged or queued
        _all_acked(client)
        assert client.llen(queues.stage_queue(lead)) == 0
        logs = crew.tails(200)
        for job in (lead, other):
            assert logs.count(f"job {job.id} succeeded") == 1, logs
        assert logs.count(f"job {victim.id} canceled") == 1, logs
        assert "duplicate" not in logs, logs


def test_a_worker_killed_mid_batch_loses_none_of_its_messages(
        env: dict[str, str], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with _farm({**env, "FARM_BATCH_JOBS": "3"}, tmp_path, "--gate", str(gate)) as (
            settings, client, crew):
        result = _submit(settings, 3)
        queue = queues.stage_queue(result.jobs[0])
        assert client.llen(queue) == 3
        name = crew.start("doomed")
        _held(client, name, 2, crew)
        # the dead worker holds all three: none queued, the lead in its in-flight record and
        # the two companions unacknowledged
        assert client.llen(queue) == 0 and client.hlen(recovery.UNACKED) == 2
        assert client.exists(recovery.INFLIGHT + name)
        proc = crew.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)   # mid-batch: it waits on the gate
        proc.wait()
        gate.touch()
        heir = crew.start("heir")   # another worker: only the sweep can give it the messages
        _finished(settings, result, crew)

        store = open_store(settings)
        for job in result.jobs:
            record = read_record(store, job.batch, job.id)
            assert record is not None and record.state == JobState.SUCCEEDED, record
            pngs = [k for k in store.list_keys(f"batches/{job.batch}/images/")
                    if f"/{job.id}-" in k and k.endswith(".png")]
            assert pngs == [image_key(job.batch, job.id, 0)], pngs
            # rendered by the heir (alone or batched: the sweep puts the three back one by one)
            assert get_json(store, sidecar_of(pngs[0]))["worker"] == heir
        logs = crew.tails(200)
        # the dead worker's in-flight record brought back every message it held, at once
        assert f"worker {name} stopped beating" in logs and "3 message(s) queued again" in logs, \
            logs
        _all_acked(client)
        assert client.llen(queue) == 0

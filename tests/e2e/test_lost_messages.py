"""The two moments where a `kill -9` used to lose a message for good, injected on purpose.

kombu's Redis transport takes a message with BRPOP, then records it in its `unacked` hash; the
worker then writes its own in-flight record. A worker killed

- between the BRPOP and the `unacked` write leaves the message nowhere in Redis (kombu#305):
  here the message is popped off its queue by hand, exactly what such a worker did;
- between the `unacked` write and the in-flight record leaves an unacknowledged message that
  no worker claims: here kombu itself takes it (`basic_get`, which writes `unacked`) for a
  consumer that then vanishes.

In both cases a stand-in worker (worker/standin.py) started afterwards must bring the job back
(farm/recovery.py: reconciling open jobs, and the orphan sweep) and finish it once, long before
the broker's visibility timeout (24 h, unchanged here) would.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from farm import broker, queues, recovery, tally
from farm.jobs import JobSpec
from farm.lifecycle import JobState, read_record
from farm.scheduler.status import batch_status
from farm.scheduler.submit import Submitted, submit
from farm.settings import Settings
from farm.store import open_store
from tests.conftest import ROOT
from tests.e2e.test_poison import FAST_BEATS, StandInFleet, sigterm_cleans_up

# a consumer that takes one message through kombu (which records it in `unacked`) and dies at
# once, with no cleanup: a closing kombu channel would put its unacked messages back itself
TAKE_AND_DIE = """
import os, sys
from farm import broker
from farm.settings import Settings
conn = broker.celery_app(Settings.load()).connection_for_read()
message = conn.default_channel.basic_get(sys.argv[1], no_ack=False)
print(message.delivery_tag, flush=True)
os._exit(0)
"""


def _take_and_die(env: dict[str, str], queue: str) -> str:
    out = subprocess.run([sys.executable, "-c", TAKE_AND_DIE, queue], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _submit(settings: Settings, n: int) -> Submitted:
    specs = [JobSpec.from_dict({"prompt": f"lost message {i}", "seed": i, "steps": 2,
                                "width": 64, "height": 64}, settings) for i in range(n)]
    return submit(settings, specs, source="test-lost")


def _finish(settings: Settings, result: Submitted, crew: StandInFleet, limit: float) -> float:
    store = open_store(settings)
    began = time.monotonic()
    while not batch_status(store, result.batch, settings).finished:
        crew.supervise()
        assert time.monotonic() - began < limit, crew.tails()
        time.sleep(0.1)
    for job in result.jobs:
        record = read_record(store, job.batch, job.id)
        assert record is not None and record.state == JobState.SUCCEEDED, record
        pngs = [k for k in store.list_keys(f"batches/{job.batch}/images/")
                if k.endswith(".png") and f"/{job.id}-" in k]
        assert len(pngs) == 1, pngs
    return time.monotonic() - began


@contextlib.contextmanager
def _farm(env: dict[str, str], tmp_path: Path, *worker_args: str
          ) -> Iterator[tuple[Settings, Any, StandInFleet]]:
    """The embedded broker with fast heartbeats, and a supervisor for stand-in workers (each
    started with `worker_args` for tests/faults.py); both stopped at the end whatever happens."""
    env = {**env, **FAST_BEATS}
    settings = Settings.load(env=env)
    crew = StandInFleet(env, tmp_path / "logs", *worker_args)
    with sigterm_cleans_up():
        try:
            broker.ensure_broker(settings)
            yield settings, broker.redis_client(settings), crew
        finally:
            try:
                crew.stop()
            finally:
                broker.stop_broker(settings)


def test_a_message_lost_between_brpop_and_unacked_is_queued_again(
        env: dict[str, str], tmp_path: Path) -> None:
    with _farm(env, tmp_path) as (settings, client, crew):
        result = _submit(settings, 3)
        queue = queues.stage_queue(result.jobs[0])
        assert client.llen(queue) == 3
        # a worker's BRPOP took the oldest message, and the worker died before kombu wrote it
        # to `unacked`: it is gone from Redis
        gone = recovery.message_job(json.loads(client.rpop(queue)))
        assert gone == result.jobs[0].id
        assert client.hlen(recovery.UNACKED) == 0
        crew.start("lost-a")
        took = _finish(settings, result, crew, limit=60)
        logs = crew.tails(200)
        assert f"job {gone} was in no queue and held by no worker" in logs, logs
        # done: the batch leaves the set reconciling looks at
        deadline = time.monotonic() + 10
        while result.batch in recovery.active_batches(client):
            assert time.monotonic() < deadline, recovery.active_batches(client)
            time.sleep(0.2)
        print(f"lost message: job {gone} found and finished in {took:.1f} s")


def test_an_unacked_message_no_worker_claims_is_put_back(
        env: dict[str, str], tmp_path: Path) -> None:
    with _farm(env, tmp_path) as (settings, client, crew):
        result = _submit(settings, 2)
        queue = queues.stage_queue(result.jobs[0])
        # a channel that notes kombu's way (the throughput mode's taker) takes a message
        # (writing `unacked`), and its process dies before the in-flight record names it
        old_tag = _take_and_die({**env, **FAST_BEATS}, queue)
        assert client.hexists(recovery.UNACKED, old_tag)
        orphan = recovery.message_job(json.loads(client.hget(recovery.UNACKED, old_tag))[0])
        crew.start("orphan-a")
        took = _finish(settings, result, crew, limit=60)
        logs = crew.tails(200)
        assert f"an unacknowledged message (job {orphan}) had no worker behind it" in logs, logs
        assert client.hlen(recovery.UNACKED) == 0
        print(f"orphaned unacked message: job {orphan} put back and finished in {took:.1f} s")


def test_a_message_put_back_gets_a_fresh_delivery_tag(env: dict[str, str]) -> None:
    """A late ack from a worker presumed dead removes `unacked[old tag]`: the message's new
    holder must be under another tag, or its entry would vanish with that ack."""
    settings = Settings.load(env=env)
    try:
        broker.ensure_broker(settings)
        client = broker.redis_client(settings)
        result = _submit(settings, 1)
        queue = queues.stage_queue(result.jobs[0])
        old_tag = _take_and_die(env, queue)
        # a live worker claims it: not an orphan, however old
        client.zadd(recovery.UNACKED_INDEX, {old_tag: time.time() - 3600})
        assert recovery.restore_orphans(client, 60, claimed={old_tag}) == []
        assert client.llen(queue) == 0
        # unclaimed and old: put back, under a fresh tag
        (back,) = recovery.restore_orphans(client, 60, claimed=set())
        assert back["job"] == result.jobs[0].id and back["queue"] == queue
        new_tag = _take_and_die(env, queue)   # its next holder
        assert new_tag and new_tag != old_tag
        payload = json.loads(client.hget(recovery.UNACKED, new_tag))[0]
        assert payload["headers"]["redelivered"] is True
        client.hdel(recovery.UNACKED, old_tag)  # the late ack of the presumed-dead worker
        assert client.hexists(recovery.UNACKED, new_tag)
    finally:
        broker.stop_broker(settings)


def test_a_worker_killed_between_a_final_record_and_its_note_leaves_record_and_tally_exact(
        env: dict[str, str], tmp_path: Path) -> None:
    """A worker that dies after a job's final record and before its note leaves the job counted
    as running (and so open); its message comes back, the next worker finds the record final,
    and its note makes the tally exact and closes the job."""
    marker = tmp_path / "died"
    with _farm(env, tmp_path) as (settings, client, crew):
        result = _submit(settings, 4)
        victim = result.jobs[1].id
        crew.args = ["--die-before-note", f"{victim}:{marker}"]
        crew.start("w")
        _finish(settings, result, crew, limit=120)
        assert marker.exists(), crew.tails()   # the fault did happen
        assert any(status == 1 for _, status in crew.exits), crew.exits
        # every record is final before the victim's message comes back: wait for the worker
        # that takes it again to note the job
        deadline = time.monotonic() + 120
        while True:
            total, counts = tally.counts(client, result.batch) or (0, {})
            if counts.get("succeeded") == 4 or time.monotonic() > deadline:
                break
            crew.supervise()
            time.sleep(0.1)
        assert total == 4 and counts["succeeded"] == 4, (counts, crew.tails())
        assert sum(counts.values()) == 4, counts
        # reconciling reads the tally: the batch has ended and leaves the set it looks at
        deadline = time.monotonic() + 30
        while result.batch in recovery.active_batches(client):
            assert time.monotonic() < deadline, recovery.active_batches(client)
            crew.supervise()
            time.sleep(0.2)
        assert not client.exists(recovery.OPEN + result.batch)

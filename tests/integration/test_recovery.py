"""Reconciling open jobs (farm/recovery.py) against the real Redis: which jobs count as missing,
and when. The end-to-end proof, with kombu and workers, is tests/e2e/test_lost_messages.py."""

from __future__ import annotations

import base64
import json
import time

import redis

from farm import recovery


def _unacked_payload(job: str) -> str:
    """What kombu keeps in `unacked` for a Celery message carrying job `job`."""
    body = base64.b64encode(json.dumps([[{"id": job}], {}, {}]).encode()).decode()
    payload = {"body": body, "properties": {"body_encoding": "base64"}, "headers": {}}
    return json.dumps([payload, "", "farm.q"])


def test_missing_jobs_waits_for_drained_queues_and_the_grace(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    recovery.open_jobs(client, "b1", ["b1-0", "b1-1", "b1-2"])
    assert recovery.active_batches(client) == []   # not looked at until every message is sent
    recovery.activate(client, "b1")
    assert recovery.active_batches(client) == ["b1"]

    client.rpush("farm.q", "waiting message")
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=0) == []  # may be in the queue
    client.delete("farm.q")

    client.hset(recovery.UNACKED, "tag-1", _unacked_payload("b1-1"))   # b1-1 is running
    # first sighting: nothing is missing yet, however short the grace
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=0) == []
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=0) == ["b1-0", "b1-2"]
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=60) == []

    # b1-0 turns up (unacked: a worker took it just in time): its sighting is forgotten
    client.hset(recovery.UNACKED, "tag-0", _unacked_payload("b1-0"))
    time.sleep(0.05)
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=0.01) == ["b1-2"]
    assert not client.hexists(recovery.MISSING + "b1", "b1-0")

    for job in ("b1-0", "b1-1", "b1-2"):
        recovery.job_ended(client, "b1", job)
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=0) == []
    assert recovery.active_batches(client) == []   # done: it leaves the active set
    assert not client.exists(recovery.OPEN + "b1", recovery.MISSING + "b1")


def test_message_job_reads_the_job_id_or_gives_none() -> None:
    payload = json.loads(_unacked_payload("b1-7"))[0]
    assert recovery.message_job(payload) == "b1-7"
    plain = {"body": json.dumps([[{"id": "b1-8"}], {}, {}]), "properties": {}}
    assert recovery.message_job(plain) == "b1-8"
    for bad in ({}, {"body": "not json"}, {"body": json.dumps([["no dict"]])},
                {"body": json.dumps([[{"id": 5}], {}, {}])}):
        assert recovery.message_job(bad) is None

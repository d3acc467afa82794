"""Reconciling open jobs (farm/recovery.py) against the real Redis: which jobs count as missing,
and when. The end-to-end proof, with kombu and workers, is tests/e2e/test_lost_messages.py."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import redis

from farm import fleet, recovery


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

    # b1-1 is running: its worker's in-flight record holds its message
    client.set(recovery.INFLIGHT + "w-1", recovery.claim(
        "tag-1", "farm.q", "b1-1", "full", entry=json.loads(_unacked_payload("b1-1"))))
    # first sighting: nothing is missing yet, however short the grace
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=0) == []
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=0) == ["b1-0", "b1-2"]
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=60) == []

    # b1-0 turns up (unacked: a companion taken just in time): its sighting is forgotten
    client.hset(recovery.UNACKED, "tag-0", _unacked_payload("b1-0"))
    time.sleep(0.05)
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=0.01) == ["b1-2"]
    assert not client.hexists(recovery.MISSING + "b1", "b1-0")
    # the caller's own answer to `ended` is taken as given: no second read
    before = int(client.info("commandstats").get("cmdstat_scard", {}).get("calls", 0))
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=60, done=False) == []
    assert int(client.info("commandstats").get("cmdstat_scard", {}).get("calls", 0)) == before
    assert recovery.missing_jobs(client, "b1", ["farm.q"], grace=60, done=True) == []
    assert recovery.active_batches(client) == []   # told done: it leaves the active set
    recovery.activate(client, "b1")
    recovery.open_jobs(client, "b1", ["b1-0", "b1-1", "b1-2"])

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


def _calls(client: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in client.info("commandstats").items()}


def _queued(redis_url: str, env: dict[str, str], jobs: list[dict[str, str]],
            in_flight: str | None = None) -> tuple[redis.Redis, Any, Any]:
    """(a client, a producer app, a consumer connection) on the farm's transport, with a
    message per job waiting on farm.q; `in_flight`: the consumer's worker name."""
    from farm import broker
    from farm.settings import Settings

    settings = Settings.load(env={**env, "FARM_BROKER_URL": redis_url})
    producer = broker.celery_app(settings)
    for job in jobs:
        producer.send_task("farm.test", args=[job], queue="farm.q")
    conn = broker.celery_app(settings, in_flight=in_flight).connection_for_read()
    return redis.Redis.from_url(redis_url), producer, conn


def _moved(a: dict[str, int], b: dict[str, int], name: str) -> int:
    return b.get(name, 0) - a.get(name, 0)


def test_a_channel_without_a_worker_name_keeps_kombus_notes_in_two_commands_each(
        redis_url: str, env: dict[str, str]) -> None:
    client, _, conn = _queued(redis_url, env, [{"id": f"b-{i}"} for i in range(5)])
    channel = conn.default_channel
    assert type(channel).__module__ == "farm.transport"
    before = _calls(client)
    messages = [channel.basic_get("farm.q", no_ack=False) for _ in range(5)]
    taken = _calls(client)
    # kombu's bookkeeping is there, as kombu's own restore and farm/recovery.py read it
    tags = {m.delivery_tag for m in messages}
    assert {t.decode() for t in client.hkeys(recovery.UNACKED)} == tags
    assert {t.decode() for t in client.zrange(recovery.UNACKED_INDEX, 0, -1)} == tags
    for message in messages:
        message.ack()
    acked = _calls(client)
    conn.release()
    assert client.hlen(recovery.UNACKED) == 0 and client.zcard(recovery.UNACKED_INDEX) == 0
    for name in ("zadd", "hset"):
        assert _moved(before, taken, name) == 5, name
    for name in ("hdel", "zrem"):
        assert _moved(taken, acked, name) == 5, name
    assert _moved(before, acked, "multi") == _moved(before, acked, "exec") == 0
    assert client.keys(recovery.INFLIGHT + "*") == []


def test_a_workers_delivery_is_one_set_of_its_inflight_record_and_its_ack_one_del(
        redis_url: str, env: dict[str, str]) -> None:
    client, producer, conn = _queued(
        redis_url, env, [{"id": f"b-{i}", "stage": "base"} for i in range(3)], in_flight="w-9")
    channel = conn.default_channel
    before = _calls(client)
    first = channel.basic_get("farm.q", no_ack=False)
    after = _calls(client)
    info = json.loads(client.get(recovery.INFLIGHT + "w-9"))
    assert (info["tag"], info["queue"], info["job"], info["stage"]) == \
        (first.delivery_tag, "farm.q", "b-0", "base")
    assert recovery.message_job(info["entry"][0]) == "b-0"   # the message itself
    assert (_moved(before, after, "set"), _moved(before, after, "zadd"),
            _moved(before, after, "hset")) == (1, 0, 0)
    assert client.hlen(recovery.UNACKED) == 0
    assert recovery.holds(client, "w-9", "b-0") is False   # no heartbeat: not alive
    client.set(fleet.worker_key("w-9"), "{}")
    assert recovery.holds(client, "w-9", "b-0")
    first.ack()
    acked = _calls(client)
    assert _moved(after, acked, "del") == 1 and client.get(recovery.INFLIGHT + "w-9") is None
    assert not recovery.holds(client, "w-9", "b-0")

    # a reject with requeue (a retryable fault) moves the message from the record to its queue
    second = channel.basic_get("farm.q", no_ack=False)
    assert json.loads(client.get(recovery.INFLIGHT + "w-9"))["tag"] == second.delivery_tag
    second.reject(requeue=True)
    assert client.get(recovery.INFLIGHT + "w-9") is None
    again = [recovery.message_job(json.loads(raw)) for raw in client.lrange("farm.q", 0, -1)]
    assert sorted(again) == ["b-1", "b-2"]

    # a delivery while the record still holds an unacked message is noted kombu's way
    third = channel.basic_get("farm.q", no_ack=False)
    fourth = channel.basic_get("farm.q", no_ack=False)
    assert json.loads(client.get(recovery.INFLIGHT + "w-9"))["tag"] == third.delivery_tag
    assert [t.decode() for t in client.hkeys(recovery.UNACKED)] == [fourth.delivery_tag]
    fourth.ack()
    third.ack()
    assert client.hlen(recovery.UNACKED) == 0 and client.get(recovery.INFLIGHT + "w-9") is None

    # a channel without a worker name (the throughput mode's taker) writes no record
    channel.farm_worker = None
    producer.send_task("farm.test", args=[{"id": "b-3"}], queue="farm.q")
    channel.basic_get("farm.q", no_ack=False)
    assert client.get(recovery.INFLIGHT + "w-9") is None
    conn.release()


def test_a_consumers_brpop_is_packed_once_and_again_when_its_queues_change(
        redis_url: str, env: dict[str, str]) -> None:
    """The BRPOP before each message is sent from one packing while the queues stay the same,
    lists them in the order consumed (the scheduling policy), and is packed anew when a queue
    is added: its message is then delivered too."""
    from kombu import Consumer, Queue

    client, producer, conn = _queued(redis_url, env, [], in_flight="w-5")
    for queue, job in (("farm.low", "low-0"), ("farm.high", "high-0"), ("farm.high", "high-1"),
                       ("farm.late", "late-0")):
        producer.send_task("farm.test", args=[{"id": job}], queue=queue)
    got: list[str] = []

    def take(body: Any, message: Any) -> None:
        got.append(body[0][0]["id"])
        message.ack()

    channel = conn.default_channel
    consumer = Consumer(channel, queues=[Queue("farm.high"), Queue("farm.low")],
                        callbacks=[take], accept=["json"])
    consumer.consume()
    packings = []
    for _ in range(3):
        conn.drain_events(timeout=5)
        packings.append(channel._brpop_packed)
    assert got == ["high-0", "high-1", "low-0"]           # high first: the order consumed
    assert packings[0] is packings[1] is packings[2]      # packed once for three messages
    (made_for, chunks) = packings[0]
    assert made_for[0] == ("farm.high", "farm.low")
    assert b"".join(chunks).startswith(b"*4\r\n$5\r\nBRPOP\r\n$9\r\nfarm.high\r\n")
    consumer.add_queue(Queue("farm.late"))
    consumer.consume()
    conn.drain_events(timeout=5)
    assert got[-1] == "late-0" and channel._brpop_packed[0][0] == (
        "farm.high", "farm.low", "farm.late")
    consumer.cancel()
    conn.release()
    client.delete("farm.high", "farm.low", "farm.late")


def test_a_channel_restore_of_the_recorded_message_puts_it_back_from_the_record(
        redis_url: str, env: dict[str, str]) -> None:
    """kombu's channel-level restore (`_restore`, `_restore_at_beginning`) of the message a
    worker's in-flight record holds: the record's message goes back to the head of its queue
    with a fresh tag and the record is gone; a message noted kombu's way goes back kombu's way."""
    client, _, conn = _queued(redis_url, env, [{"id": "b-0"}, {"id": "b-1"}], in_flight="w-7")
    channel = conn.default_channel
    recorded = channel.basic_get("farm.q", no_ack=False)
    noted = channel.basic_get("farm.q", no_ack=False)   # while the record is held: kombu's notes
    assert client.llen("farm.q") == 0 and client.hlen(recovery.UNACKED) == 1
    channel._restore_at_beginning(recorded)
    assert client.get(recovery.INFLIGHT + "w-7") is None
    (raw,) = client.lrange("farm.q", 0, -1)
    payload = json.loads(raw)
    assert recovery.message_job(payload) == "b-0"
    assert payload["properties"]["delivery_tag"] != recorded.delivery_tag
    channel._restore(noted)
    assert client.hlen(recovery.UNACKED) == 0
    assert sorted(recovery.message_job(json.loads(r)) for r in client.lrange("farm.q", 0, -1)) \
        == ["b-0", "b-1"]
    conn.release()


def test_a_dead_workers_record_gives_its_message_back_once_however_late_its_ack(
        redis_url: str, env: dict[str, str]) -> None:
    client, _, conn = _queued(redis_url, env, [{"id": "b-0", "stage": "base"}], in_flight="w-8")
    held = conn.default_channel.basic_get("farm.q", no_ack=False)
    assert client.llen("farm.q") == 0
    back = recovery.sweep(client, 0.001)   # no heartbeat: presumed dead
    assert [(b["worker"], b["job"]) for b in back] == [("w-8", "b-0")]
    (raw,) = client.lrange("farm.q", 0, -1)
    payload = json.loads(raw)
    assert recovery.message_job(payload) == "b-0" and payload["headers"]["redelivered"]
    assert payload["properties"]["delivery_tag"] != held.delivery_tag   # a fresh tag
    # the worker was only slow: its late ack finds no record of its own and removes nothing
    held.ack()
    assert client.llen("farm.q") == 1
    client.delete(recovery.SWEEP_LOCK)
    assert recovery.sweep(client, 0.001) == []   # given back once
    conn.release()


def test_the_cancel_listener_knows_flags_set_before_it_started_without_asking_again(
        redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    recovery.set_canceled(client, "b-early")
    listener = recovery.CancelListener(client)
    assert listener.canceled("b-early")      # before start: it asks Redis
    assert not listener.heard("b-early")      # the step check never does
    listener.start()
    assert listener.heard("b-early")          # read when it subscribed
    before = _calls(client).get("exists", 0)
    assert listener.canceled("x", "b-early") and not listener.canceled("b-other")
    assert _calls(client).get("exists", 0) == before   # no command for the check
    recovery.set_canceled(client, "b-late")
    deadline = time.monotonic() + 10
    while not listener.heard("b-late"):
        assert time.monotonic() < deadline, "the broadcast never arrived"
        time.sleep(0.01)


def test_an_inflight_record_claims_every_message_of_a_shared_call_and_brings_all_back(
        redis_url: str) -> None:
    """A worker rendering several jobs in one call (worker/batching.py) holds their messages:
    alive, none of them is an orphan however long it waits; dead, the sweep puts back all."""
    from farm.fleet import worker_key

    client = redis.Redis.from_url(redis_url)
    taken_at = time.time() - 3600
    # the lead's message in the record (as the worker's channel writes it), the companions
    # in kombu's `unacked` (as the taker's channel notes them)
    client.set(recovery.INFLIGHT + "w1", recovery.claim(
        "t-lead", "farm.q", "a", "full", entry=json.loads(_unacked_payload("a"))))
    for tag, job in (("t-b", "b"), ("t-c", "c")):
        client.hset(recovery.UNACKED, tag, _unacked_payload(job))
        client.zadd(recovery.UNACKED_INDEX, {tag: taken_at})
    recovery.add_held(client, "w1", [{"tag": "t-b", "queue": "farm.q", "job": "b"},
                                     {"tag": "t-c", "queue": "farm.q", "job": "c"}])
    client.set(worker_key("w1"), "{}")
    assert recovery.holds(client, "w1", "a") and recovery.holds(client, "w1", "c")
    assert recovery.sweep(client, 0.001, orphan_seconds=1) == []
    assert client.llen("farm.q") == 0 and client.hlen(recovery.UNACKED) == 2

    client.delete(worker_key("w1"), recovery.SWEEP_LOCK)   # its heartbeat expired
    back = recovery.sweep(client, 0.001, orphan_seconds=1)
    assert [b["worker"] for b in back] == ["w1"], back
    assert client.llen("farm.q") == 3 and client.hlen(recovery.UNACKED) == 0
    jobs = sorted(recovery.message_job(json.loads(raw)) or "" for raw in
                  client.lrange("farm.q", 0, -1))
    assert jobs == ["a", "b", "c"]
    assert client.get(recovery.INFLIGHT + "w1") is None


def test_the_note_that_ends_the_job_in_hand_is_its_ack_and_kombu_then_sends_nothing(
        redis_url: str, env: dict[str, str]) -> None:
    """A worker's Finisher (worker/finisher.py), holding the message its in-flight record
    holds: the tally note of the job's final record deletes the record in the same command;
    kombu's ack then sends nothing, and a put-back (reject with requeue) puts nothing back.
    A note of another job, of a state that is not final, from another thread, or after
    `release` acks nothing."""
    from farm import tally, transport
    from farm.lifecycle import JobRecord, JobState
    from farm.worker.finisher import Finisher

    jobs = [{"id": f"b-{i}", "stage": "full"} for i in range(4)]
    client, producer, conn = _queued(redis_url, env, jobs, in_flight="w-4")
    channel = conn.default_channel
    finisher = Finisher(None, client, None)
    tally.start(client, "b", 4)
    client.script_load(tally._NOTE)   # loaded already: the counts below are the notes' own
    record = recovery.INFLIGHT + "w-4"

    def state(job: str, value: JobState, seq: int) -> JobRecord:
        return JobRecord(job=job, batch="b", state=value, seq=seq)

    first = channel.basic_get("farm.q", no_ack=False)
    assert transport.holding("w-4") == first.delivery_tag
    finisher.hold("w-4", first.delivery_tag, "b-0")
    before = _calls(client)
    finisher.noted(state("b-0", JobState.RUNNING, 1))     # not final: the record stays
    finisher.noted(state("b-9", JobState.SUCCEEDED, 1))   # another job: the record stays
    noter = threading.Thread(target=finisher.noted, args=(state("b-0", JobState.FAILED, 5),))
    noter.start()
    noter.join()                                          # another thread: the record stays
    assert json.loads(client.get(record))["tag"] == first.delivery_tag
    finisher.noted(state("b-0", JobState.SUCCEEDED, 6))
    assert client.get(record) is None                    # deleted by the note
    noted = _calls(client)
    first.ack()
    acked = _calls(client)
    assert _moved(before, noted, "evalsha") == 4 and _moved(before, noted, "del") == 1
    assert acked == noted | {"info": acked["info"]}      # the ack sent nothing
    assert transport.holding("w-4") is None
    assert tally.counts(client, "b") == (4, {"queued": 2, "running": 0, "latents_ready": 0,
                                             "refining": 0, "succeeded": 2, "failed": 0,
                                             "canceled": 0})   # b-0 (its last note) and b-9

    # ended, then handed back (a retryable fault after the final write): nothing goes back
    second = channel.basic_get("farm.q", no_ack=False)
    finisher.hold("w-4", second.delivery_tag, "b-1")
    finisher.noted(state("b-1", JobState.CANCELED, 2))
    assert client.get(record) is None
    second.reject(requeue=True)
    assert client.llen("farm.q") == 2                     # b-2 and b-3 only

    # released (the throughput mode shares the record): the note leaves the ack to kombu
    third = channel.basic_get("farm.q", no_ack=False)
    finisher.hold("w-4", third.delivery_tag, "b-2")
    finisher.release()
    finisher.noted(state("b-2", JobState.SUCCEEDED, 2))
    assert json.loads(client.get(record))["tag"] == third.delivery_tag
    before = _calls(client)
    third.ack()
    assert _moved(before, _calls(client), "del") == 1 and client.get(record) is None

    # a tag the record does not hold is never held
    fourth = channel.basic_get("farm.q", no_ack=False)
    finisher.hold("w-4", "another-tag", "b-3")
    finisher.noted(state("b-3", JobState.SUCCEEDED, 2))
    assert json.loads(client.get(record))["tag"] == fourth.delivery_tag
    fourth.ack()
    assert client.get(record) is None and client.llen("farm.q") == 0

    # the connection is lost after a final note, before kombu's ack: the tag is never acked,
    # and the next delivery, on a new channel, forgets it
    producer.send_task("farm.test", args=[{"id": "b-4", "stage": "full"}], queue="farm.q")
    producer.send_task("farm.test", args=[{"id": "b-5", "stage": "full"}], queue="farm.q")
    fifth = channel.basic_get("farm.q", no_ack=False)
    finisher.hold("w-4", fifth.delivery_tag, "b-4")
    finisher.noted(state("b-4", JobState.SUCCEEDED, 2))
    assert fifth.delivery_tag in transport._settled
    sixth = conn.channel().basic_get("farm.q", no_ack=False)
    assert transport.holding("w-4") == sixth.delivery_tag
    assert fifth.delivery_tag not in transport._settled
    sixth.ack()
    conn.release()

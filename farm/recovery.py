"""Recovering the stage of a worker that died, from its missing heartbeat; and cancel flags.

Celery on Redis gives a dead worker's unacknowledged message back only after the visibility
timeout (an hour, so it stays above the longest stage). The farm does better: while a worker
runs a stage it records the message's delivery tag in `farm:inflight:<worker>` (and those of
the jobs it renders with it in one call, worker/batching.py). Every worker
sweeps now and then (one at a time, under a lock): an in-flight record whose worker's heartbeat
key has expired belongs to a dead worker, so each message it names moves from `unacked`
straight back onto its queue, where the next free worker takes it. That takes the heartbeat TTL
plus one sweep (about half a minute with the defaults) instead of an hour; Flamenco's
one-minute worker timeout is the same idea.

Two gaps remain between kombu taking a message and the worker recording it, and a `kill -9`
can land in either; both are closed here:

- after kombu's `unacked` write, before the in-flight record: the message sits in `unacked`
  with no record naming it. The sweep restores such orphans once they are older than the
  heartbeat TTL (`restore_orphans`).
- after BRPOP took the message, before kombu's `unacked` write (kombu#305): the message is
  nowhere in Redis. Submit notes every job of a batch in `farm:open:<batch>`; the tally note
  of a job's final record removes it (farm/tally.py, in the same command). Reconciling (`missing_jobs`) finds a job that is open while its
  batch's queues are empty and no unacknowledged message carries it; missing for a heartbeat
  TTL, the worker runs it again from the batch's manifest. A second delivery is harmless:
  workers skip a job that has ended, and discard a superseded attempt.

A message put back gets a fresh delivery tag: kombu keys `unacked` by tag, and a late ack from
a worker wrongly presumed dead must not remove the entry of the worker now holding it.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from farm.fleet import worker_key

log = logging.getLogger("farm.recovery")

INFLIGHT = "farm:inflight:"
SWEEP_LOCK = "farm:sweep-lock"
CANCEL = "farm:cancel:"
ACTIVE_BATCHES = "farm:active-batches"   # batches with jobs that have not ended
OPEN = "farm:open:"                     # + batch: ids of its jobs that have not ended
MISSING = "farm:missing:"               # + batch: job -> when reconciling first found it nowhere
RECONCILE_LOCK = "farm:reconcile-lock"
OPEN_SECONDS = 30 * 24 * 3600
# kombu's Redis transport keeps unacknowledged messages here (its defaults; we never change them)
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def set_inflight(client: Any, worker: str, tag: str, queue: str, job: str | None,
                 stage: str | None, held: list[dict[str, Any]] | None = None) -> None:
    """Record the message a worker runs, and (`held`: {"tag", "queue", "job"} each) the messages
    of the jobs it renders with it in one pipeline call (worker/batching.py). The record outlives
    the stage (its messages are acked just after the stage ends) until the worker's next stage
    replaces it or the worker stops: a record naming an acked message is harmless, and so no
    sweep can take a message for an orphan between the stage's end and its ack."""
    client.set(INFLIGHT + worker, claim(tag, queue, job, stage, held))


def claim(tag: str, queue: str, job: str | None, stage: str | None,
          held: list[dict[str, Any]] | None = None) -> str:
    """An in-flight record (`farm:inflight:<worker>`'s value)."""
    return json.dumps({"tag": tag, "queue": queue, "job": job, "stage": stage,
                       "since": time.time(), "held": held or []})


def messages(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(tag, queue) of every message an in-flight record names: the one it runs first."""
    out = [(info["tag"], info["queue"])]
    for other in info.get("held") or []:
        try:
            out.append((other["tag"], other["queue"]))
        except (KeyError, TypeError):
            continue
    return out


def holds(client: Any, worker: str, job: str) -> bool:
    """`worker` is alive and running `job` (its in-flight record names it)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.exists(worker_key(worker))
        pipe.get(INFLIGHT + worker)
        alive, raw = pipe.execute()
    if not alive or raw is None:
        return False
    try:
        info = json.loads(raw)
        return bool(info.get("job") == job
                    or any(h.get("job") == job for h in info.get("held") or []))
    except (ValueError, AttributeError):
        return False


def clear_inflight(client: Any, worker: str) -> None:
    client.delete(INFLIGHT + worker)


def restore(client: Any, tag: str, queue: str) -> bool:
    """Move one unacknowledged message back onto its queue (the end BRPOP takes first).
    False when it is no longer unacknowledged (acked meanwhile, or restored by kombu)."""
    import redis

    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(UNACKED)
                raw = pipe.hget(UNACKED, tag)
                if raw is None:
                    pipe.unwatch()
                    return False
                payload = json.loads(raw)[0]
                try:
                    payload["headers"]["redelivered"] = True
                    payload["properties"]["delivery_info"]["redelivered"] = True
                    # a fresh tag: a late ack of the old one must not touch the new holder's
                    payload["properties"]["delivery_tag"] = str(uuid.uuid4())
                except (KeyError, TypeError):
                    pass
                pipe.multi()
                pipe.zrem(UNACKED_INDEX, tag)
                pipe.hdel(UNACKED, tag)
                pipe.rpush(queue, json.dumps(payload))
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def recover_own(client: Any, worker: str) -> dict[str, Any] | None:
    """At start-up: a stage this worker name held when it last died goes back on its queue."""
    raw = client.get(INFLIGHT + worker)
    if raw is None:
        return None
    info = json.loads(raw)
    restored = [restore(client, tag, queue) for tag, queue in messages(info)]
    clear_inflight(client, worker)
    return info if any(restored) else None


def sweep(client: Any, lock_seconds: float, orphan_seconds: float | None = None
          ) -> list[dict[str, Any]]:
    """Put back the stages of workers whose heartbeat has expired, and (with `orphan_seconds`)
    unacknowledged messages that old which no in-flight record claims. One sweeper at a time."""
    if not client.set(SWEEP_LOCK, "1", nx=True, px=max(1, int(lock_seconds * 1000))):
        return []
    recovered = []
    claimed: set[str] = set()
    for key in client.scan_iter(match=INFLIGHT + "*", count=500):
        name = key.decode() if isinstance(key, bytes) else key
        worker = name[len(INFLIGHT):]
        raw = client.get(name)
        if raw is None:
            continue
        info = json.loads(raw)
        if client.exists(worker_key(worker)):
            claimed.update(tag for tag, _ in messages(info))
            continue
        back = sum(restore(client, tag, queue) for tag, queue in messages(info))
        if back:
            info["worker"] = worker
            recovered.append(info)
            log.warning("worker %s stopped beating while running %s (%s); %d message(s) "
                        "queued again", worker, info.get("job"), info.get("stage"), back)
        client.delete(name)
    if orphan_seconds is not None:
        recovered += restore_orphans(client, orphan_seconds, claimed)
    return recovered


def restore_orphans(client: Any, older_than: float, claimed: set[str]) -> list[dict[str, Any]]:
    """Unacknowledged messages older than `older_than` seconds that no live worker's in-flight
    record claims: their worker died between kombu's `unacked` write and its own record. A
    worker writes that record within milliseconds of taking a message, so an old unclaimed
    entry has no one behind it."""
    restored = []
    old = client.zrangebyscore(UNACKED_INDEX, "-inf", time.time() - older_than)
    for raw_tag in old:
        tag = raw_tag.decode() if isinstance(raw_tag, bytes) else raw_tag
        if tag in claimed:
            continue
        raw = client.hget(UNACKED, tag)
        if raw is None:
            continue
        try:
            entry = json.loads(raw)
            queue = entry[2]   # kombu keeps [payload, exchange, routing key]
            job = message_job(entry[0])
        except (ValueError, IndexError, TypeError):
            continue
        if restore(client, tag, queue):
            log.warning("an unacknowledged message (job %s) had no worker behind it for %.0f s: "
                        "queued again", job, older_than)
            restored.append({"tag": tag, "queue": queue, "job": job, "stage": None,
                             "worker": None})
    return restored


def message_job(payload: dict[str, Any]) -> str | None:
    """The job id a kombu payload carries (Celery protocol 2: body = [args, kwargs, embed])."""
    try:
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return body_job(body)[0]


def body_job(body: bytes | str) -> tuple[str | None, str | None]:
    """(job id, stage) a render message's decoded body names; None for what it lacks."""
    try:
        message = json.loads(body)[0][0]
        job, stage = message.get("id"), message.get("stage")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None, None
    return (job if isinstance(job, str) else None), (stage if isinstance(stage, str) else None)


# -- reconciling: jobs whose message vanished (killed between BRPOP and the unacked write) ----

def open_jobs(client: Any, batch: str, jobs: Iterable[str]) -> None:
    """Note a batch's jobs as open, before their messages are sent (a job that ends at once
    must find itself there to remove). Reconciling looks at the batch only once `activate`d."""
    ids = list(jobs)
    if not ids:
        return
    with client.pipeline(transaction=False) as pipe:
        for i in range(0, len(ids), 1000):
            pipe.sadd(OPEN + batch, *ids[i:i + 1000])
        pipe.expire(OPEN + batch, OPEN_SECONDS)
        pipe.execute()


def activate(client: Any, batch: str) -> None:
    """Every message of the batch was sent: from now on a job found nowhere is missing."""
    client.sadd(ACTIVE_BATCHES, batch)


def job_ended(client: Any, batch: str, job: str) -> None:
    client.srem(OPEN + batch, job)


def ended(client: Any, batch: str) -> bool:
    """Every job of the (active) batch has ended: none is open."""
    return not client.scard(OPEN + batch)


def active_batches(client: Any) -> list[str]:
    return sorted(b.decode() if isinstance(b, bytes) else b
                  for b in client.smembers(ACTIVE_BATCHES))


def missing_jobs(client: Any, batch: str, queue_names: Iterable[str], grace: float
                 ) -> list[str]:
    """Open jobs of `batch` whose message has been nowhere for `grace` seconds: not waiting
    (only asked once the batch's queues are empty), not unacknowledged. A batch with no open job
    is done: it leaves the active set."""
    if not client.scard(OPEN + batch):
        with client.pipeline() as pipe:
            pipe.srem(ACTIVE_BATCHES, batch)
            pipe.delete(OPEN + batch, MISSING + batch)
            pipe.execute()
        return []
    with client.pipeline(transaction=False) as pipe:
        for q in queue_names:
            pipe.llen(q)
        if any(pipe.execute()):
            return []   # messages are waiting: any open job may be among them
    open_ids = {j.decode() if isinstance(j, bytes) else j for j in client.smembers(OPEN + batch)}
    held = set()
    for raw in client.hvals(UNACKED):
        try:
            held.add(message_job(json.loads(raw)[0]))
        except (ValueError, IndexError, TypeError):
            continue
    now = time.time()
    nowhere = open_ids - held
    seen = {(k.decode() if isinstance(k, bytes) else k): float(v)
            for k, v in client.hgetall(MISSING + batch).items()}
    found_again = [job for job in open_ids & held if job in seen]
    new = {job: now for job in nowhere if job not in seen}
    with client.pipeline(transaction=False) as pipe:
        if found_again:
            pipe.hdel(MISSING + batch, *found_again)
        if new:
            pipe.hset(MISSING + batch, mapping=new)
            pipe.expire(MISSING + batch, OPEN_SECONDS)
        pipe.execute()
    return sorted(job for job in nowhere if job in seen and now - seen[job] >= grace)


def forget_missing(client: Any, batch: str, job: str) -> None:
    client.hdel(MISSING + batch, job)


# -- cancel: a flag (read when a worker subscribes) and a broadcast that stops a running stage --

CANCEL_CHANNEL = "farm:cancel"


def set_canceled(client: Any, ident: str, ttl_seconds: int = 7 * 24 * 3600) -> None:
    """Flag a batch or job as canceled and tell every worker at once (pub/sub): a running
    stage stops after its current step without any Redis command per step."""
    client.set(CANCEL + ident, "1", ex=ttl_seconds)
    client.publish(CANCEL_CHANNEL, ident)


def is_canceled(client: Any, *idents: str) -> bool:
    return bool(client.exists(*(CANCEL + i for i in idents)))


class CancelListener:
    """The ids canceled, as this worker knows them without asking Redis: every flag set when it
    subscribed (read once, after subscribing, so none falls between), then the broadcast (a
    background thread). On reconnecting it subscribes and reads the flags again, so a broadcast
    missed while disconnected is caught then. Before `start`, and while it reconnects,
    `canceled` asks Redis."""

    def __init__(self, client: Any) -> None:
        self.ids: set[str] = set()
        self._client = client
        self._thread: Any = None
        self._listening = False

    def start(self) -> None:
        """Subscribe and read the flags now (the first job may start right after), then listen
        in a background thread."""
        import threading

        pubsub = self._subscribe()
        self._listening = True
        self._thread = threading.Thread(target=self._listen, args=(pubsub,), name="cancel",
                                        daemon=True)
        self._thread.start()

    def _subscribe(self) -> Any:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(CANCEL_CHANNEL)
        for key in self._client.scan_iter(match=CANCEL + "*", count=1000):
            name = key.decode() if isinstance(key, bytes) else key
            self.ids.add(name[len(CANCEL):])
        return pubsub

    def _listen(self, pubsub: Any) -> None:
        while True:
            try:
                if pubsub is None:
                    pubsub = self._subscribe()
                    self._listening = True
                for message in pubsub.listen():
                    data = message.get("data")
                    if isinstance(data, bytes):
                        self.ids.add(data.decode())
            except Exception as exc:  # noqa: BLE001 - reconnect, and read the flags again
                log.warning("cancel listener reconnecting: %s", exc)
                self._listening = False   # meanwhile each stage asks Redis
                pubsub = None
                time.sleep(1.0)

    def canceled(self, *idents: str) -> bool:
        """Before a stage: whether any of `idents` is canceled."""
        if not self._listening:
            return is_canceled(self._client, *idents)
        return self.heard(*idents)

    def heard(self, *idents: str) -> bool:
        """After each step: what the broadcast said, never a Redis command."""
        return any(i in self.ids for i in idents)

"""Recovering the stage of a worker that died, from its missing heartbeat; and cancel flags.

Celery on Redis gives a dead worker's unacknowledged message back only after the visibility
timeout (an hour, so it stays above the longest stage). The farm does better. A worker keeps
the message it runs in its in-flight record, `farm:inflight:<worker>` (tag, queue, job, stage
and the message itself, written by its kombu channel as it takes the message, farm/transport.py,
and deleted by the ack): one key that says both what the worker holds and how to give it back,
in place of kombu's `unacked` hash and index. Every worker sweeps now and then (one at a time,
under a lock): an in-flight record whose worker's heartbeat key has expired belongs to a dead
worker, so its message goes straight back onto its queue, where the next free worker takes
it. That takes the heartbeat TTL plus one sweep (about half a minute with the defaults)
instead of an hour; Flamenco's one-minute worker timeout is the same idea. A put-back and a
late ack of a worker wrongly presumed dead never both happen: the put-back moves the message
and deletes the record in one transaction that the record's change aborts (WATCH).

Messages kombu notes its own way stay in `unacked`: the companions the throughput mode takes
(worker/batching.py), which the record names under `held`, and the deliveries of any channel
without a worker name. For them two gaps remain, and a `kill -9` can land in either; both are
closed here:

- after kombu's `unacked` write, before the in-flight record names it: the sweep restores such
  orphans once they are older than the heartbeat TTL (`restore_orphans`).
- after BRPOP took a message, before anything noted it (kombu#305; for a worker's own
  deliveries this is the one gap): the message is nowhere in Redis. Submit notes every job of a
  batch in `farm:open:<batch>`. Reconciling (`missing_jobs`) takes out of it the jobs the
  batch's tally counts final (farm/tally.py), and finds a job that is still open while its
  batch's queues are empty and no in-flight record or unacknowledged message carries it;
  missing for a heartbeat TTL, the worker runs it again from the batch's manifest. A second
  delivery is harmless: workers skip a job that has ended, and discard a superseded attempt.

A message put back gets a fresh delivery tag: a late ack from a worker wrongly presumed dead
must not remove the note of the worker now holding it.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from farm import tally
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


def claim(tag: str, queue: str, job: str | None, stage: str | None,
          held: list[dict[str, Any]] | None = None, entry: list[Any] | None = None) -> str:
    """An in-flight record (`farm:inflight:<worker>`'s value, written by farm/transport.py as a
    delivery's note): the message `tag` it runs, on `queue`; `entry`, the message as kombu
    keeps it ([payload, exchange, routing key]), when the record holds it (otherwise it is in
    kombu's `unacked`); `held` ({"tag", "queue", "job"} each), the messages in `unacked` of the
    jobs it renders with it in one pipeline call."""
    record = {"tag": tag, "queue": queue, "job": job, "stage": stage, "since": time.time(),
              "held": held or []}
    if entry is not None:
        record["entry"] = entry
    return json.dumps(record)


def add_held(client: Any, worker: str, held: list[dict[str, Any]]) -> None:
    """Name in `worker`'s in-flight record the messages it took to render with the one the
    record holds (worker/batching.py), before anything renders. Only the worker writes its own
    record while it lives."""
    raw = client.get(INFLIGHT + worker)
    if raw is None:
        raise RuntimeError(f"worker {worker} has no in-flight record to add companions to")
    record = json.loads(raw)
    record["held"] = held
    client.set(INFLIGHT + worker, json.dumps(record))


def inflight_records(client: Any) -> dict[str, dict[str, Any]]:
    """Every worker's in-flight record, by worker name."""
    names = [k.decode() if isinstance(k, bytes) else k
             for k in client.scan_iter(match=INFLIGHT + "*", count=1000)]
    records = {}
    for i in range(0, len(names), 500):
        chunk = names[i:i + 500]
        for name, raw in zip(chunk, client.mget(chunk), strict=True):
            if raw is None:
                continue
            try:
                records[name[len(INFLIGHT):]] = json.loads(raw)
            except ValueError:
                continue
    return records


def record_jobs(info: dict[str, Any]) -> set[str]:
    """The jobs an in-flight record's messages carry."""
    jobs = {info.get("job")}
    jobs.update(h.get("job") for h in info.get("held") or [] if isinstance(h, dict))
    return {j for j in jobs if isinstance(j, str)}


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


def _redelivery(payload: dict[str, Any]) -> str:
    """A message payload to queue again: marked redelivered, under a fresh tag (a late ack of
    the old one must not touch the new holder's note)."""
    try:
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
        payload["properties"]["delivery_tag"] = str(uuid.uuid4())
    except (KeyError, TypeError):
        pass
    return json.dumps(payload)


def restore(client: Any, tag: str, queue: str) -> bool:
    """Move one unacknowledged message (kombu's `unacked`) back onto its queue (the end BRPOP
    takes first). False when `unacked` does not hold it (it was acked, or kombu restored it)."""
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
                pipe.multi()
                pipe.zrem(UNACKED_INDEX, tag)
                pipe.hdel(UNACKED, tag)
                pipe.rpush(queue, _redelivery(payload))
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def restore_record(client: Any, worker: str, tag: str | None = None,
                   leftmost: bool = False) -> tuple[dict[str, Any] | None, int]:
    """Give back every message `worker`'s in-flight record names and delete the record: the
    one it holds moves onto its queue (the end BRPOP takes first; `leftmost`: the other end)
    in the same transaction as the delete, so an ack (which deletes the record) and this never
    both happen; the companions it names go back from `unacked`. `tag`: only while the record
    still holds that message. Returns (the record, or None when there was none to act on; how
    many messages went back)."""
    import redis

    key = INFLIGHT + worker
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                info = json.loads(raw) if raw is not None else None
                if info is None or (tag is not None and info.get("tag") != tag):
                    pipe.unwatch()
                    return None, 0
                entry = info.get("entry")
                pipe.multi()
                pipe.delete(key)
                if entry:
                    (pipe.lpush if leftmost else pipe.rpush)(info["queue"],
                                                             _redelivery(entry[0]))
                pipe.execute()
                break
            except redis.WatchError:
                continue
    back = 1 if entry else int(restore(client, info["tag"], info["queue"]))
    for other_tag, queue in messages(info)[1:]:
        back += restore(client, other_tag, queue)
    return info, back


def recover_own(client: Any, worker: str) -> dict[str, Any] | None:
    """At start-up: a stage this worker name held when it last died goes back on its queue."""
    info, back = restore_record(client, worker)
    return info if back else None


def sweep(client: Any, lock_seconds: float, orphan_seconds: float | None = None
          ) -> list[dict[str, Any]]:
    """Put back the stages of workers whose heartbeat has expired, and (with `orphan_seconds`)
    unacknowledged messages that old which no in-flight record claims. One sweeper at a time."""
    if not client.set(SWEEP_LOCK, "1", nx=True, px=max(1, int(lock_seconds * 1000))):
        return []
    recovered = []
    claimed: set[str] = set()
    records = inflight_records(client)
    with client.pipeline(transaction=False) as pipe:
        for worker in records:
            pipe.exists(worker_key(worker))
        alive = pipe.execute()
    for (worker, info), beating in zip(records.items(), alive, strict=True):
        if beating:
            claimed.update(tag for tag, _ in messages(info))
            continue
        gone, back = restore_record(client, worker)
        if gone is not None and back:
            gone["worker"] = worker
            gone.pop("entry", None)
            recovered.append(gone)
            log.warning("worker %s stopped beating while running %s (%s); %d message(s) "
                        "queued again", worker, gone.get("job"), gone.get("stage"), back)
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


# -- reconciling: jobs whose message vanished (killed between BRPOP and its first note) -------

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
    """Every job of the (active) batch has ended: its tally counts them all final, or (a batch
    without a tally) none is left in its open set."""
    counted = tally.counts(client, batch)
    if counted is not None:
        total, by_state = counted
        return tally.final_count(by_state) >= total
    return not client.scard(OPEN + batch)


def active_batches(client: Any) -> list[str]:
    return sorted(b.decode() if isinstance(b, bytes) else b
                  for b in client.smembers(ACTIVE_BATCHES))


def missing_jobs(client: Any, batch: str, queue_names: Iterable[str], grace: float, *,
                 done: bool | None = None) -> list[str]:
    """Open jobs of `batch` whose message has been nowhere for `grace` seconds: not waiting
    (only asked once the batch's queues are empty), in no in-flight record, not in `unacked`.
    A batch whose jobs have all ended is done: it leaves the active set. `done`: `ended`'s
    answer when the caller just asked it (None: ask)."""
    if ended(client, batch) if done is None else done:
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
    closed = sorted(tally.final_jobs(client, batch, open_ids))
    for i in range(0, len(closed), 1000):
        client.srem(OPEN + batch, *closed[i:i + 1000])
    open_ids -= set(closed)
    held: set[str | None] = set().union(*map(record_jobs, inflight_records(client).values()))
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

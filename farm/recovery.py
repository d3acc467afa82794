"""Recovering the stage of a worker that died, from its missing heartbeat; and cancel flags.

Celery on Redis gives a dead worker's unacknowledged message back only after the visibility
timeout (an hour, so it stays above the longest stage). The farm does better: while a worker
runs a stage it records the message's delivery tag in `farm:inflight:<worker>`. Every worker
sweeps now and then (one at a time, under a lock): an in-flight record whose worker's heartbeat
key has expired belongs to a dead worker, so its message is moved from kombu's `unacked` hash
straight back onto its queue, where the next free worker takes it. That takes the heartbeat TTL
plus one sweep (about half a minute with the defaults) instead of an hour; Flamenco's
one-minute worker timeout is the same idea.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from farm.fleet import worker_key

log = logging.getLogger("farm.recovery")

INFLIGHT = "farm:inflight:"
SWEEP_LOCK = "farm:sweep-lock"
CANCEL = "farm:cancel:"
# kombu's Redis transport keeps unacknowledged messages here (its defaults; we never change them)
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def set_inflight(client: Any, worker: str, tag: str, queue: str, job: str | None,
                 stage: str | None) -> None:
    client.set(INFLIGHT + worker, json.dumps({"tag": tag, "queue": queue, "job": job,
                                              "stage": stage, "since": time.time()}))


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
    restored = restore(client, info["tag"], info["queue"])
    clear_inflight(client, worker)
    return info if restored else None


def sweep(client: Any, lock_seconds: float) -> list[dict[str, Any]]:
    """Put back the stages of workers whose heartbeat has expired. One sweeper at a time."""
    if not client.set(SWEEP_LOCK, "1", nx=True, px=max(1, int(lock_seconds * 1000))):
        return []
    recovered = []
    for key in client.scan_iter(match=INFLIGHT + "*", count=500):
        name = key.decode() if isinstance(key, bytes) else key
        worker = name[len(INFLIGHT):]
        if client.exists(worker_key(worker)):
            continue
        raw = client.get(name)
        if raw is None:
            continue
        info = json.loads(raw)
        if restore(client, info["tag"], info["queue"]):
            info["worker"] = worker
            recovered.append(info)
            log.warning("worker %s stopped beating while running %s (%s); its stage is "
                        "queued again", worker, info.get("job"), info.get("stage"))
        client.delete(name)
    return recovered


# -- cancel: a flag to check before a stage, a broadcast to stop a running one ----------------

CANCEL_CHANNEL = "farm:cancel"


def set_canceled(client: Any, ident: str, ttl_seconds: int = 7 * 24 * 3600) -> None:
    """Flag a batch or job as canceled and tell every worker at once (pub/sub): a running
    stage stops after its current step without any Redis command per step."""
    client.set(CANCEL + ident, "1", ex=ttl_seconds)
    client.publish(CANCEL_CHANNEL, ident)


def is_canceled(client: Any, *idents: str) -> bool:
    return bool(client.exists(*(CANCEL + i for i in idents)))


class CancelListener:
    """The ids canceled since this worker started, from the broadcast (a background thread).
    A broadcast missed while disconnected is caught by the flag check before each stage."""

    def __init__(self, client: Any) -> None:
        self.ids: set[str] = set()
        self._client = client
        self._thread: Any = None

    def start(self) -> None:
        import threading

        self._thread = threading.Thread(target=self._listen, name="cancel", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while True:
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                for message in pubsub.listen():
                    data = message.get("data")
                    if isinstance(data, bytes):
                        self.ids.add(data.decode())
            except Exception as exc:  # noqa: BLE001 - reconnect; the flag check covers the gap
                log.warning("cancel listener reconnecting: %s", exc)
                time.sleep(1.0)

    def canceled(self, *idents: str) -> bool:
        return any(i in self.ids for i in idents)

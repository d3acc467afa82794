"""`farm cancel BATCH|JOB`: queued stages never start, running ones stop within one step.

A flag in Redis and a broadcast do the stopping: every worker reads the flags when it
subscribes and hears each new one, and checks what it knows before a stage and after every
denoising step. Jobs that are not running are marked canceled in the store at once, so `farm
status` shows it before any worker sees the message (which it then skips: the record is final).
Each job marked here is counted in the batch's tally (farm/tally.py); when that makes the
batch's last job final, its summary is written and its webhook told here (farm/summary.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from farm import broker, lifecycle, recovery, summary, tally
from farm.errors import FarmError, NotFound
from farm.records import read_manifest
from farm.settings import Settings
from farm.store import Store

log = logging.getLogger("farm.cancel")


@dataclass(frozen=True)
class Canceled:
    batch: str
    marked: list[str]      # not running: canceled now
    stopping: list[str]    # running: their worker stops within one step
    done: list[str]        # already finished: left as they are


def cancel(settings: Settings, store: Store, target: str) -> Canceled:
    batch, job = _split(store, settings, target)
    manifest = read_manifest(store, batch, settings)
    ids = [j.id for j in manifest.jobs if job is None or j.id == job]
    if not ids:
        raise NotFound(f"no job {target!r} in batch {batch}")
    broker.ensure_broker(settings)
    broker.wait_for_broker(settings)
    client = broker.redis_client(settings)
    recovery.set_canceled(client, target)
    counter = _Counter(client)
    marked, stopping, done = [], [], []
    for ident in ids:
        while True:  # compare-and-set: a worker may move the job on between read and write
            held = lifecycle.read(store, batch, ident)
            record = held.record
            if record.state.final:
                done.append(ident)
            elif record.state.active:
                stopping.append(ident)
            else:
                try:
                    lifecycle.commit(store, held, lifecycle.cancel(record, "canceled by the user"),
                                     then=counter.note)
                except lifecycle.Superseded:
                    continue
                marked.append(ident)
            break
    if counter.ended:
        try:
            summary.conclude(store, client, manifest, settings.webhook_secret)
        except FarmError as exc:   # reconciling workers write it (farm/summary.py)
            log.warning("batch %s ended, but its summary could not be written here: %s",
                        batch, exc)
    return Canceled(batch=batch, marked=marked, stopping=stopping, done=done)


class _Counter:
    """Counts the jobs cancel marks in the batch's tally. A broker that refuses (an ACL
    without scripts) only delays the counts: each canceled job's message is still delivered,
    and the worker that finds its record final counts it (worker/stage.py)."""

    def __init__(self, client: Any) -> None:
        self.tally: tally.Tally | None = tally.Tally(client)
        self.ended = False

    def note(self, record: lifecycle.JobRecord) -> None:
        import redis

        if self.tally is None:
            return
        try:
            got = self.tally.note(record)
        except redis.RedisError as exc:
            log.warning("the broker refused the batch's counters (%s); workers count the "
                        "canceled jobs as they skip them", exc)
            self.tally = None
            return
        self.ended = self.ended or (got is not None and got.changed and got.ended)


def _split(store: Store, settings: Settings, target: str) -> tuple[str, str | None]:
    """A batch id, or a job id (its batch id plus -NNNN)."""
    from farm.keys import manifest_key

    if store.exists(manifest_key(target)):
        return target, None
    batch = target.rsplit("-", 1)[0]
    if batch != target and store.exists(manifest_key(batch)):
        return batch, target
    raise NotFound(f"no batch or job {target!r} in {store.url}")

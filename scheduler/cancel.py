"""`farm cancel BATCH|JOB`: queued stages never start, running ones stop within one step.

A flag in Redis (checked by workers before a stage and after every denoising step) does the
stopping; jobs that are not running are marked canceled in the store at once, so `farm status`
shows it before any worker sees the message (which it then skips: the record is final).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from farm import broker, recovery
from farm.errors import NotFound
from farm.jobs import JobState
from farm.records import JobRecord, read_manifest, read_record, write_record
from farm.settings import Settings
from farm.store import Store


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
    recovery.set_canceled(broker.redis_client(settings), target)
    marked, stopping, done = [], [], []
    for ident in ids:
        record = read_record(store, batch, ident) or JobRecord(job=ident, batch=batch)
        if record.state.final:
            done.append(ident)
        elif record.state in (JobState.RUNNING, JobState.REFINING):
            stopping.append(ident)
        else:
            write_record(store, record.to(JobState.CANCELED, error="canceled by the user",
                                          finished_at=time.time()))
            marked.append(ident)
    return Canceled(batch=batch, marked=marked, stopping=stopping, done=done)


def _split(store: Store, settings: Settings, target: str) -> tuple[str, str | None]:
    """A batch id, or a job id (its batch id plus -NNNN)."""
    from farm.records import manifest_key

    if store.exists(manifest_key(target)):
        return target, None
    batch = target.rsplit("-", 1)[0]
    if batch != target and store.exists(manifest_key(batch)):
        return batch, target
    raise NotFound(f"no batch or job {target!r} in {store.url}")

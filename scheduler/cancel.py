"""`farm cancel BATCH|JOB`: queued stages never start, running ones stop within one step.

A flag in Redis (checked by workers before a stage and after every denoising step) does the
stopping; jobs that are not running are marked canceled in the store at once, so `farm status`
shows it before any worker sees the message (which it then skips: the record is final).
"""

from __future__ import annotations

from dataclasses import dataclass

from farm import broker, lifecycle, recovery
from farm.errors import NotFound
from farm.records import read_manifest
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
        while True:  # compare-and-set: a worker may move the job on between read and write
            held = lifecycle.read(store, batch, ident)
            record = held.record
            if record.state.final:
                done.append(ident)
            elif record.state.active:
                stopping.append(ident)
            else:
                try:
                    lifecycle.commit(store, held, lifecycle.cancel(record, "canceled by the user"))
                except lifecycle.Superseded:
                    continue
                marked.append(ident)
            break
    return Canceled(batch=batch, marked=marked, stopping=stopping, done=done)


def _split(store: Store, settings: Settings, target: str) -> tuple[str, str | None]:
    """A batch id, or a job id (its batch id plus -NNNN)."""
    from farm.keys import manifest_key

    if store.exists(manifest_key(target)):
        return target, None
    batch = target.rsplit("-", 1)[0]
    if batch != target and store.exists(manifest_key(batch)):
        return batch, target
    raise NotFound(f"no batch or job {target!r} in {store.url}")

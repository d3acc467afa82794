"""Removing intermediates (base → refiner latents) the farm no longer needs.

A refiner deletes its job's latents as soon as the job succeeds. After a failure (or a cancel)
they are kept for `intermediate_ttl_hours`, so the refiner stage can be looked at or retried by
hand, then `farm clean` removes them. Latents of jobs still on their way are never touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from farm import keys
from farm.lifecycle import read_record
from farm.settings import Settings
from farm.store import Store


@dataclass(frozen=True)
class Cleaned:
    deleted: list[str]
    kept: int


def clean_intermediates(store: Store, settings: Settings, older_than_hours: float | None = None,
                        dry_run: bool = False, now: float | None = None) -> Cleaned:
    ttl = settings.intermediate_ttl_hours if older_than_hours is None else older_than_hours
    cutoff = (now or time.time()) - ttl * 3600
    deleted, kept = [], 0
    for batch in store.list_dirs(keys.BATCHES):
        for key in store.list_keys(keys.intermediates_prefix(batch)):
            where = keys.intermediate_job(key)
            if where is None:
                continue
            record = read_record(store, *where)
            if (record is not None and record.state.final
                    and (record.finished_at or 0) <= cutoff):
                if not dry_run:
                    store.delete(key)
                deleted.append(key)
            else:
                kept += 1
    return Cleaned(deleted=deleted, kept=kept)

"""A batch's state.

`batch_counts` is what `farm status` and `--watch` show, at a constant cost whatever the
batch's size: its submit record, and its state counters in Redis (farm/tally.py) while it runs
or its summary in the store once it ended (farm/summary.py). A batch with neither (the broker
lost its data) is counted from its job records, and says so (`source`).

`batch_status` is every job's detail (`--jobs`, `--json`, results): the manifest and every job
record, read in parallel."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from typing import Any

from farm import tally
from farm.errors import FarmError, NotFound
from farm.fleet import WorkerInfo
from farm.keys import BATCHES
from farm.lifecycle import JobRecord, JobState, Stage
from farm.records import (
    READ_THREADS,
    Manifest,
    Submit,
    SubmitState,
    read_all,
    read_manifest,
    read_submit,
)
from farm.settings import Settings
from farm.store import Store
from farm.summary import batch_state, read_summary
from farm.tally import final_count


@dataclass(frozen=True)
class JobView:
    id: str
    state: JobState
    images: list[str]
    error: str | None
    record: JobRecord | None
    waiting: str | None = None   # why a waiting job is not moving, when we can tell

    @property
    def fault(self) -> str | None:
        """Whose fault a failed job was: "job" or "worker" (its workers kept failing)."""
        if self.state != JobState.FAILED or self.record is None:
            return None
        return self.record.error_kind

    @property
    def failed_attempts(self) -> list[dict[str, Any]]:
        return list(self.record.failures) if self.record is not None else []

    @property
    def note(self) -> str | None:
        """What last happened to an unfinished job that status should say (a hand-back)."""
        if self.record is None or self.state.final:
            return None
        return self.record.note


class _BatchEnd:
    """What BatchStatus and BatchCounts both say of a batch from its state and submit record."""

    submit: Any

    @property
    def state(self) -> str:
        raise NotImplementedError

    @property
    def half_submitted(self) -> bool:
        """Its submit stopped part-way (killed): some jobs may never have been queued."""
        return self.submit is not None and self.submit.state is SubmitState.SUBMITTING

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "canceled", "aborted")


@dataclass(frozen=True)
class BatchStatus(_BatchEnd):
    batch: str
    created_at: float
    manifest: Manifest
    jobs: list[JobView]
    submit: Submit | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobState}
        for job in self.jobs:
            counts[job.state.value] += 1
        return {k: v for k, v in counts.items() if v}

    @property
    def done(self) -> int:
        return sum(1 for j in self.jobs if j.state.final)

    @property
    def state(self) -> str:
        """queued / running while any job is unfinished; then succeeded, failed or canceled."""
        return batch_state(len(self.jobs), self.counts,
                           self.submit.state if self.submit is not None else None)

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "state": self.state,
            "counts": self.counts,
            "submit": self.submit.state.value if self.submit is not None else None,
            "jobs": [{"id": j.id, "state": j.state.value, "images": j.images,
                      "error": j.error, **({"fault": j.fault} if j.fault else {}),
                      **({"failed_attempts": j.failed_attempts} if j.failed_attempts else {}),
                      **({"waiting": j.waiting} if j.waiting else {}),
                      **({"note": j.note} if j.note else {})}
                     for j in self.jobs],
        }

    def with_fleet(self, workers: list[WorkerInfo]) -> BatchStatus:
        """Mark each waiting job that no live worker can take: a queued job's model at its
        class or above, a latents_ready job's refiner at its class or above. Such a job was
        accepted (a worker may join later); status says why it waits."""
        jobs = {j.id: j for j in self.manifest.jobs}
        views = []
        for view in self.jobs:
            job = jobs[view.id]
            if view.state == JobState.QUEUED and not any(
                    job.spec.model in w.models and w.vram_class >= job.vram_class
                    for w in workers):
                view = replace(view, waiting=f"waiting: no live worker serves {job.spec.model} "
                                             f"at >={job.vram_class} GB")
            elif view.state == JobState.LATENTS_READY and job.spec.refiner:
                refiner = replace(job, stage=Stage.REFINER).replanned(
                    view.record.replanned if view.record is not None else {})
                if not any(job.spec.refiner in w.models and w.vram_class >= refiner.stage_class
                           for w in workers):
                    view = replace(view, waiting=f"waiting: no live worker serves the refiner "
                                                 f"{job.spec.refiner} at "
                                                 f">={refiner.stage_class} GB")
            views.append(view)
        return replace(self, jobs=views)


def batch_status(store: Store, batch: str, settings: Settings) -> BatchStatus:
    """Every job's state: the manifest and the records, read in parallel."""
    manifest = read_manifest(store, batch, settings)
    records = read_all(store, batch, [j.id for j in manifest.jobs])
    views = []
    for job in manifest.jobs:
        record = records.get(job.id)
        if record is None:
            views.append(JobView(job.id, JobState.QUEUED, [], None, None))
        else:
            views.append(JobView(job.id, record.state, list(record.images), record.error,
                                 record))
    found = read_submit(store, batch)
    return BatchStatus(batch=batch, created_at=manifest.created_at, manifest=manifest,
                       jobs=views, submit=found[0] if found is not None else None)


class Source(enum.StrEnum):
    """Where a batch's counts came from."""

    TALLY = "tally"       # its state counters in Redis: the batch runs (or just ended)
    SUMMARY = "summary"   # its summary in the store: the batch ended
    RECORDS = "records"   # every job record: the broker has no counters for it (lost data?)


@dataclass(frozen=True)
class BatchCounts(_BatchEnd):
    """A batch's counts per state, read at a constant cost (`batch_counts`)."""

    batch: str
    created_at: float
    total: int
    by_state: dict[str, int]
    source: Source
    submit: Submit | None = None
    # the failed jobs, {"id", "error", "fault"}, once known (a summary, or the records)
    failed: list[dict[str, Any]] | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {s.value: self.by_state[s.value] for s in JobState if self.by_state.get(s.value)}

    @property
    def done(self) -> int:
        return final_count(self.by_state)

    @property
    def state(self) -> str:
        return batch_state(self.total, self.by_state,
                           self.submit.state if self.submit is not None else None)

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "state": self.state, "counts": self.counts,
                "jobs_total": self.total, "created_at": self.created_at,
                "submit": self.submit.state.value if self.submit is not None else None,
                "source": self.source.value,
                **({"failed": self.failed} if self.failed is not None else {})}


def batch_counts(store: Store, client: Any, batch: str, settings: Settings) -> BatchCounts:
    """The batch's counts: its tally in Redis (`client`; None: no broker to ask) while it runs,
    its summary once it ended, else its records. A constant number of requests, except in the
    last case."""
    found = read_submit(store, batch)
    if found is None:
        raise NotFound(f"no batch {batch!r} in {store.url}")
    submit = found[0]
    got = _tally(client, batch)
    if got is not None and final_count(got[1]) < got[0]:
        return BatchCounts(batch, submit.created_at, got[0], got[1], Source.TALLY, submit)
    summary = read_summary(store, batch)
    if summary is not None:
        return BatchCounts(batch, summary.created_at, summary.jobs, summary.counts,
                           Source.SUMMARY, submit, summary.failed)
    if got is not None:   # ended a moment ago: its summary is being written
        return BatchCounts(batch, submit.created_at, got[0], got[1], Source.TALLY, submit)
    detail = batch_status(store, batch, settings)
    failed = [{"id": j.id, "error": j.error, "fault": j.fault} for j in detail.jobs
              if j.state is JobState.FAILED]
    return BatchCounts(batch, detail.created_at, len(detail.jobs), detail.counts,
                       Source.RECORDS, submit, failed)


def _tally(client: Any, batch: str) -> tuple[int, dict[str, int]] | None:
    if client is None:
        return None
    import redis

    try:
        return tally.counts(client, batch)
    except (redis.RedisError, OSError):   # no broker to ask: the store answers
        return None


def recent_batches(store: Store, client: Any, settings: Settings,
                   limit: int = 20) -> list[BatchCounts]:
    """The newest batches first. Batch ids sort by the second they were made in; batches of
    the same second, and those with ids of their own (`--batch-id`), are ordered by when their
    submit record says they were made."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(store.list_dirs(BATCHES), reverse=True)
    stamped = [n for n in names if _STAMPED.match(n)]
    chosen = stamped[:limit]
    if chosen:   # the rest of the oldest second taken
        second = chosen[-1][:_SECOND]
        chosen += [n for n in stamped[limit:] if n[:_SECOND] == second]
    chosen += [n for n in names if not _STAMPED.match(n)]

    def read(name: str) -> BatchCounts | None:
        try:
            return batch_counts(store, client, name, settings)
        except FarmError:  # a batch being written right now, or a foreign folder
            return None

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        found = [b for b in pool.map(read, chosen) if b is not None]
    found.sort(key=lambda b: (b.created_at, b.batch), reverse=True)
    return found[:limit]


# a batch id farm/jobs.py new_batch_id made: 20261129-151200-3fa9c1
_STAMPED = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
_SECOND = len("20261129-151200")

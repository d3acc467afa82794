"""A batch's state, read from the store: the manifest, its submit record, and whatever job
records exist."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from farm.errors import FarmError
from farm.fleet import WorkerInfo
from farm.keys import BATCHES
from farm.lifecycle import JobRecord, JobState
from farm.records import Manifest, Submit, SubmitState, read_manifest, read_records, read_submit
from farm.settings import Settings
from farm.store import Store


@dataclass(frozen=True)
class JobView:
    id: str
    state: JobState
    images: list[str]
    error: str | None
    record: JobRecord | None
    waiting: str | None = None   # why a queued job is not moving, when we can tell

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


@dataclass(frozen=True)
class BatchStatus:
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
        if self.submit is not None and self.submit.state is SubmitState.ABORTED:
            return "aborted"
        states = {j.state for j in self.jobs}
        if self.half_submitted and not all(s.final for s in states):
            return "submitting"
        if not all(s.final for s in states):
            return "queued" if states == {JobState.QUEUED} else "running"
        if states == {JobState.SUCCEEDED}:
            return "succeeded"
        if JobState.FAILED in states:
            return "failed"
        if states == {JobState.CANCELED}:
            return "canceled"
        return "succeeded" if JobState.SUCCEEDED in states else "canceled"

    @property
    def half_submitted(self) -> bool:
        """Its submit stopped part-way (killed): some jobs may never have been queued."""
        return self.submit is not None and self.submit.state is SubmitState.SUBMITTING

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "canceled", "aborted")

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
        """Mark each queued job that no live worker can take: its model at its class or above.
        Such a job was accepted (a worker may join later); status says why it waits."""
        jobs = {j.id: j for j in self.manifest.jobs}
        views = []
        for view in self.jobs:
            job = jobs[view.id]
            if view.state == JobState.QUEUED and not any(
                    job.spec.model in w.models and w.vram_class >= job.vram_class
                    for w in workers):
                view = replace(view, waiting=f"waiting: no live worker serves {job.spec.model} "
                                             f"at >={job.vram_class} GB")
            views.append(view)
        return replace(self, jobs=views)


def batch_status(store: Store, batch: str, settings: Settings) -> BatchStatus:
    manifest = read_manifest(store, batch, settings)
    records = read_records(store, batch)
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


def recent_batches(store: Store, settings: Settings, limit: int = 20) -> list[BatchStatus]:
    """The newest batches first (batch ids sort by time)."""
    names = sorted(store.list_dirs(BATCHES), reverse=True)[:limit]
    out = []
    for name in names:
        try:
            out.append(batch_status(store, name, settings))
        except FarmError:  # a batch being written right now, or a foreign folder
            continue
    return out

"""A batch's end, kept in the store: `batches/<batch>/summary.json`, written once its last job is
final, so that status outlives Redis and costs one read.

Whoever makes a batch's last job final (the tally says so, farm/tally.py) calls `finish`: it
writes the summary create-once (two finishers at the same moment write one) from the tally's
per-job states and the failed jobs' records, or, when the tally did not count every job (or is
gone), from every record read again in parallel; then the batch's webhook is told
(farm/webhook.py, at most once). Reconciling calls it again for
every batch whose last open job ended (farm/recovery.py), so a finisher that died half-way is
repaired. `finish` is idempotent: a batch with a summary is left as it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from farm import keys, tally, webhook
from farm.errors import AlreadyExists, IntegrityError, NotFound
from farm.lifecycle import JobRecord, JobState
from farm.records import Manifest, SubmitState, read_all
from farm.store import Store, get_json, put_json

log = logging.getLogger("farm.summary")


def batch_state(total: int, counts: dict[str, int], submit: SubmitState | None) -> str:
    """queued or running while any job is unfinished (submitting: its submit stopped part-way),
    then succeeded, failed or canceled; aborted when its submit failed."""
    if submit is SubmitState.ABORTED:
        return "aborted"
    if tally.final_count(counts) < total:
        if submit is SubmitState.SUBMITTING:
            return "submitting"
        return "queued" if counts.get(JobState.QUEUED.value, 0) >= total else "running"
    if counts.get(JobState.FAILED.value, 0):
        return "failed"
    if counts.get(JobState.SUCCEEDED.value, 0):
        return "succeeded"
    return "canceled"


@dataclass(frozen=True)
class Summary:
    """What a batch ended as: its counts, and each failed job with its error."""

    batch: str
    state: str
    jobs: int
    counts: dict[str, int]
    created_at: float
    finished_at: float
    # every failed job: {"id", "error", "fault"}
    failed: list[dict[str, Any]] = field(default_factory=list)
    notify: str | None = None

    def encode(self) -> dict[str, Any]:
        return {"version": 1, "batch": self.batch, "state": self.state, "jobs": self.jobs,
                "counts": self.counts, "created_at": self.created_at,
                "finished_at": self.finished_at, "failed": self.failed, "notify": self.notify}

    @classmethod
    def decode(cls, data: Any) -> Summary:
        try:
            return cls(batch=str(data["batch"]), state=str(data["state"]),
                       jobs=int(data["jobs"]),
                       counts={str(k): int(v) for k, v in data["counts"].items()},
                       created_at=float(data.get("created_at", 0)),
                       finished_at=float(data.get("finished_at", 0)),
                       failed=[dict(f) for f in data.get("failed", [])],
                       notify=data.get("notify"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"the summary of a batch is malformed: {exc}") from None


def read_summary(store: Store, batch: str) -> Summary | None:
    try:
        return Summary.decode(get_json(store, keys.summary_key(batch)))
    except NotFound:
        return None


def summarize(manifest: Manifest, states: dict[str, JobState],
              failed: dict[str, JobRecord]) -> Summary:
    """The summary of a batch whose jobs are in `states` (all final), with the records of its
    failed jobs."""
    counts = {s.value: 0 for s in JobState}
    for job in manifest.jobs:
        counts[states.get(job.id, JobState.QUEUED).value] += 1
    counts = {k: v for k, v in counts.items() if v}
    total = len(manifest.jobs)
    return Summary(batch=manifest.batch,
                   state=batch_state(total, counts, SubmitState.SUBMITTED), jobs=total,
                   counts=counts, created_at=manifest.created_at, finished_at=time.time(),
                   failed=[{"id": j.id, "error": failed[j.id].error,
                            "fault": failed[j.id].error_kind}
                           for j in manifest.jobs if j.id in failed],
                   notify=manifest.notify)


def finish(store: Store, client: Any, manifest: Manifest) -> Summary | None:
    """Write the batch's summary if every job is final and none is written yet; returns the
    summary written (None: nothing to do). The caller tells the webhook (`conclude`).

    A tally that counted every job final is exact (final is final), so only the failed jobs'
    records are read, for their errors. Otherwise (a job the tally never counted, or no tally)
    every record is read again, and the tally is rewritten from that recount."""
    batch = manifest.batch
    if store.exists(keys.summary_key(batch)):
        return None
    ids = [j.id for j in manifest.jobs]
    states = _tallied(client, batch)
    recount = states is None or any(not states.get(i, JobState.QUEUED).final for i in ids)
    if recount:
        records = read_all(store, batch, ids)
        states = {job: r.state for job, r in records.items()}
        if len(records) < len(ids) or not all(s.final for s in states.values()):
            return None   # not ended: the tally lagged no further than the records
    else:
        assert states is not None
        records = read_all(store, batch, [i for i in ids if states[i] is JobState.FAILED])
    failed = {job: r for job, r in records.items() if r.state is JobState.FAILED}
    summary = summarize(manifest, states, failed)
    try:
        put_json(store, keys.summary_key(batch), summary.encode(), create_once=True)
    except AlreadyExists:
        return None   # another finisher, at the same moment
    if recount and client is not None:
        try:
            tally.reset(client, batch, len(ids), records)
        except Exception as exc:  # noqa: BLE001 - the summary is written; status reads it
            log.warning("batch %s: could not repair its tally: %s", batch, exc)
    log.info("batch %s ended %s: %s", batch, summary.state, summary.counts)
    return summary


def _tallied(client: Any, batch: str) -> dict[str, JobState] | None:
    if client is None:
        return None
    try:
        return tally.job_states(client, batch)
    except Exception as exc:  # noqa: BLE001 - the records answer instead
        log.warning("batch %s: could not read its tally: %s", batch, exc)
        return None


def conclude(store: Store, client: Any, manifest: Manifest, secret: str | None) -> Summary | None:
    """`finish` the batch if it ended, then tell its webhook (once per batch, whoever calls)."""
    summary = finish(store, client, manifest)
    if summary is None and manifest.notify:
        summary = read_summary(store, manifest.batch)
    if summary is not None and summary.notify:
        webhook.deliver(store, summary, secret)
    return summary

"""Submit a validated batch as a transaction: its submit record and manifest first, then one
message per job, then the submit record moves to submitted (farm/records.py draws the states).

- Validation happened before this (scheduler/parse.py); the broker must answer before anything
  is written.
- A message only names a job of the manifest; workers take the spec from the manifest and
  refuse the messages of a batch whose submit record is missing or aborted.
- A submit that fails part-way marks the batch aborted (workers then refuse whatever messages
  got through) and says nothing was submitted. One that is killed leaves it submitting.
- Either way, the same submit run again with the batch's id (`--batch-id`, the `batch_id`
  argument: an idempotency key) continues that batch: the same jobs with the same seeds, each
  queued again unless it ended or a live worker holds it. A job is never rendered twice: a
  second message of a job finds its record running or final and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from farm import broker, fleet, queues, recovery, tally, webhook
from farm.errors import (
    AlreadyExists,
    BrokerUnavailable,
    Conflict,
    FarmError,
    NotFound,
    UsageError,
)
from farm.jobs import Job, JobSpec, is_id, job_id, new_batch_id
from farm.keys import manifest_key
from farm.lifecycle import JobRecord, JobState, Stage
from farm.records import (
    Manifest,
    SubmitState,
    create_batch,
    read_all,
    read_manifest,
    read_submit,
    write_submit,
)
from farm.scheduler.plan import plan
from farm.settings import Settings
from farm.store import Store, open_store, put_json

log = logging.getLogger("farm.submit")

BATCH_MARKER_SECONDS = 30 * 24 * 3600


def batch_marker(batch: str) -> str:
    return f"farm:batch:{batch}"


@dataclass(frozen=True)
class Submitted:
    batch: str
    jobs: list[Job]
    sent: int = 0              # messages sent by this call
    continued: bool = False    # the batch existed: this call continued it


def key_batch_id(key: str) -> str:
    """The batch id an idempotency key stands for."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def request_digest(specs: list[JobSpec], defaults: dict[str, Any] | None = None) -> str:
    """What a retried submit must repeat: the jobs and the flags."""
    body = json.dumps({"jobs": [s.to_dict() for s in specs], "defaults": defaults or {}},
                      sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def submit(settings: Settings, specs: list[JobSpec], *, source: str = "-",
           defaults: dict[str, Any] | None = None, store: Store | None = None,
           batch_id: str | None = None, idempotency_key: str | None = None,
           request: str | None = None, notify: str | None = None,
           announce: Callable[[str], None] | None = None) -> Submitted:
    """Submit `specs` as a batch. `batch_id`, or an `idempotency_key` (any text; the batch id
    derives from it), makes the call idempotent: a batch of that id that exists is continued
    (it must be the same request: `request`, by default the digest of the specs and
    defaults), not made again. `notify`: an http(s) URL told when the batch ends
    (farm/webhook.py). `announce` hears the batch id before any message is sent."""
    if notify is not None:
        webhook.check_url(notify)
    if idempotency_key is not None and batch_id is None:
        batch_id = key_batch_id(idempotency_key)
    # 1. the broker must answer before anything is written
    broker.ensure_broker(settings)
    client = broker.wait_for_broker(settings)
    store = store or open_store(settings)
    fleet.check_shared(client, settings)  # planned with the classes and buckets workers use
    if batch_id is not None and not is_id(batch_id):
        raise UsageError(f"--batch-id must be lowercase letters, digits and dashes (at most 81), "
                         f"got {batch_id!r}")
    request = request or request_digest(specs, {**(defaults or {}), "notify": notify}
                                        if notify else defaults)

    # 2. the submit record and the manifest, before any message exists
    batch = batch_id or new_batch_id(time.time())
    found = read_submit(store, batch)
    continued = found is not None
    if found is not None and found[0].request != request:
        raise UsageError(f"batch {batch} exists with a different request (other prompts or "
                         "flags); give another --batch-id, or none for a new batch")
    try:
        manifest = read_manifest(store, batch, settings) if continued else None
    except NotFound:  # killed between its submit record and its manifest
        manifest = None
    if manifest is None:
        manifest = _manifest(batch, specs, settings, source, defaults, request, notify)
        try:
            if found is None:
                found = create_batch(store, manifest, SubmitState.SUBMITTING)
            else:
                put_json(store, manifest_key(batch), manifest.encode(), create_once=True)
        except AlreadyExists:  # the same submit, running at once elsewhere: continue it
            found = read_submit(store, batch)
            manifest = read_manifest(store, batch, settings)
            continued = True
    assert found is not None
    submit_record, version = found
    if announce is not None:
        announce(batch)

    if submit_record.state is SubmitState.SUBMITTED:
        # every message was sent: nothing to do (a message lost since is `farm resubmit`'s, or
        # the workers' reconciling's)
        return Submitted(batch=batch, jobs=manifest.jobs, sent=0, continued=True)

    # 3. one message per job that still needs one; first the jobs are noted as open until
    # each ends, so that workers can find one whose message vanished with a killed worker
    records = read_all(store, batch, [j.id for j in manifest.jobs]) if continued else {}
    todo = [job for job in (_next_stage(j, records.get(j.id), client) for j in manifest.jobs)
            if job is not None]
    app = broker.celery_app(settings)
    try:
        if submit_record.state is not SubmitState.SUBMITTING:
            submit_record = submit_record.to(SubmitState.SUBMITTING)
            version = write_submit(store, submit_record, version)
        _start_tally(client, batch, len(manifest.jobs), records)
        recovery.open_jobs(client, batch, [job.id for job in todo])
        send(app, todo)
        recovery.activate(client, batch)
        # the broker's own note of the batch: if it is ever missing while jobs wait, the broker
        # lost its data (farm status says so; farm resubmit queues them again)
        client.set(batch_marker(batch), len(manifest.jobs), ex=BATCH_MARKER_SECONDS)
        write_submit(store, submit_record.to(SubmitState.SUBMITTED), version)
    except Conflict:
        raise UsageError(f"batch {batch} is being submitted by another process at once") \
            from None
    except Exception as exc:
        reason = f"enqueue failed after the manifest was written: {exc}"
        try:  # workers refuse the messages that did get through
            write_submit(store, submit_record.to(SubmitState.ABORTED, reason), version)
        except FarmError:
            pass  # left submitting: status says how to finish or cancel it
        raise BrokerUnavailable(f"nothing was submitted: {reason}; `farm submit ... --batch-id "
                                f"{batch}` submits it again") from None
    finally:
        app.close()
    return Submitted(batch=batch, jobs=manifest.jobs, sent=len(todo), continued=continued)


def send(app: Any, jobs: list[Job], attempts: int = 3) -> None:
    """One message per job, all in one round trip (kombu's publish batch: a pipeline of
    LPUSHes). A broker error may leave some of them delivered and some not: the whole lot
    goes again, up to `attempts` times in all, which is safe because a second message of a
    job does nothing (workers skip a job that is running or has ended)."""
    import redis
    from kombu.exceptions import BatchPublishError, OperationalError

    delay = 0.2
    for attempt in range(attempts):
        try:
            with app.producer_or_acquire() as producer, producer.batch():
                for job in jobs:
                    app.send_task(queues.RENDER_TASK, args=[job.encode()],
                                  queue=queues.stage_queue(job), producer=producer)
            return
        except (BatchPublishError, OperationalError, redis.ConnectionError,
                redis.TimeoutError, OSError) as exc:
            if attempt + 1 == attempts:
                raise
            log.warning("sending %d message(s) failed (%s); sending them again in %.1f s",
                        len(jobs), exc, delay)
            time.sleep(delay)
            delay *= 2


def _start_tally(client: Any, batch: str, total: int, records: dict[str, JobRecord]) -> None:
    """The batch's state counters (farm/tally.py), before any message: from the records a
    continued batch has. Without them status counts from the records, so a broker that refuses
    them (an ACL without hash commands or scripts) costs speed, not the batch."""
    import redis

    try:
        tally.start(client, batch, total, records)
    except redis.ResponseError as exc:
        log.warning("batch %s: the broker refused its state counters (%s); `farm status` "
                    "counts from the job records", batch, exc)


def _manifest(batch: str, specs: list[JobSpec], settings: Settings, source: str,
              defaults: dict[str, Any] | None, request: str,
              notify: str | None = None) -> Manifest:
    """The batch's jobs, each planned: its first stage and the classes its stages need."""
    jobs = []
    for i, spec in enumerate(specs):
        p = plan(spec, settings)
        jobs.append(Job(id=job_id(batch, i), batch=batch, index=i, spec=spec,
                        vram_class=p.vram_class, stage=p.first_stage,
                        refiner_vram_class=p.refiner_vram_class))
    shared = json.loads(json.dumps(fleet.shared_settings(settings), default=list))
    return Manifest(batch=batch, created_at=time.time(), source=source,
                    defaults=dict(defaults or {}), jobs=jobs, request=request, notify=notify,
                    settings=shared)


def _next_stage(job: Job, record: JobRecord | None, client: Any) -> Job | None:
    """The stage a job needs a message for, or None: it ended, or a live worker holds it."""
    if record is None:
        return job
    if record.state.final:
        return None
    if record.state.active and record.worker and recovery.holds(client, record.worker, job.id):
        return None
    if record.state in (JobState.LATENTS_READY, JobState.REFINING):
        job = replace(job, stage=Stage.REFINER)
    return job.replanned(record.replanned)


def resubmit(settings: Settings, batch: str, store: Store | None = None) -> list[Job]:
    """Queue again every job of `batch` that has not ended and that no live worker holds, at
    the stage it stands at (for a broker that lost its data: status says when). Idempotent: a
    second message of a job does nothing."""
    broker.ensure_broker(settings)
    client = broker.wait_for_broker(settings)
    store = store or open_store(settings)
    manifest = read_manifest(store, batch, settings)
    records = read_all(store, batch, [j.id for j in manifest.jobs])
    again = [job for job in (_next_stage(j, records.get(j.id), client) for j in manifest.jobs)
             if job is not None]
    app = broker.celery_app(settings)
    try:
        _start_tally(client, batch, len(manifest.jobs), records)
        recovery.open_jobs(client, batch, [job.id for job in again])
        send(app, again)
        client.set(batch_marker(batch), len(manifest.jobs), ex=BATCH_MARKER_SECONDS)
        recovery.activate(client, batch)
    finally:
        app.close()
    return again



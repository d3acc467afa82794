"""Submit a validated batch: write its manifest, then enqueue one message per job.

All or nothing: validation happened before this (scheduler/parse.py); the broker is checked
before anything is written; and if enqueuing breaks part-way, the manifest is marked aborted so
workers drop the messages that did get through, and the user is told nothing was submitted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from farm import broker, fleet, queues, recovery
from farm.errors import BrokerUnavailable, FarmError
from farm.jobs import Job, JobSpec, job_id, new_batch_id
from farm.records import Manifest, manifest_key
from farm.scheduler.plan import plan
from farm.settings import Settings
from farm.store import Store, open_store, put_json

BATCH_MARKER_SECONDS = 30 * 24 * 3600


def batch_marker(batch: str) -> str:
    return f"farm:batch:{batch}"


@dataclass(frozen=True)
class Submitted:
    batch: str
    jobs: list[Job]


def submit(settings: Settings, specs: list[JobSpec], *, source: str = "-",
           defaults: dict[str, Any] | None = None, store: Store | None = None) -> Submitted:
    # 1. the broker must answer before anything is written
    broker.ensure_broker(settings)
    broker.wait_for_broker(settings)
    store = store or open_store(settings)
    client = broker.redis_client(settings)
    fleet.check_shared(client, settings)  # planned with the classes and buckets workers use
    app = broker.celery_app(settings)

    # 2. the manifest is the record: written once, before any message exists
    batch = new_batch_id(time.time())
    jobs = []
    for i, spec in enumerate(specs):
        p = plan(spec, settings)
        jobs.append(Job(id=job_id(batch, i), batch=batch, index=i, spec=spec,
                        vram_class=p.vram_class, stage=p.first_stage,
                        refiner_vram_class=p.refiner_vram_class))
    manifest = Manifest(batch=batch, created_at=time.time(), source=source,
                        defaults=dict(defaults or {}), jobs=jobs)
    put_json(store, manifest_key(batch), manifest.encode(), create_once=True)

    # 3. one message per job, on one connection; first the jobs are noted as open until each
    # ends, so that workers can find one whose message vanished with a killed worker
    # (farm/recovery.py: reconciling)
    try:
        recovery.open_jobs(client, batch, [job.id for job in jobs])
        with app.producer_or_acquire() as producer:
            for job in jobs:
                app.send_task(queues.RENDER_TASK, args=[job.encode()],
                              queue=queues.stage_queue(job),
                              producer=producer, retry=True,
                              retry_policy={"max_retries": 3, "interval_start": 0.2,
                                            "interval_step": 0.5, "interval_max": 2})
        recovery.activate(client, batch)
        # the broker's own note of the batch: if it is ever missing while jobs wait, the broker
        # lost its data (farm status says so; farm resubmit queues them again)
        client.set(batch_marker(batch), len(jobs), ex=BATCH_MARKER_SECONDS)
    except Exception as exc:
        reason = f"enqueue failed after the manifest was written: {exc}"
        try:
            aborted = Manifest(**{**manifest.__dict__, "aborted": reason})
            put_json(store, manifest_key(batch), aborted.encode())
        except FarmError:
            pass
        try:  # workers drop the messages that did get through: the batch is canceled
            recovery.set_canceled(broker.redis_client(settings), batch)
        except Exception:  # noqa: BLE001 - the broker is what just failed; status says aborted
            pass
        raise BrokerUnavailable(f"nothing was submitted: {reason}") from None
    finally:
        app.close()
    return Submitted(batch=batch, jobs=jobs)


def resubmit(settings: Settings, batch: str, store: Store | None = None) -> list[Job]:
    """Queue again every job of `batch` that has not ended, at the stage it stands at (for a
    broker that lost its data: status says when). Idempotent: a job that meanwhile runs or
    ends is skipped by its worker."""
    from farm.jobs import JobState
    from farm.records import read_manifest, read_records

    broker.ensure_broker(settings)
    broker.wait_for_broker(settings)
    store = store or open_store(settings)
    manifest = read_manifest(store, batch, settings)
    records = read_records(store, batch)
    app = broker.celery_app(settings)
    client = broker.redis_client(settings)
    again = []
    try:
        recovery.open_jobs(client, batch, [job.id for job in manifest.jobs
                                           if job.id not in records
                                           or not records[job.id].state.final])
        with app.producer_or_acquire() as producer:
            for job in manifest.jobs:
                record = records.get(job.id)
                if record is not None and record.state.final:
                    continue
                if record is not None and record.state in (JobState.LATENTS_READY,
                                                           JobState.REFINING):
                    from dataclasses import replace

                    job = replace(job, stage="refiner")
                app.send_task(queues.RENDER_TASK, args=[job.encode()],
                              queue=queues.stage_queue(job), producer=producer)
                again.append(job)
        client.set(batch_marker(batch), len(manifest.jobs), ex=BATCH_MARKER_SECONDS)
        recovery.activate(client, batch)
    finally:
        app.close()
    return again

"""Helpers shared by the integration tests."""

from __future__ import annotations

from farm.jobs import Job, JobSpec
from farm.keys import record_key
from farm.lifecycle import JobRecord
from farm.records import Manifest, SubmitState, create_batch
from farm.scheduler.plan import plan
from farm.settings import Settings
from farm.store import Store, put_json


def one_job_batch(store: Store, batch: str, spec: JobSpec, settings: Settings) -> Job:
    """A batch of one job, planned as submit plans it, submitted into `store`."""
    p = plan(spec, settings)
    job = Job(id=f"{batch}-0000", batch=batch, index=0, spec=spec, vram_class=p.vram_class,
              stage=p.first_stage, refiner_vram_class=p.refiner_vram_class)
    create_batch(store, Manifest(batch=batch, created_at=0.0, source="t", defaults={},
                                 jobs=[job]), SubmitState.SUBMITTED)
    return job


def plant(store: Store, record: JobRecord) -> None:
    """Put a record in the store as some worker left it (a test's set-up, not a lifecycle
    move)."""
    put_json(store, record_key(record.batch, record.job), record.encode())

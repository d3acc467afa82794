"""Helpers shared by the integration tests."""

from __future__ import annotations

from farm.jobs import Job, JobSpec
from farm.records import Manifest, manifest_key
from farm.scheduler.plan import plan
from farm.settings import Settings
from farm.store import Store, put_json


def one_job_batch(store: Store, batch: str, spec: JobSpec, settings: Settings) -> Job:
    """A batch of one job, planned as submit plans it, with its manifest in `store`."""
    p = plan(spec, settings)
    job = Job(id=f"{batch}-0000", batch=batch, index=0, spec=spec, vram_class=p.vram_class,
              stage=p.first_stage, refiner_vram_class=p.refiner_vram_class)
    put_json(store, manifest_key(batch), Manifest(batch=batch, created_at=0.0, source="t",
                                                  defaults={}, jobs=[job]).encode())
    return job

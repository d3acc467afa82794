"""Running one job on a warm worker: check the message, render, write the images, record it.

Every effect is keyed by the job, so a second delivery of the same message does no harm: a job
whose record is final is skipped, and images are written create-once.
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from farm import images as pngs
from farm.errors import AlreadyExists, FarmError, ValidationError
from farm.jobs import Job, JobState
from farm.records import (
    JobRecord,
    image_key,
    read_manifest,
    read_record,
    sidecar_key,
    write_record,
)
from farm.settings import Settings
from farm.store import Store

log = logging.getLogger("farm.worker")


class Model(Protocol):
    name: str
    device: str
    dtype: Any
    weights_hash: str
    spec: Any


class Renderer(Protocol):
    def __call__(self, model: Any, spec: Any) -> list[Any]: ...


@dataclass
class WorkerContext:
    """What a job needs from its worker: settings, the store, the warm models, its identity."""

    settings: Settings
    store: Store
    models: dict[str, Any]
    render: Renderer
    name: str
    host: str = field(default_factory=socket.gethostname)
    versions: dict[str, str] = field(default_factory=dict)
    threads: int = 0  # torch threads on CPU (pixels depend on it); 0 = torch's default
    vram_class: int = 0   # the class this worker declared


@dataclass(frozen=True)
class Outcome:
    job: str | None
    state: str
    error: str | None = None


def run_job(ctx: WorkerContext, message: Any) -> Outcome:
    # 1. check the message again: anyone who can reach Redis can push one
    try:
        job = Job.decode(message, ctx.settings)
    except ValidationError as exc:
        return Outcome(None, "rejected", f"malformed message, no model work done: {exc}")
    if ctx.vram_class and job.vram_class > ctx.vram_class:
        # only a hand-pushed message gets here: routing sends a job to its class or above
        return Outcome(None, "rejected", f"job {job.id} needs a {job.vram_class} GB worker; "
                       f"this one is {ctx.vram_class} GB")
    if job.spec.model not in ctx.models:
        # routing sent us a job for a model we do not serve: a configuration error somewhere
        return _fail(ctx, job, None, f"worker {ctx.name} does not serve model {job.spec.model}")

    # 2. a job whose record is final was done already (a duplicate delivery): do nothing
    record = read_record(ctx.store, job.batch, job.id)
    if record is not None and record.state.final:
        log.info("job %s is already %s; skipping the duplicate", job.id, record.state.value)
        return Outcome(job.id, "duplicate")
    try:
        manifest = read_manifest(ctx.store, job.batch, ctx.settings)
    except FarmError as exc:
        return _fail(ctx, job, record, f"cannot read the batch manifest: {exc}")
    if manifest.aborted:
        return _fail(ctx, job, record, f"batch was aborted at submit: {manifest.aborted}",
                     state=JobState.CANCELED)

    record = record or JobRecord(job=job.id, batch=job.batch)
    if record.state != JobState.QUEUED:  # picked up again after a worker died mid-job
        record = record.to(JobState.QUEUED)
    started = time.time()
    record = record.to(JobState.RUNNING, attempts=record.attempts + 1, worker=ctx.name,
                       started_at=started, error=None)
    write_record(ctx.store, record)

    # 3. render and write
    try:
        model = ctx.models[job.spec.model]
        t0 = time.perf_counter()
        pictures = ctx.render(model, job.spec)
        render_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        keys = _write_images(ctx, job, record, model, pictures, started, render_s)
        write_s = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - any failure of a job is recorded, not raised
        log.exception("job %s failed", job.id)
        return _fail(ctx, job, record, f"{type(exc).__name__}: {exc}")

    finished = time.time()
    record = record.to(JobState.SUCCEEDED, images=keys, finished_at=finished,
                       timings={"render_s": round(render_s, 4), "write_s": round(write_s, 4),
                                "total_s": round(finished - started, 4)})
    write_record(ctx.store, record)
    return Outcome(job.id, "succeeded")


def _write_images(ctx: WorkerContext, job: Job, record: JobRecord, model: Model,
                  pictures: list[Any], started: float, render_s: float) -> list[str]:
    spec = job.spec
    keys = []
    for k, (image, seed) in enumerate(zip(pictures, spec.image_seeds(), strict=True)):
        key = image_key(job.batch, job.id, k)
        png = pngs.encode_png(image, pngs.a1111_parameters(spec, seed, model.weights_hash))
        sidecar = {
            **spec.to_dict(),
            "seed": seed, "job_seed": spec.seed, "image_index": k,
            "batch": job.batch, "job": job.id, "image": key,
            "model_hash": model.weights_hash, "model_source": model.spec.ref,
            "worker": ctx.name, "host": ctx.host, "device": str(model.device), "threads": ctx.threads,
            "vram_class": ctx.vram_class, "profile": getattr(model, "profile", ""),
            "planned_vram_class": job.vram_class,
            "dtype": str(model.dtype).replace("torch.", ""), "attempt": record.attempts,
            "started_at": started, "finished_at": time.time(),
            "timings": {"render_s": round(render_s, 4),
                        "render_per_image_s": round(render_s / max(1, len(pictures)), 4)},
            "versions": ctx.versions,
        }
        # create-once: a duplicate delivery finds the first copy's objects and keeps them
        for obj_key, data, ctype in ((key, png, "image/png"),
                                     (sidecar_key(job.batch, job.id, k),
                                      json.dumps(sidecar, indent=2, sort_keys=True).encode(),
                                      "application/json")):
            try:
                ctx.store.put(obj_key, data, create_once=True, content_type=ctype)
            except AlreadyExists:
                log.info("%s exists already (an earlier attempt wrote it); keeping it", obj_key)
        keys.append(key)
    return keys


def _fail(ctx: WorkerContext, job: Job, record: JobRecord | None, error: str,
          state: JobState = JobState.FAILED) -> Outcome:
    record = record or JobRecord(job=job.id, batch=job.batch)
    if not record.state.final:
        record = record.to(state, error=error, finished_at=time.time(), worker=ctx.name)
        try:
            write_record(ctx.store, record)
        except FarmError as exc:
            log.error("could not record the failure of %s: %s", job.id, exc)
    return Outcome(job.id, state.value, error)


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("farm", "torch", "diffusers", "transformers", "accelerate", "celery"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions

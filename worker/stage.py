"""Running one stage of a job on a warm worker: check the message, run it, record it.

Every effect is keyed by the job, so a second delivery of the same message does no harm: a stage
whose work the record shows done is skipped, images are written create-once, intermediates are
keyed by job. The stages themselves live in worker/split.py (base, refiner, pair) and below
(full).
"""

from __future__ import annotations

import logging
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from farm.errors import FarmError, IntegrityError, NotFound, RetryableError, ValidationError
from farm.jobs import RESUMABLE_STAGES, Job, JobState
from farm.records import JobRecord, read_record, write_record
from farm.settings import Settings
from farm.store import Store
from farm.worker.drain import Drain, HandBack, ImageState, InFlight
from farm.worker.outputs import write_images

log = logging.getLogger("farm.worker")

# stages a stopping worker hands back: full and base resume from a checkpoint of their
# in-flight latents (RESUMABLE_STAGES); a refiner runs again from the base's stored latents
HANDBACK_STAGES = (*RESUMABLE_STAGES, "refiner")


class Renderer(Protocol):
    """worker/render.py's render and the stand-in's: `resume` holds the images of a handed-back
    stage to continue, `track` hears of each image's start (worker/drain.py)."""

    def __call__(self, model: Any, spec: Any, *, callback: Any = None, resume: Any = None,
                 track: Any = None) -> list[Any]: ...


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
    # the loading/rendering module (farm.worker.pipelines), for the base/refiner halves
    backend: Any = None
    # puts the next stage of a job on its queue (the refiner stage after the base)
    enqueue: Callable[[Job], None] | None = None
    # True when `farm cancel` named any of these ids (the job, its batch): `canceled` asks
    # Redis (before a stage), `canceled_now` a local set fed by a broadcast (after each step)
    canceled: Callable[..., bool] | None = None
    canceled_now: Callable[..., bool] | None = None
    # called after every denoising step (hang detection); set by the worker runtime
    on_progress: Callable[[], None] | None = None
    job: Job | None = None  # the job being run, for the step callback
    # the worker's stop request (SIGTERM) and its grace period; set by the worker runtime
    drain: Drain | None = None
    # what the running full or base stage has done so far, for a hand-back (worker/drain.py)
    inflight: InFlight | None = None

    def step(self, pipe: Any, step_index: int, timestep: Any,
             kwargs: dict[str, Any]) -> dict[str, Any]:
        """After every denoising step: note progress, stop at once if canceled, and hand the
        stage back if the worker is stopping and the stage will not finish in its grace."""
        if self.on_progress is not None:
            self.on_progress()
        if self.canceled_now is not None and self.job is not None and self.canceled_now(
                self.job.id, self.job.batch):
            raise JobCanceled(self.job.id)
        inflight = self.inflight
        if inflight is not None and step_index >= 0:
            inflight.note_step(pipe, step_index, kwargs)
            if (self.drain is not None and self.drain.requested and self.job is not None
                    and inflight.stage in HANDBACK_STAGES and self.enqueue is not None
                    and kwargs.get("latents") is not None
                    and self.drain.must_hand_back(inflight.steps_left(self.job.spec.n),
                                                  inflight.seconds_per_step())):
                raise HandBack(inflight)
        return kwargs

    def stage_info(self, model: Any) -> dict[str, Any]:
        """Who runs a stage, for the record and the sidecar."""
        return {"worker": self.name, "host": self.host, "device": str(model.device),
                "vram_class": self.vram_class, "profile": getattr(model, "profile", ""),
                "model_hash": model.weights_hash}


class StageFailed(Exception):
    """The job fails with `message`; `record` is its latest record; `kind` says whose fault:
    "job" (the work itself raised) or "worker" (workers kept dying running it)."""

    def __init__(self, record: JobRecord, message: str, kind: str = "job") -> None:
        super().__init__(message)
        self.record = record
        self.message = message
        self.kind = kind


class JobCanceled(Exception):
    """Raised from the step callback when `farm cancel` named the job or its batch."""


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
    if ctx.vram_class and job.stage_class > ctx.vram_class:
        # only a hand-pushed message gets here: routing sends a stage to its class or above
        return Outcome(None, "rejected", f"job {job.id} needs a {job.stage_class} GB worker; "
                       f"this one is {ctx.vram_class} GB")
    needed: dict[str, list[str | None]] = {
        "full": [job.spec.model], "base": [job.spec.model], "refiner": [job.spec.refiner],
        "pair": [job.spec.model, job.spec.refiner]}
    missing = [m for m in needed[job.stage] if m not in ctx.models]
    if missing:
        # routing sent us a stage for a model we do not serve: a configuration error somewhere
        return _fail(ctx, job, None, f"worker {ctx.name} does not serve model {missing[0]}")

    # 2. the record decides whether there is anything left to do (duplicates do nothing)
    record = read_record(ctx.store, job.batch, job.id)
    if record is not None and record.state.final:
        log.info("job %s is already %s; skipping the duplicate", job.id, record.state.value)
        return Outcome(job.id, "duplicate")
    # (a batch whose submit broke part-way is flagged canceled too: see scheduler/submit.py)
    record = record or JobRecord(job=job.id, batch=job.batch)
    if ctx.canceled is not None and ctx.canceled(job.id, job.batch):
        return _fail(ctx, job, record, "canceled before it started", JobState.CANCELED)

    from farm.worker import split  # split builds on this module's helpers

    ctx.job = job
    try:
        if job.stage == "refiner":
            return split.run_refiner(ctx, job, record)
        if job.stage == "base":
            return split.run_base(ctx, job, record)
        if job.stage == "pair":
            return split.run_pair(ctx, job, record)
        return run_full(ctx, job, record)
    except StageFailed as exc:
        return _fail(ctx, job, exc.record, exc.message, kind=exc.kind)
    except JobCanceled:
        latest = read_record(ctx.store, job.batch, job.id) or record
        return _fail(ctx, job, latest, "canceled while running", JobState.CANCELED)
    finally:
        ctx.job = None
        ctx.inflight = None


def start(ctx: WorkerContext, job: Job, record: JobRecord, stage: str, model: Any) -> JobRecord:
    """Record that `stage` starts on this worker (a restarted one counts another attempt).
    A stage whose workers died `max_attempts` times is dead-lettered instead."""
    done = record.stages.get(stage, {}).get("attempts", 0)
    if record.state not in (JobState.QUEUED, JobState.LATENTS_READY):
        # picked up again after a worker died mid-stage
        if done >= ctx.settings.max_attempts:
            workers = record.stages.get(stage, {}).get("worker", "?")
            raise StageFailed(record, f"dead-lettered: the worker died running its {stage} "
                              f"stage {done} times (last on {workers}); a poison job? see "
                              "the worker logs", kind="worker")
        back = JobState.LATENTS_READY if record.state == JobState.REFINING else JobState.QUEUED
        record = record.to(back)
    state = JobState.REFINING if stage == "refiner" else JobState.RUNNING
    now = time.time()
    attempts = done + 1
    record = record.to(state, attempts=record.attempts + 1, worker=ctx.name, error=None,
                       started_at=record.started_at or now,
                       stages=record.with_stage(stage, **ctx.stage_info(model),
                                                attempts=attempts, started_at=now))
    write_record(ctx.store, record)
    return record


def finish_stage(record: JobRecord, stage: str) -> dict[str, dict[str, Any]]:
    now = time.time()
    began = record.stages.get(stage, {}).get("started_at", now)
    return record.with_stage(stage, finished_at=now, seconds=round(now - began, 4))


def run_full(ctx: WorkerContext, job: Job, record: JobRecord) -> Outcome:
    """A job without a refiner: render its images, write them, record success. A stage handed
    back by a stopping worker continues from its checkpoint."""
    model = ctx.models[job.spec.model]
    resume = load_checkpoint(ctx, job, model)
    record = start(ctx, job, record, "full", model)
    record = note_resume(ctx, job, record, "full", resume)
    inflight = begin_inflight(ctx, "full", resume)
    try:
        t0 = time.perf_counter()
        pictures = ctx.render(model, job.spec, callback=ctx.step, resume=resume,
                              track=inflight.begin_image)
        render_s = time.perf_counter() - t0
        ctx.inflight = None
        record = _replace_stages(record, finish_stage(record, "full"))
        t1 = time.perf_counter()
        ctx.step(None, -1, None, {})  # canceled during the last step: write nothing
        keys = write_images(ctx, job, record, model, pictures, render_s)
        write_s = time.perf_counter() - t1
    except JobCanceled:
        raise
    except HandBack as back:
        return hand_back(ctx, job, record, "full", model, back.inflight)
    except Exception as exc:  # noqa: BLE001 - any failure of a job is recorded, not raised
        log.exception("job %s failed", job.id)
        return _fail(ctx, job, record, f"{type(exc).__name__}: {exc}")
    outcome = succeed(ctx, record, keys, render_s, write_s)
    drop_checkpoint(ctx, job)
    return outcome


# -- handing a stage back on shutdown, and resuming it (worker/drain.py) ----------------------


def begin_inflight(ctx: WorkerContext, stage: str, resume: dict[int, Any] | None) -> InFlight:
    """Start following the stage's steps; images a checkpoint had finished count as done."""
    inflight = InFlight(stage=stage)
    for k, point in (resume or {}).items():
        if point.done:
            inflight.images[k] = ImageState(generator=point.generator(), latents=point.latents,
                                            finished=True)
    ctx.inflight = inflight
    return inflight


def load_checkpoint(ctx: WorkerContext, job: Job, model: Any) -> dict[int, Any] | None:
    """The images of the checkpoint `job.resume` names, verified; None when the stage has none,
    or it is unusable (then the stage runs from the start: the same image, later)."""
    if job.resume is None:
        return None
    from farm.worker import checkpoint

    try:
        return checkpoint.decode(ctx.store.get(job.resume.key), job, model.weights_hash).images
    except (NotFound, IntegrityError) as exc:
        log.warning("job %s: cannot resume from %s (%s); running the stage from the start",
                    job.id, job.resume.key, exc)
        return None


def note_resume(ctx: WorkerContext, job: Job, record: JobRecord, stage: str,
                resume: dict[int, Any] | None) -> JobRecord:
    """Record where a handed-back stage resumed (or that its checkpoint was unusable)."""
    if job.resume is None:
        return record
    point = job.resume
    if resume is None and point.step > 0:
        note = (f"the checkpoint at step {point.step} was unusable; {stage} stage run again "
                f"from the start on worker {ctx.name}")
        info: dict[str, Any] = {"resumed": None}
    else:
        note = (f"resumed at step {point.step}/{job.spec.steps} of image {point.image + 1}/"
                f"{job.spec.n} on worker {ctx.name}")
        info = {"resumed": {"image": point.image, "step": point.step, "worker": ctx.name}}
    record = record.to(record.state, note=note, stages=record.with_stage(stage, **info))
    write_record(ctx.store, record)
    return record


def hand_back(ctx: WorkerContext, job: Job, record: JobRecord, stage: str, model: Any,
              inflight: InFlight) -> Outcome:
    """The worker is stopping and the stage would not finish in its grace period: store the
    in-flight latents, put the job back to queued (this attempt not counted against it), and
    queue the same stage again, resuming from them. The current message is then acked."""
    from dataclasses import replace as _replace

    from farm.worker import checkpoint

    if superseded(ctx, record):
        return Outcome(job.id, "superseded")
    data, point = checkpoint.encode(job, inflight, model.weights_hash, ctx.name)
    ctx.store.put(point.key, data, content_type="application/octet-stream")
    entry = record.stages.get(stage, {})
    note = (f"handed back at step {point.step}/{job.spec.steps} of image {point.image + 1}/"
            f"{job.spec.n} on worker {ctx.name}'s shutdown")
    back = [*entry.get("handed_back", []),
            {"worker": ctx.name, "image": point.image, "step": point.step, "at": time.time()}]
    record = record.to(JobState.QUEUED, note=note, error=None, stages=record.with_stage(
        stage, attempts=max(0, int(entry.get("attempts", 1)) - 1), handed_back=back))
    write_record(ctx.store, record)
    assert ctx.enqueue is not None  # the step callback hands back only when it can enqueue
    try:
        ctx.enqueue(_replace(job, resume=point))
    except Exception as exc:  # noqa: BLE001 - the message must not be acked without it
        raise RetryableError(f"job {job.id}: could not queue its resume message: {exc}") from exc
    if job.resume is not None and job.resume.key != point.key:
        drop_checkpoint(ctx, job)
    log.info("job %s: %s", job.id, note)
    return Outcome(job.id, "handed_back", note)


def drop_checkpoint(ctx: WorkerContext, job: Job) -> None:
    """A resumed stage is done: its checkpoint has served (as intermediates do)."""
    if job.resume is None:
        return
    try:
        ctx.store.delete(job.resume.key)
    except FarmError as exc:
        log.warning("could not delete the checkpoint of %s: %s", job.id, exc)


def superseded(ctx: WorkerContext, record: JobRecord) -> bool:
    """True when another attempt took over this job (a worker presumed dead that was not), or
    it was canceled, while this one ran: then this attempt's result is discarded."""
    latest = read_record(ctx.store, record.batch, record.job)
    if latest is None:
        return False
    if latest.state.final or latest.attempts > record.attempts:
        log.warning("job %s: attempt %d was superseded (the record is now %s, attempt %d); "
                    "discarding its result", record.job, record.attempts, latest.state.value,
                    latest.attempts)
        return True
    return False


def succeed(ctx: WorkerContext, record: JobRecord, keys: list[str], render_s: float,
            write_s: float) -> Outcome:
    if superseded(ctx, record):
        return Outcome(record.job, "superseded")
    finished = time.time()
    record = record.to(JobState.SUCCEEDED, images=keys, finished_at=finished,
                       timings={"render_s": round(render_s, 4), "write_s": round(write_s, 4),
                                "total_s": round(finished - (record.started_at or finished),
                                                 4)})
    write_record(ctx.store, record)
    return Outcome(record.job, "succeeded")


def _replace_stages(record: JobRecord, stages: dict[str, dict[str, Any]]) -> JobRecord:
    from dataclasses import replace

    return replace(record, stages=stages)


def _fail(ctx: WorkerContext, job: Job, record: JobRecord | None, error: str,
          state: JobState = JobState.FAILED, kind: str = "job") -> Outcome:
    record = record or JobRecord(job=job.id, batch=job.batch)
    if record.attempts and superseded(ctx, record):
        return Outcome(job.id, "superseded")
    if not record.state.final:
        record = record.to(state, error=error, finished_at=time.time(), worker=ctx.name,
                           error_kind=kind if state == JobState.FAILED else None)
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

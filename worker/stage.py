"""Running one stage of a job on a warm worker: check the message against the manifest, decide
whether there is anything to do, run the stage, and route its end through farm/lifecycle.py.

    1. resolve   the message names a job of a manifest; no manifest, no such job, a stage the job
                 does not have, an aborted batch: refused before any model work, nothing written
    2. admit     the job's record decides: final → a duplicate; a stage a live worker holds →
                 a duplicate; a dead worker's stage → taken over (its death recorded)
    3. start     compare-and-set the record to running (a stale delivery loses here)
    4. run       the stage body (worker/split.py); its end is a lifecycle move, each failure
                 classified (worker/faults.py) and routed (lifecycle.after_failure)

Every effect is keyed by the job: images are written fenced by attempt (worker/outputs.py),
intermediates are keyed by job, and every record write is conditional on the record read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from farm import lifecycle
from farm.errors import ConfigError, IntegrityError, NotFound, ValidationError
from farm.jobs import Job, Message
from farm.lifecycle import Fault, Held, JobState, Stage, Superseded
from farm.records import SubmitState
from farm.worker import split
from farm.worker.attempt import cancel, fail
from farm.worker.context import JobCanceled, Outcome, Result, Run, StageEnded, WorkerContext
from farm.worker.faults import classify, describe

log = logging.getLogger("farm.worker")
T = TypeVar("T")

__all__ = ["Outcome", "Result", "WorkerContext", "admit", "guarded", "resolve", "run_job",
           "run_message"]


def resolve(ctx: WorkerContext, raw: Any) -> Job | Result:
    """The job and stage a message names, as the batch's manifest has it; a rejection (nothing
    written, no model work) when the message is malformed or names nothing the manifest has."""
    try:
        message = Message.decode(raw)
    except ValidationError as exc:
        return Result(None, Outcome.REJECTED, f"malformed message, no model work done: {exc}")
    try:
        assert ctx.manifests is not None  # built with the context
        manifest, submit = ctx.manifests.get(message.batch)
    except NotFound:
        return Result(message.job, Outcome.REJECTED, f"batch {message.batch} has no manifest in "
                      "the store: no one submitted it; nothing done")
    except (IntegrityError, ConfigError) as exc:
        return Result(message.job, Outcome.REJECTED, f"batch {message.batch}: {exc}")
    if submit is not None and submit.state is SubmitState.ABORTED:
        return Result(message.job, Outcome.REJECTED, f"batch {message.batch} was aborted "
                      f"({submit.reason}); nothing done")
    try:
        return manifest.job(message.job).for_message(message)
    except (NotFound, ValidationError) as exc:
        return Result(message.job, Outcome.REJECTED, f"{exc}; nothing done")


def run_message(ctx: WorkerContext, raw: Any) -> Result:
    job = resolve(ctx, raw)
    return job if isinstance(job, Result) else run_job(ctx, job)


def run_job(ctx: WorkerContext, job: Job) -> Result:
    admitted = admit(ctx, job)
    if isinstance(admitted, Result):
        return admitted
    job, held, takeover = admitted
    # 3. start (in the body, once its inputs are checked): one compare-and-set; a delivery that
    # lost the race to another worker stops there. 4. run it.
    body = {Stage.FULL: split.run_full, Stage.BASE: split.run_base,
            Stage.REFINER: split.run_refiner, Stage.PAIR: split.run_pair}[job.stage]
    run = Run(ctx, job, held)
    return guarded(run, lambda: body(run, takeover))


def admit(ctx: WorkerContext, job: Job) -> tuple[Job, Held, str | None] | Result:
    """2. The record decides whether there is anything left to do: the job (re-planned as its
    record says), the record held, and what its start takes over (see _admit); or the Result
    that ends the message here (rejected, a duplicate, canceled, put back)."""
    held = lifecycle.read(ctx.store, job.batch, job.id)
    job = job.replanned(held.record.replanned)
    if ctx.vram_class and job.stage_class > ctx.vram_class:
        return Result(job.id, Outcome.REJECTED, f"job {job.id} needs a {job.stage_class} GB "
                      f"worker for its {job.stage} stage; this one is {ctx.vram_class} GB")
    needed: dict[Stage, list[str | None]] = {
        Stage.FULL: [job.spec.model], Stage.BASE: [job.spec.model],
        Stage.REFINER: [job.spec.refiner], Stage.PAIR: [job.spec.model, job.spec.refiner]}
    missing = [m for m in needed[job.stage] if m not in ctx.models]
    if missing:
        return Result(job.id, Outcome.REJECTED, f"worker {ctx.name} does not serve model "
                      f"{missing[0]}; nothing done")
    if held.record.state.final:
        log.info("job %s is already %s; skipping the duplicate", job.id, held.record.state.value)
        ctx.tally(held.record)   # its writer may have died before counting it
        return Result(job.id, Outcome.DUPLICATE)
    if ctx.canceled(job.id, job.batch):
        return cancel(ctx, job, held, "canceled before it started")
    admitted = _admit(ctx, job, held)
    if isinstance(admitted, Result):
        return admitted
    return job, held, admitted


def guarded(run: Run, body: Callable[[], T]) -> T | Result:
    """Run (part of) a stage body and route how it ends: a superseded attempt keeps nothing,
    a dead-lettered start is failed, a cancel is recorded, every other failure is classified
    and routed (worker/attempt.py)."""
    ctx, job = run.ctx, run.job
    try:
        return body()
    except Superseded as exc:
        log.warning("job %s: %s; this attempt's result is discarded", job.id, exc)
        return Result(job.id, Outcome.SUPERSEDED, str(exc))
    except StageEnded as ended:
        return Result(job.id, Outcome.FAILED, ended.record.error, fault=Fault.WORKER)
    except JobCanceled:
        latest = lifecycle.read(ctx.store, job.batch, job.id)
        return cancel(ctx, job, latest, "canceled while running")
    except Exception as exc:  # noqa: BLE001 - every failure is classified and routed
        return fail(run, classify(exc), f"{job.stage} stage: {describe(exc)}")


def _admit(ctx: WorkerContext, job: Job, held: Held) -> str | None | Result:
    """Whether this worker runs the stage: None (a fresh start), the name of the dead worker
    whose stage it takes over, "" (it takes over an attempt a live process gave up), or the
    Result that says why not."""
    record = held.record
    if job.stage is Stage.REFINER and record.state not in (JobState.LATENTS_READY,
                                                           JobState.REFINING):
        return Result(job.id, Outcome.REJECTED, f"refiner stage of {job.id} arrived while the "
                      f"job is {record.state.value}; nothing to refine")
    if job.stage is Stage.BASE and record.state in (JobState.LATENTS_READY, JobState.REFINING):
        done = split.base_done(ctx, job, record)
        if done is not None:
            return done
    if ctx.name in lifecycle.failed_workers(record, job.stage) and ctx.others_serve(job):
        # a worker fault here before: the job deserves another worker, which exists
        time.sleep(min(1.0, ctx.settings.heartbeat_interval))
        ctx.enqueue(job)
        return Result(job.id, Outcome.PUT_BACK, "failed on this worker before; queued again "
                      "for another")
    if not record.state.active:
        return None
    holder = record.worker or "?"
    if holder != ctx.name and ctx.holds(holder, job.id):
        log.info("job %s is running on live worker %s; skipping the duplicate", job.id, holder)
        return Result(job.id, Outcome.DUPLICATE, f"running on live worker {holder}")
    # the process that ran it: this one (an attempt it gave up, for the broker or store), one
    # still alive (the same), or one that died, though its name may live on in a restart
    running = Stage.REFINER if record.state is JobState.REFINING else job.stage
    incarnation = record.stages.get(running, {}).get("incarnation")
    if holder == ctx.name and incarnation == ctx.incarnation:
        return ""
    if holder != ctx.name and ctx.alive(holder, incarnation):
        return ""
    return holder


def package_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("farm", "torch", "diffusers", "transformers", "accelerate", "celery"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


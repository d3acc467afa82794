"""The ensemble of expert denoisers, across workers: the base half, the refiner half, and both
on one worker.

    base     denoise to `switch` → latents. Split policy "auto" and this worker serves the
             refiner too (at a class the refiner stage fits): continue here, in memory.
             Otherwise write the handoff object (worker/handoff.py) and enqueue the refiner.
    refiner  read and verify the handoff, finish, write the images, delete the intermediate.
             A failure retries only this stage, from the stored latents, up to
             MAX_REFINER_ATTEMPTS; the base never runs again.
    pair     split policy "never": both halves here, no store round-trip.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from farm.errors import AlreadyExists, FarmError, IntegrityError, NotFound, RetryableError
from farm.jobs import Job, JobState
from farm.records import JobRecord, write_record
from farm.worker import handoff
from farm.worker.drain import HandBack, InFlight
from farm.worker.outputs import write_images
from farm.worker.stage import (
    JobCanceled,
    Outcome,
    StageFailed,
    WorkerContext,
    begin_inflight,
    drop_checkpoint,
    finish_stage,
    hand_back,
    load_checkpoint,
    note_resume,
    start,
    succeed,
    superseded,
)

log = logging.getLogger("farm.worker")

MAX_REFINER_ATTEMPTS = 3


def run_base(ctx: WorkerContext, job: Job, record: JobRecord) -> Outcome:
    spec = job.spec
    key = handoff.handoff_key(job)
    if record.state in (JobState.LATENTS_READY, JobState.REFINING) and ctx.store.exists(key):
        # a second delivery of a base stage that already handed off: only make sure the
        # refiner stage is queued (it is idempotent too)
        _enqueue_refiner(ctx, job)
        return Outcome(job.id, "latents_ready")
    base = ctx.models[spec.model]
    resume = load_checkpoint(ctx, job, base)
    record = start(ctx, job, record, "base", base)
    record = note_resume(ctx, job, record, "base", resume)
    inflight = begin_inflight(ctx, "base", resume)
    latents, generators = [], []
    try:
        for k, seed in enumerate(spec.image_seeds()):
            def track(generator: Any, first_step: int, k: int = k) -> None:
                inflight.begin_image(k, generator, first_step)

            lat, gen = ctx.backend.denoise_base(base, spec, seed, callback=ctx.step,
                                                resume=(resume or {}).get(k), track=track)
            latents.append(lat)
            generators.append(gen)
    except JobCanceled:
        raise
    except HandBack as back:
        return hand_back(ctx, job, record, "base", base, back.inflight)
    except Exception as exc:  # noqa: BLE001 - the job fails with the base's error
        log.exception("base stage of %s failed", job.id)
        raise StageFailed(record, f"base stage: {type(exc).__name__}: {exc}") from None
    ctx.inflight = None
    record = replace(record, stages=finish_stage(record, "base"))

    here = (spec.split == "auto" and spec.refiner in ctx.models
            and ctx.vram_class >= (job.refiner_vram_class or 0))
    if here:
        record = record.to(JobState.LATENTS_READY)
        write_record(ctx.store, record)
        drop_checkpoint(ctx, job)
        states = [g.get_state() for g in generators]
        return _refine(ctx, job, record, latents, states, handed_off=False)
    _store_handoff(ctx, job, base, latents, generators, record)
    record = record.to(JobState.LATENTS_READY)
    write_record(ctx.store, record)
    _enqueue_refiner(ctx, job)
    drop_checkpoint(ctx, job)
    return Outcome(job.id, "latents_ready")


def run_refiner(ctx: WorkerContext, job: Job, record: JobRecord) -> Outcome:
    if record.state not in (JobState.LATENTS_READY, JobState.REFINING):
        return Outcome(job.id, "rejected", f"refiner stage of {job.id} arrived while the job "
                       f"is {record.state.value}; nothing to refine")
    key = handoff.handoff_key(job)
    try:
        data = ctx.store.get(key)
    except NotFound:
        raise StageFailed(record, f"refiner stage: the latents at {key} are missing; the "
                                  "base stage's output is gone, resubmit the job") from None
    try:
        stored = handoff.decode(data, job)
    except IntegrityError as exc:
        raise StageFailed(record, f"refiner stage: {exc}") from None
    return _refine(ctx, job, record, stored.latents, stored.generator_states, handed_off=True)


def run_pair(ctx: WorkerContext, job: Job, record: JobRecord) -> Outcome:
    spec = job.spec
    assert spec.refiner is not None  # Job.decode allows the pair stage only with a refiner
    base, refiner = ctx.models[spec.model], ctx.models[spec.refiner]
    record = start(ctx, job, record, "pair", base)
    try:
        t0 = time.perf_counter()
        pictures = ctx.backend.ensemble(base, refiner, spec)
        render_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        log.exception("job %s failed", job.id)
        raise StageFailed(record, f"{type(exc).__name__}: {exc}") from None
    record = replace(record, stages=finish_stage(record, "pair"))
    t1 = time.perf_counter()
    keys = write_images(ctx, job, record, refiner, pictures, render_s,
                        extra={"model_hash": base.weights_hash,
                               "refiner_hash": refiner.weights_hash})
    return succeed(ctx, record, keys, render_s, time.perf_counter() - t1)


def _refine(ctx: WorkerContext, job: Job, record: JobRecord, latents: list[Any],
            generator_states: list[Any], *, handed_off: bool) -> Outcome:
    import torch

    spec = job.spec
    assert spec.refiner is not None  # Job.decode allows refiner stages only with a refiner
    refiner = ctx.models[spec.refiner]
    record = start(ctx, job, record, "refiner", refiner)
    inflight = ctx.inflight = InFlight(stage="refiner")  # the drain follows its steps
    try:
        t0 = time.perf_counter()
        pictures = []
        for k, (lat, state) in enumerate(zip(latents, generator_states, strict=True)):
            gen = torch.Generator("cpu")
            gen.set_state(state)
            inflight.begin_image(k, gen)
            pictures.append(ctx.backend.refine(refiner, spec, lat, gen, callback=ctx.step))
        render_s = time.perf_counter() - t0
        ctx.step(None, -1, None, {})  # canceled during the last step: write nothing
    except JobCanceled:
        raise
    except HandBack:
        return _hand_back_refiner(ctx, job, record, latents, generator_states, handed_off)
    except Exception as exc:  # noqa: BLE001
        log.exception("refiner stage of %s failed", job.id)
        return _retry_refiner(ctx, job, record, f"{type(exc).__name__}: {exc}", latents,
                              generator_states, handed_off)
    finally:
        ctx.inflight = None
    record = replace(record, stages=finish_stage(record, "refiner"))
    base_hash = record.stages.get("base", {}).get("model_hash", "")
    t1 = time.perf_counter()
    keys = write_images(ctx, job, record, refiner, pictures, render_s,
                        extra={"model_hash": base_hash, "refiner_hash": refiner.weights_hash,
                               "handed_off": handed_off})
    write_s = time.perf_counter() - t1
    outcome = succeed(ctx, record, keys, render_s, write_s)
    if handed_off:
        # the intermediate has served its purpose; failures keep theirs (see `farm clean`)
        try:
            ctx.store.delete(handoff.handoff_key(job))
        except FarmError as exc:
            log.warning("could not delete the latents of %s: %s", job.id, exc)
    return outcome


def _retry_refiner(ctx: WorkerContext, job: Job, record: JobRecord, error: str,
                   latents: list[Any], generator_states: list[Any],
                   handed_off: bool) -> Outcome:
    """Only the refiner stage is retried, from stored latents, up to MAX_REFINER_ATTEMPTS."""
    attempts = record.stages.get("refiner", {}).get("attempts", 1)
    if attempts >= MAX_REFINER_ATTEMPTS:
        raise StageFailed(record, f"refiner stage failed {attempts} times; last: {error}")
    if not handed_off:  # it ran in memory after the base: store the latents for the retry
        _store_handoff(ctx, job, ctx.models[job.spec.model], latents,
                       _generators(generator_states), record)
    record = record.to(JobState.LATENTS_READY, error=f"refiner attempt {attempts}: {error}")
    write_record(ctx.store, record)
    _enqueue_refiner(ctx, job)
    return Outcome(job.id, "retrying", error)


def _hand_back_refiner(ctx: WorkerContext, job: Job, record: JobRecord, latents: list[Any],
                       generator_states: list[Any], handed_off: bool) -> Outcome:
    """The worker is stopping and the refiner would not finish in its grace period. Its input,
    the base's latents, is its checkpoint: stored already when the base ran elsewhere, stored
    now when it ran here in memory. The job goes back to latents_ready (this attempt not
    counted) and the refiner stage is queued again, to run from those latents."""
    if superseded(ctx, record):
        return Outcome(job.id, "superseded")
    if not handed_off:
        _store_handoff(ctx, job, ctx.models[job.spec.model], latents,
                       _generators(generator_states), record)
    entry = record.stages.get("refiner", {})
    note = (f"refiner stage handed back on worker {ctx.name}'s shutdown; it runs again from "
            "the base's stored latents")
    back = [*entry.get("handed_back", []), {"worker": ctx.name, "at": time.time()}]
    record = record.to(JobState.LATENTS_READY, note=note, error=None, stages=record.with_stage(
        "refiner", attempts=max(0, int(entry.get("attempts", 1)) - 1), handed_back=back))
    write_record(ctx.store, record)
    try:
        _enqueue_refiner(ctx, job)
    except Exception as exc:  # noqa: BLE001 - the message must not be acked without it
        raise RetryableError(f"job {job.id}: could not queue its refiner stage again: {exc}"
                             ) from exc
    log.info("job %s: %s", job.id, note)
    return Outcome(job.id, "handed_back", note)


def _generators(states: list[Any]) -> list[Any]:
    import torch

    gens = []
    for state in states:
        g = torch.Generator("cpu")
        g.set_state(state)
        gens.append(g)
    return gens


def _store_handoff(ctx: WorkerContext, job: Job, base: Any, latents: list[Any],
                   generators: list[Any], record: JobRecord) -> None:
    info = {**record.stages.get("base", {})}
    data = handoff.encode(job, latents, generators, info, base.scheduler_config)
    try:
        ctx.store.put(handoff.handoff_key(job), data, create_once=True)
    except AlreadyExists:
        pass  # a re-run base made the same latents (deterministic); keep the first copy


def _enqueue_refiner(ctx: WorkerContext, job: Job) -> None:
    if ctx.enqueue is None:
        raise RuntimeError("this worker cannot enqueue the refiner stage")
    ctx.enqueue(replace(job, stage="refiner", resume=None))

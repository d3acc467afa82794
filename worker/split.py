"""The stage bodies: full, and the ensemble of expert denoisers across workers (base, refiner,
and both on one worker). Each takes the job's Run (worker/context.py) and what it takes over
(`takeover`, as Run.start reads it); it starts the attempt once its inputs are checked, and ends
in a lifecycle move. A failure it raises is classified and routed by worker/stage.py.

    full     render the images (resuming from a checkpoint when handed back)
    base     denoise to `switch` → latents. Split policy "auto" and this worker serves the
             refiner too (at a class the refiner stage fits): continue here, in memory.
             Otherwise store the handoff (worker/latents.py) and queue the refiner.
    refiner  read and verify the handoff, finish, write the images, delete the intermediate.
             A retry runs only this stage, from the stored latents; the base never runs again.
    pair     split policy "never": both halves here, no store round-trip.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from farm import keys, lifecycle
from farm.errors import AlreadyExists, FarmError, IntegrityError, NotFound, RetryableError
from farm.jobs import Job
from farm.lifecycle import JobRecord, JobState, Stage
from farm.worker.attempt import fail
from farm.worker.context import JobCanceled, Outcome, Result, Run, StageFailed, WorkerContext
from farm.worker.drain import HandBack, ImageState, InFlight
from farm.worker.faults import classify, describe
from farm.worker.outputs import finish

log = logging.getLogger("farm.worker")


def _codec() -> Any:
    """worker/latents.py, which imports torch: only stages that hold latents load it, so a
    stand-in worker (load tests) starts without torch."""
    from farm.worker import latents

    return latents


def _handoff_key(job: Job) -> str:
    return keys.handoff_key(job.batch, job.id)


def run_full(run: Run, takeover: str | None) -> Result:
    ctx, job = run.ctx, run.job
    model, resume = begin_full(run, takeover)
    inflight = _follow(run, resume)
    t0 = time.perf_counter()
    try:
        pictures = ctx.backend.render(model, job.spec, callback=run.step, resume=resume,
                                      track=inflight.begin_image)
    except HandBack as back:
        return _hand_back(run, model, back.inflight)
    render_s = time.perf_counter() - t0
    run.inflight = None
    run.step(None, -1, None, {})  # canceled during the last step: write nothing
    result = finish(run, model, pictures, render_s)
    _drop_checkpoint(run)
    return result


def begin_full(run: Run, takeover: str | None) -> tuple[Any, dict[int, Any] | None]:
    """A full stage's start: its weights checked, its checkpoint read (a handed-back stage),
    the attempt started. Returns the model and the images to resume (None: from the start)."""
    model = run.ctx.models[run.job.spec.model]
    _check_weights(model, run.job.spec.weights)
    resume = _load_checkpoint(run, model)
    run.start(model, takeover)
    _note_resume(run, resume)
    return model, resume


def base_done(ctx: WorkerContext, job: Job, record: JobRecord) -> Result | None:
    """A base message for a job past its base: queue the refiner again when its latents are
    stored (a second delivery), a duplicate while a live worker refines; None when the latents
    were never stored (an in-memory refiner's worker died): the base runs again."""
    holder = record.worker or ""
    if record.state is JobState.REFINING and holder != ctx.name and ctx.holds(holder, job.id):
        return Result(job.id, Outcome.DUPLICATE, f"being refined on live worker {holder}")
    if not ctx.store.exists(_handoff_key(job)):
        return None
    ctx.enqueue(replace(job, stage=Stage.REFINER, resume=None))
    return Result(job.id, Outcome.LATENTS_READY)


def run_base(run: Run, takeover: str | None) -> Result:
    ctx, job = run.ctx, run.job
    spec = job.spec
    base = ctx.models[spec.model]
    _check_weights(base, spec.weights)
    resume = _load_checkpoint(run, base)
    record = run.start(base, takeover)
    _note_resume(run, resume)
    inflight = _follow(run, resume)
    latents, generators = [], []
    try:
        for k, seed in enumerate(spec.image_seeds()):
            def track(generator: Any, first_step: int, k: int = k) -> None:
                inflight.begin_image(k, generator, first_step)

            lat, gen = ctx.backend.denoise_base(base, spec, seed, callback=run.step,
                                                resume=(resume or {}).get(k), track=track)
            latents.append(lat)
            generators.append(gen)
    except HandBack as back:
        return _hand_back(run, base, back.inflight)
    run.inflight = None
    record = replace(run.record, stages=_finish_stage(run.record, Stage.BASE))

    if (spec.split == "auto" and spec.refiner in ctx.models
            and ctx.vram_class >= (job.refiner_vram_class or 0)):
        run.commit(record.to(JobState.LATENTS_READY))
        _drop_checkpoint(run)
        refiner = Run(ctx, replace(job, stage=Stage.REFINER, resume=None), run.held)
        # should the refiner here fail and be retried elsewhere, it starts from these latents
        refiner.on_requeue = lambda: _store_handoff(ctx, job, base, latents, generators,
                                                    refiner.record)
        try:
            return _refine(refiner, latents, [g.get_state() for g in generators],
                           handed_off=False, takeover=None)
        except (JobCanceled, lifecycle.Superseded):
            raise
        except Exception as exc:  # noqa: BLE001 - the refiner's failure, routed as its own
            return fail(refiner, classify(exc), f"refiner stage: {describe(exc)}")
    _store_handoff(ctx, job, base, latents, generators, record)
    run.commit(record.to(JobState.LATENTS_READY))
    ctx.enqueue(replace(job, stage=Stage.REFINER, resume=None))
    _drop_checkpoint(run)
    return Result(job.id, Outcome.LATENTS_READY)


def _check_weights(model: Any, want: str | None) -> None:
    """A job that names its weights (`farm replay`) runs only on those: other weights fail it
    before the stage starts (the job's fault: no worker of this fleet would do better)."""
    have = model.weights_hash
    if want is not None and not have.startswith(want):
        raise StageFailed(f"the job asks for {model.spec.name} with weights sha256:{want[:12]}; "
                          f"this worker's are sha256:{have[:12]} (the fleet serves other weights "
                          "than the job was made with)")


def run_refiner(run: Run, takeover: str | None) -> Result:
    job = run.job
    key = _handoff_key(job)
    try:
        stored = _codec().decode_handoff(run.ctx.store.get(key), job)
    except NotFound:
        raise StageFailed(f"the latents at {key} are missing; the base stage's output is gone, "
                          "resubmit the job") from None
    except IntegrityError as exc:
        raise StageFailed(str(exc)) from None
    return _refine(run, stored.latents, stored.generator_states, handed_off=True, takeover=takeover)


def run_pair(run: Run, takeover: str | None) -> Result:
    ctx, spec = run.ctx, run.job.spec
    assert spec.refiner is not None  # a job has the pair stage only with a refiner
    base, refiner = ctx.models[spec.model], ctx.models[spec.refiner]
    _check_weights(base, spec.weights)
    _check_weights(refiner, spec.refiner_weights)
    run.start(base, takeover)
    t0 = time.perf_counter()
    pictures = ctx.backend.ensemble(base, refiner, spec)
    render_s = time.perf_counter() - t0
    run.held = replace(run.held, record=replace(run.record,
                                                stages=_finish_stage(run.record, Stage.PAIR)))
    return finish(run, refiner, pictures, render_s,
                  extra={"model_hash": base.weights_hash, "refiner_hash": refiner.weights_hash})


def _refine(run: Run, latents: list[Any], generator_states: list[Any], *, handed_off: bool,
            takeover: str | None) -> Result:
    import torch

    ctx, job = run.ctx, run.job
    assert job.spec.refiner is not None  # a job has refiner stages only with a refiner
    refiner = ctx.models[job.spec.refiner]
    _check_weights(refiner, job.spec.refiner_weights)
    run.start(refiner, takeover)
    inflight = run.follow(Stage.REFINER)  # the drain follows its steps
    t0 = time.perf_counter()
    try:
        pictures = []
        for k, (lat, state) in enumerate(zip(latents, generator_states, strict=True)):
            gen = torch.Generator("cpu")
            gen.set_state(state)
            inflight.begin_image(k, gen)
            pictures.append(ctx.backend.refine(refiner, job.spec, lat, gen, callback=run.step))
        run.step(None, -1, None, {})  # canceled during the last step: write nothing
    except HandBack:
        return _hand_back_refiner(run)
    finally:
        run.inflight = None
    render_s = time.perf_counter() - t0
    run.held = replace(run.held, record=replace(
        run.record, stages=_finish_stage(run.record, Stage.REFINER)))
    base_hash = run.record.stages.get(Stage.BASE, {}).get("model_hash", "")
    result = finish(run, refiner, pictures, render_s,
                    extra={"model_hash": base_hash, "refiner_hash": refiner.weights_hash,
                           "handed_off": handed_off})
    if handed_off and result.outcome is Outcome.SUCCEEDED:
        # the intermediate has served its purpose; failures keep theirs (see `farm clean`)
        try:
            ctx.store.delete(_handoff_key(job))
        except FarmError as exc:
            log.warning("could not delete the latents of %s: %s", job.id, exc)
    return result


def _finish_stage(record: JobRecord, stage: Stage) -> dict[str, dict[str, Any]]:
    now = time.time()
    began = record.stages.get(stage, {}).get("started_at", now)
    return record.with_stage(stage, finished_at=now, seconds=round(now - began, 4))


def _store_handoff(ctx: WorkerContext, job: Job, base: Any, latents: list[Any],
                   generators: list[Any], record: JobRecord) -> None:
    info = {**record.stages.get(Stage.BASE, {})}
    data = _codec().encode_handoff(job, latents, generators, info, base.scheduler_config)
    try:
        ctx.store.put(_handoff_key(job), data, create_once=True)
    except AlreadyExists:
        pass  # a re-run base made the same latents (deterministic); keep the first copy


# -- handing a stage back on shutdown, and resuming it (worker/drain.py) ----------------------


def _follow(run: Run, resume: dict[int, Any] | None) -> InFlight:
    """Start following the stage's steps; images a checkpoint had finished count as done."""
    inflight = run.follow(run.job.stage)
    for k, point in (resume or {}).items():
        if point.done:
            inflight.images[k] = ImageState(generator=point.generator(), latents=point.latents,
                                            finished=True)
    return inflight


def _load_checkpoint(run: Run, model: Any) -> dict[int, Any] | None:
    """The images of the checkpoint `job.resume` names, verified; None when the stage has none,
    or it is unusable (then the stage runs from the start: the same image, later)."""
    job = run.job
    if job.resume is None:
        return None
    try:
        return _codec().decode_checkpoint(run.ctx.store.get(job.resume.key), job,
                                       model.weights_hash).images
    except (NotFound, IntegrityError) as exc:
        log.warning("job %s: cannot resume from %s (%s); running the stage from the start",
                    job.id, job.resume.key, exc)
        return None


def _note_resume(run: Run, resume: dict[int, Any] | None) -> None:
    """Record where a handed-back stage resumed (or that its checkpoint was unusable)."""
    job, name = run.job, run.ctx.name
    point = job.resume
    if point is None:
        return
    if resume is None and point.step > 0:
        note = (f"the checkpoint at step {point.step} was unusable; {job.stage} stage run again "
                f"from the start on worker {name}")
        info: dict[str, Any] = {"resumed": None}
    else:
        note = (f"resumed at step {point.step}/{job.spec.steps} of image {point.image + 1}/"
                f"{job.spec.n} on worker {name}")
        info = {"resumed": {"image": point.image, "step": point.step, "worker": name}}
    run.commit(run.record.to(run.record.state, note=note,
                             stages=run.record.with_stage(job.stage, **info)))


def _hand_back(run: Run, model: Any, inflight: InFlight) -> Result:
    """The worker is stopping and the stage would not finish in its grace period: store the
    in-flight latents, put the job back to queued (this attempt not counted), and queue the
    same stage again, resuming from them. The current message is then acked."""
    ctx, job = run.ctx, run.job
    data, point = _codec().encode_checkpoint(job, inflight, model.weights_hash, ctx.name)
    ctx.store.put(point.key, data, content_type="application/octet-stream")
    note = (f"handed back at step {point.step}/{job.spec.steps} of image {point.image + 1}/"
            f"{job.spec.n} on worker {ctx.name}'s shutdown")
    entry = run.record.stages.get(job.stage, {})
    back = [*entry.get("handed_back", []),
            {"worker": ctx.name, "image": point.image, "step": point.step, "at": time.time()}]
    run.commit(lifecycle.hand_back(run.record, job.stage, note, handed_back=back))
    _requeue(run, replace(job, resume=point))
    if job.resume is not None and job.resume.key != point.key:
        _drop_checkpoint(run)
    log.info("job %s: %s", job.id, note)
    return Result(job.id, Outcome.HANDED_BACK, note)


def _hand_back_refiner(run: Run) -> Result:
    """The worker is stopping and the refiner would not finish in its grace period. Its input,
    the base's latents, is its checkpoint (stored first when it ran here in memory). The job
    goes back to latents_ready (this attempt not counted) and the refiner stage is queued."""
    ctx, job = run.ctx, run.job
    run.before_requeue()
    note = (f"refiner stage handed back on worker {ctx.name}'s shutdown; it runs again from "
            "the base's stored latents")
    entry = run.record.stages.get(Stage.REFINER, {})
    back = [*entry.get("handed_back", []), {"worker": ctx.name, "at": time.time()}]
    run.commit(lifecycle.hand_back(run.record, Stage.REFINER, note, handed_back=back))
    _requeue(run, replace(job, resume=None))
    log.info("job %s: %s", job.id, note)
    return Result(job.id, Outcome.HANDED_BACK, note)


def _requeue(run: Run, job: Job) -> None:
    try:
        run.ctx.enqueue(job)
    except Exception as exc:  # noqa: BLE001 - the message must not be acked without it
        raise RetryableError(f"job {job.id}: could not queue its {job.stage} stage again: "
                             f"{exc}") from exc


def _drop_checkpoint(run: Run) -> None:
    """A resumed stage is done: its checkpoint has served (as intermediates do)."""
    if run.job.resume is None:
        return
    try:
        run.ctx.store.delete(run.job.resume.key)
    except FarmError as exc:
        log.warning("could not delete the checkpoint of %s: %s", run.job.id, exc)

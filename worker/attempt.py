"""The end of an attempt that did not succeed: its failure routed through the lifecycle
(farm/lifecycle.py after_failure), the stage queued again when it goes on, or a cancel."""

from __future__ import annotations

import logging
from dataclasses import replace

from farm import lifecycle
from farm.errors import FarmError, RetryableError
from farm.jobs import Job
from farm.lifecycle import Fault, Held, Superseded
from farm.worker.context import Outcome, Result, Run, WorkerContext

log = logging.getLogger("farm.worker")


def fail(run: Run, fault: Fault, error: str) -> Result:
    """Route a failed attempt and queue the stage again if it goes on. Infrastructure trouble
    raises RetryableError: the message goes back on its queue, no attempt counted."""
    ctx, job = run.ctx, run.job
    log.error("job %s: %s stage failed (%s fault): %s", job.id, job.stage, fault, error)
    larger = ctx.larger_class(job.stage_class) if fault is Fault.OOM else None
    record = lifecycle.after_failure(run.record, job.stage, fault, error, ctx.name,
                                     max_attempts=ctx.settings.max_attempts,
                                     larger_class=larger, vram_class=ctx.vram_class)
    if fault is Fault.INFRA:
        try:
            run.commit(record)
        except (FarmError, Superseded):
            pass  # the store may be what failed: this worker holds the job no longer anyway
        raise RetryableError(f"job {job.id}: {error}")
    try:
        run.commit(record)
    except Superseded as exc:
        return Result(job.id, Outcome.SUPERSEDED, str(exc))
    if record.state.final:
        return Result(job.id, Outcome(record.state.value), record.error, fault=fault)
    run.before_requeue()
    ctx.enqueue(replace(job, resume=None).replanned(record.replanned))
    outcome = Outcome.REPLANNED if fault is Fault.OOM else Outcome.RETRYING
    return Result(job.id, outcome, record.note, fault=fault)


def cancel(ctx: WorkerContext, job: Job, held: Held, reason: str) -> Result:
    if not held.record.state.final:
        try:
            lifecycle.commit(ctx.store, held, lifecycle.cancel(held.record, reason, ctx.name),
                             then=ctx.tally)
        except Superseded:
            pass  # someone else moved it on (to canceled, most likely)
    return Result(job.id, Outcome.CANCELED, reason)

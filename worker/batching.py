"""The throughput mode (FARM_BATCH_JOBS > 1): a worker renders several queued jobs that can
share one pipeline call as one batch, each job keeping its own message, record and images.

    1. take     the worker's consumer delivers a full-stage job as usual (the lead); the worker
                then takes up to N - 1 more messages from the same queue (kombu's basic_get:
                each is noted in `unacked` like any delivery) while the next one shares the
                lead's batch key. The first that does not goes back to the head of its queue.
    2. record   the in-flight record (farm/recovery.py) names every message held, so the sweep
                puts them all back should this worker die, and no sweep takes a held one for
                an orphan while it waits for the shared call.
    3. render   each job goes through run_job's own steps (worker/stage.py admit: record read,
                cancel check, admission; the compare-and-set start), then one pipeline call
                renders every started job. A job with an earlier attempt (a retry, or taken
                over from a dead worker) renders alone first. Each ends on its own: its images and sidecar
                (worker/outputs.py, `"batched": jobs in the call`), its final record, its
                tally note; a job canceled meanwhile ends canceled with no images; a failure of
                the call is routed for each job as its own (worker/attempt.py).
    4. ack      each companion's message is acked when its job has ended (put back instead when
                the broker or store failed under it); the lead's is acked by Celery as always.

Why not Celery's prefetch: the solo pool runs a task inside the consumer's delivery callback
(celery/concurrency/solo.py applies it inline), so kombu issues the next BRPOP only after the
task returns; `celery.worker.state.reserved_requests` never holds more than the running task.

A batched image is close to, not bit-identical with, the same job rendered alone on CPU
(batched kernels round differently; worker/render.py render_batch). A job that needs anything
of its own - a refiner, another stage, a checkpoint to resume, the deep feature cache - runs
alone, and so does every job of a worker with FARM_BATCH_JOBS=1.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from farm import recovery
from farm.errors import RetryableError
from farm.jobs import Job
from farm.lifecycle import Stage
from farm.queues import RENDER_TASK
from farm.worker import split, stage
from farm.worker.context import JobCanceled, Result, Run, WorkerContext
from farm.worker.outputs import finish

log = logging.getLogger("farm.worker")

# JobSpec fields each job of a batch keeps its own: everything else goes into one call
OWN_FIELDS = frozenset({"prompt", "negative_prompt", "seed", "n", "priority", "min_vram",
                        "snapped_from"})


def batch_key(job: Job) -> str | None:
    """What jobs must share to render in one pipeline call; None: this job renders alone."""
    spec = job.spec
    if job.stage is not Stage.FULL or job.resume is not None or spec.refiner or spec.deep_cache:
        return None
    shared = {k: v for k, v in spec.to_dict().items() if k not in OWN_FIELDS}
    # all given or all empty: SDXL takes a list of negative prompts, or none (zero embeddings)
    shared["has_negative_prompt"] = bool(spec.negative_prompt)
    return json.dumps(shared, sort_keys=True)


@dataclass
class Taken:
    """A message this worker took beside the lead's, and the job it names."""

    message: Any    # a kombu Message from basic_get: acked (or put back) by this worker
    queue: str
    job: Job

    def held(self) -> dict[str, Any]:
        """Its entry in the in-flight record."""
        return {"tag": self.message.delivery_tag, "queue": self.queue, "job": self.job.id}


class Taker:
    """Takes companion messages off a queue on a kombu connection of its own (the consumer's is
    busy delivering the lead), and acks or puts them back."""

    def __init__(self, app: Any, redis: Any) -> None:
        self.app, self.redis = app, redis
        self._connection: Any = None

    def _channel(self) -> Any:
        if self._connection is None:
            self._connection = self.app.connection_for_read()
            # what it takes goes in the worker's in-flight record all together, beside the
            # lead (Worker._take_companions), not one by one in place of the lead
            self._connection.default_channel.farm_worker = None
        return self._connection.default_channel

    def take(self, ctx: WorkerContext, queue: str, key: str, limit: int) -> list[Taken]:
        """Up to `limit` messages from the head of `queue` whose jobs share `key`."""
        taken: list[Taken] = []
        while len(taken) < limit:
            message = self._channel().basic_get(queue, no_ack=False)
            if message is None:
                break
            job = _job_of(ctx, message)
            if job is None or batch_key(job) != key:
                self.put_back(message, queue)   # the consumer delivers it next, as it would
                break
            taken.append(Taken(message, queue, job))
        return taken

    def ack(self, taken: Taken) -> None:
        taken.message.ack()

    def put_back(self, message: Any, queue: str) -> None:
        """Back to the head of its queue under a fresh tag (farm/recovery.py restore), then
        acked under the old one: kombu forgets it, and nothing else is touched."""
        recovery.restore(self.redis, message.delivery_tag, queue)
        message.ack()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.release()
            self._connection = None


def _job_of(ctx: WorkerContext, message: Any) -> Job | None:
    """The job a render message names, checked against its manifest as the consumer's would
    be; None for anything else (it goes back, and the consumer deals with it)."""
    if message.content_type != "application/json" \
            or (message.headers or {}).get("task") != RENDER_TASK:
        return None   # never decoded here: the consumer rejects what is not JSON
    try:
        raw = message.decode()[0][0]
    except (ValueError, TypeError, IndexError, KeyError):
        return None
    job = stage.resolve(ctx, raw)
    return job if isinstance(job, Job) else None


def run_together(ctx: WorkerContext, jobs: list[Job]) -> list[Result | RetryableError]:
    """Run the full stages of `jobs` (their batch keys equal) with one shared pipeline call:
    each job's end, in order; a RetryableError where the broker or store failed under a job
    (its message goes back on its queue)."""
    ends: dict[int, Result | RetryableError] = {}
    runs: dict[int, Run] = {}
    for i, job in enumerate(jobs):
        try:
            admitted = stage.admit(ctx, job)
            if isinstance(admitted, Result):
                ends[i] = admitted
                continue
            job, held, takeover = admitted
            run = Run(ctx, job, held)
            if takeover is not None or held.record.attempts:
                # tried before (its worker may have died of it: a poison job kills whatever
                # shares its call): alone, before the others start, so that only its own
                # attempts count should it crash this worker too
                ends[i] = stage.guarded(run, lambda run=run, takeover=takeover:
                                        split.run_full(run, takeover))
                continue
            started = stage.guarded(run, lambda run=run, takeover=takeover:
                                    _begin(run, takeover))
        except RetryableError as exc:
            ends[i] = exc
            continue
        if isinstance(started, Result):
            ends[i] = started
        else:
            runs[i] = run
    if runs:
        ends.update(_render(ctx, runs))
    return [ends[i] for i in range(len(jobs))]


def _begin(run: Run, takeover: str | None) -> None:
    split.begin_full(run, takeover)   # no checkpoint: a job to resume renders alone
    return None


def _render(ctx: WorkerContext, runs: dict[int, Run]) -> dict[int, Result | RetryableError]:
    """The shared call, then each job's own end."""
    first = next(iter(runs.values()))
    model = ctx.models[first.job.spec.model]
    step = _stepper(ctx, list(runs.values()))
    error: BaseException | None = None
    pictures: list[list[Any]] = [[] for _ in runs]
    t0 = time.perf_counter()
    try:
        pictures = ctx.backend.render_batch(model, [r.job.spec for r in runs.values()],
                                            callback=step)
    except Exception as exc:  # noqa: BLE001 - each job routes it as its own (stage.guarded)
        error = exc
    render_s = time.perf_counter() - t0
    images = sum(r.job.spec.n for r in runs.values())
    ends: dict[int, Result | RetryableError] = {}
    for (i, run), own in zip(runs.items(), pictures, strict=True):
        share = render_s * run.job.spec.n / images

        def end(run: Run = run, own: list[Any] = own, share: float = share) -> Result:
            if error is not None:
                raise error
            job = run.job
            # canceled while the call ran: the broadcast, or the flag it may not have brought yet
            if ctx.canceled_now(job.id, job.batch) or ctx.canceled_flag(job.id, job.batch):
                raise JobCanceled(job.id)
            return finish(run, model, own, share, {"batched": len(runs)})

        try:
            ends[i] = stage.guarded(run, end)
        except RetryableError as exc:
            ends[i] = exc
    return ends


def _stepper(ctx: WorkerContext, runs: list[Run]) -> Callable[..., dict[str, Any]]:
    """The shared call's step callback: progress (hang detection) and step counts as each job's
    would note them; it stops the call only when every job in it is canceled. A batch is not
    handed back on shutdown: it finishes, or (killed) the sweep puts back all its messages."""

    def step(pipe: Any, step_index: int, timestep: Any,
             kwargs: dict[str, Any]) -> dict[str, Any]:
        ctx.on_progress()
        if step_index >= 0:
            for _ in runs:
                ctx.metrics.stepped()
        if all(ctx.canceled_now(r.job.id, r.job.batch) for r in runs):
            raise JobCanceled(", ".join(r.job.id for r in runs))
        return kwargs

    return step


__all__ = ["OWN_FIELDS", "Taken", "Taker", "batch_key", "run_together"]

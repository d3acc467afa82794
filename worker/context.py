"""What a stage runs with: the worker's context (built whole, once, at start-up) and the run of
one job's stage (a per-job object: the record it holds, its step callback, what it has done)."""

from __future__ import annotations

import enum
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from farm import lifecycle
from farm.jobs import Job
from farm.lifecycle import Fault, Held, JobRecord, Stage
from farm.settings import Settings
from farm.store import Store
from farm.worker.drain import Drain, HandBack, InFlight
from farm.worker.manifests import Manifests
from farm.worker.metrics import WorkerMetrics

# stages a stopping worker hands back: full and base resume from a checkpoint of their
# in-flight latents (RESUMABLE_STAGES); a refiner runs again from the base's stored latents
HANDBACK_STAGES = (Stage.FULL, Stage.BASE, Stage.REFINER)


class Outcome(enum.StrEnum):
    """How a message ended on this worker."""

    SUCCEEDED = "succeeded"
    LATENTS_READY = "latents_ready"   # the base is done; the refiner stage is queued
    FAILED = "failed"
    CANCELED = "canceled"
    RETRYING = "retrying"         # a worker fault: queued again for another worker
    REPLANNED = "replanned"       # out of memory: queued again at a larger class
    HANDED_BACK = "handed_back"   # this worker is stopping: queued again to resume
    PUT_BACK = "put_back"         # failed here before: queued again for another worker
    DUPLICATE = "duplicate"       # the job ended already, or a live worker runs it
    SUPERSEDED = "superseded"     # another attempt took over while this one ran
    REJECTED = "rejected"         # the message names nothing this worker may run

    @property
    def ended(self) -> bool:
        """The job has its final record (a duplicate: some earlier delivery's)."""
        return self in (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CANCELED, Outcome.DUPLICATE)


@dataclass(frozen=True)
class Result:
    job: str | None
    outcome: Outcome
    error: str | None = None
    fault: Fault | None = None

    @property
    def state(self) -> str:
        return self.outcome.value


class JobCanceled(Exception):
    """Raised from the step callback when `farm cancel` named the job or its batch."""


def _never(*_: Any) -> bool:
    return False


def _ignore(record: JobRecord) -> None:
    return None


def _cannot_enqueue(job: Job) -> None:
    raise RuntimeError("this worker cannot enqueue stages")


@dataclass
class WorkerContext:
    """What a job needs from its worker: settings, the store, the warm models and the backend
    that renders with them, its identity, and its links to the broker."""

    settings: Settings
    store: Store
    models: dict[str, Any]
    backend: Any            # farm.worker.pipelines, or a stand-in for load tests
    name: str
    host: str = field(default_factory=socket.gethostname)
    versions: dict[str, str] = field(default_factory=dict)
    threads: int = 0        # torch threads on CPU (pixels depend on it); 0 = torch's default
    vram_class: int = 0     # the class this worker declared
    # puts a stage on its queue (the refiner after the base; a retry; a hand-back)
    enqueue: Callable[[Job], None] = _cannot_enqueue
    # True when `farm cancel` named any of these ids (the job, its batch): `canceled` asks
    # Redis (before a stage), `canceled_now` a local set fed by a broadcast (after each step)
    canceled: Callable[..., bool] = _never
    canceled_now: Callable[..., bool] = _never
    # the flags in Redis, always asked (the end of a shared pipeline call, worker/batching.py:
    # a cancel its broadcast has not brought yet still ends the job canceled)
    canceled_flag: Callable[..., bool] = _never
    # holds(worker, job): that worker is alive and running that job; alive(worker,
    # incarnation): that worker beats, as that process (a restart under the same name is not)
    holds: Callable[[str, str], bool] = _never
    alive: Callable[[str, str | None], bool] = _never
    # another live worker serves the queue this job's stage goes to
    others_serve: Callable[[Job], bool] = _never
    # hears every record this worker wrote, or found final (the batch's tally, farm/tally.py)
    tally: Callable[[JobRecord], None] = _ignore
    # called after every denoising step (hang detection)
    on_progress: Callable[[], None] = lambda: None
    # the worker's stop request (SIGTERM) and its grace period
    drain: Drain | None = None
    manifests: Manifests | None = None   # built from the store when not given
    # this worker process, told apart from an earlier one under the same name (a container
    # restarted in its pod keeps its hostname, and its pid is often 1 again)
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # the worker's Prometheus metrics (worker/metrics.py); unserved unless the worker serves it
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)

    def __post_init__(self) -> None:
        if self.manifests is None:
            self.manifests = Manifests(self.store, self.settings)

    def larger_class(self, vram_class: int) -> int | None:
        """The next class above `vram_class` this farm routes to (out-of-memory re-plans)."""
        return next((c for c in sorted(self.settings.vram_classes) if c > vram_class), None)

    def stage_info(self, model: Any) -> dict[str, Any]:
        """Who runs a stage, for the record and the sidecar."""
        return {"worker": self.name, "incarnation": self.incarnation, "host": self.host,
                "device": str(model.device), "vram_class": self.vram_class,
                "profile": getattr(model, "profile", ""), "model_hash": model.weights_hash}


class Run:
    """One stage of one job on this worker: the record it holds (every write a compare-and-set
    on it), the step callback, and what the stage has done so far (for a hand-back)."""

    def __init__(self, ctx: WorkerContext, job: Job, held: Held) -> None:
        self.ctx, self.job, self.held = ctx, job, held
        self.inflight: InFlight | None = None
        # called before the stage is queued again (a refiner that ran in memory stores the
        # base's latents first, for the retry to start from)
        self.on_requeue: Callable[[], None] | None = None

    @property
    def record(self) -> JobRecord:
        return self.held.record

    def commit(self, new: JobRecord) -> JobRecord:
        """Write `new` over the record this run holds (Superseded when someone else wrote)."""
        self.held = lifecycle.commit(self.ctx.store, self.held, new, then=self.ctx.tally)
        return self.held.record

    def start(self, model: Any, takeover: str | None) -> JobRecord:
        """The stage starts here: one counted attempt. `takeover` (from worker/stage.py's
        admission) names the dead worker whose attempt this replaces (recorded as its fault),
        or is "" for an attempt a live process gave up (not counted); None: a fresh start."""
        record = lifecycle.start(self.record, self.job.stage, self.ctx.name,
                                 self.ctx.stage_info(model),
                                 max_attempts=self.ctx.settings.max_attempts,
                                 dead=takeover or None, abandoned=takeover == "")
        self.commit(record)
        if takeover:
            self.ctx.metrics.took_over(self.job.stage.value)
        if record.state.final:  # dead-lettered: the dead workers' attempts ran out
            raise StageEnded(record)
        return record

    def before_requeue(self) -> None:
        if self.on_requeue is not None:
            self.on_requeue()

    def follow(self, stage: Stage) -> InFlight:
        self.inflight = InFlight(stage=stage.value)
        return self.inflight

    def step(self, pipe: Any, step_index: int, timestep: Any,
             kwargs: dict[str, Any]) -> dict[str, Any]:
        """After every denoising step: note progress, stop at once if canceled, and hand the
        stage back if the worker is stopping and the stage will not finish in its grace."""
        ctx, job = self.ctx, self.job
        ctx.on_progress()
        if step_index >= 0:
            ctx.metrics.stepped()
        if ctx.canceled_now(job.id, job.batch):
            raise JobCanceled(job.id)
        inflight = self.inflight
        if inflight is not None and step_index >= 0:
            inflight.note_step(pipe, step_index, kwargs)
            if (ctx.drain is not None and ctx.drain.requested
                    and job.stage in HANDBACK_STAGES and kwargs.get("latents") is not None
                    and at_full_step(inflight, job)
                    and ctx.drain.must_hand_back(inflight.steps_left(job.spec.n),
                                                 inflight.seconds_per_step())):
                raise HandBack(inflight)
        return kwargs


def at_full_step(inflight: InFlight, job: Job) -> bool:
    """Whether the image's next step runs the whole UNet in the uninterrupted render too. A job
    with the deep feature cache (worker/deepcache.py) hands back only there: a resumed image
    starts with a full step, so resuming anywhere else would change its pixels. It costs at
    most deep_cache - 1 steps of the grace period."""
    if not job.spec.deep_cache or job.stage == Stage.REFINER:
        return True
    image = inflight.images.get(inflight.current)
    return image is None or image.done % job.spec.deep_cache == 0


class StageEnded(Exception):
    """The stage cannot run: its record went final when it started (dead-lettered)."""

    def __init__(self, record: JobRecord) -> None:
        super().__init__(record.error or record.state.value)
        self.record = record


class StageFailed(Exception):
    """The stage body's own verdict on a failure, with its fault (e.g. the refiner's latents
    are gone or corrupt: the job's fault)."""

    def __init__(self, message: str, fault: Fault = Fault.JOB) -> None:
        super().__init__(message)
        self.fault = fault

"""A job's lifecycle, written down once: its states, the moves between them, who makes each, what
happens after each kind of failure, and the one way a job record is written.

    queued ──► running ─────────────────────────────────► succeeded
      ▲          │  └──► latents_ready ──► refining ──────┘
      └──────────┘            ▲               │
     (handed back, retried,   └───────────────┘ (the refiner handed back or retried)
      re-planned)
    any unfinished state ──────────────────────────────► failed | canceled

    move                          who                 when
    queued → running              a worker            it starts a full, base or pair stage
    running → running             a worker            it takes over the stage of a worker that
                                                      died (the death is the dead one's failure)
    latents_ready → refining      a worker            it starts the refiner stage
    latents_ready/refining        a worker            the base runs again: its latents were in
      → running                                       memory only, and their worker died
    running → latents_ready       the base's worker   the base's latents are stored
    running/refining → back       the stage's worker  handed back: its worker is stopping, the
                                                      broker or store failed (infra), a worker
                                                      fault to retry elsewhere, out of memory
    running/refining → succeeded  the stage's worker  its images are written
    any → failed                  the stage's worker  a job error; a worker fault past
                                                      FARM_MAX_ATTEMPTS (dead-lettered)
    any → canceled                `farm cancel`, or the worker that sees the cancel first

succeeded, failed and canceled are final. Every write is a compare-and-set on the record that
was read (`commit`): a writer whose record is stale (a worker presumed dead that was not, a
second delivery) gets Superseded and writes nothing.

Failures are classified (`Fault`) and each kind has one route (`after_failure`):
    infra   the broker, store or network: back on the queue, no attempt counted
    worker  a CUDA error, a crash, a hang, a kill: retried on another worker, each failed attempt
            recorded with its worker; after FARM_MAX_ATTEMPTS the job fails as the workers' fault
    oom     out of memory: re-planned to the next larger VRAM class, no attempt counted
    job     the input cannot be rendered: fails at once with its reason
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from farm import keys
from farm.errors import AlreadyExists, Conflict, IntegrityError, NotFound
from farm.store import Store, get_json, put_json


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    LATENTS_READY = "latents_ready"
    REFINING = "refining"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        """A stage of the job is running on some worker."""
        return self in (JobState.RUNNING, JobState.REFINING)

    def can_become(self, new: JobState) -> bool:
        return new in TRANSITIONS[self]


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})
_END = frozenset({JobState.FAILED, JobState.CANCELED})
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING}) | _END,
    JobState.RUNNING: frozenset({JobState.RUNNING, JobState.SUCCEEDED, JobState.LATENTS_READY,
                                 JobState.QUEUED}) | _END,
    # → running: the base runs again when its latents were never stored (its worker died
    # between the base and a refiner it ran in memory)
    JobState.LATENTS_READY: frozenset({JobState.REFINING, JobState.RUNNING}) | _END,
    JobState.REFINING: frozenset({JobState.REFINING, JobState.SUCCEEDED, JobState.LATENTS_READY,
                                  JobState.RUNNING}) | _END,
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELED: frozenset(),
}


class Stage(enum.StrEnum):
    """What one message asks a worker to run (the README's "Split base → refiner")."""

    FULL = "full"         # no refiner: render the images
    BASE = "base"         # denoise to `switch`, then hand the latents to a refiner
    REFINER = "refiner"   # finish from the stored latents
    PAIR = "pair"         # base and refiner on one worker, no store round-trip

    @property
    def running_state(self) -> JobState:
        return JobState.REFINING if self is Stage.REFINER else JobState.RUNNING

    @property
    def waiting_state(self) -> JobState:
        """Where the job waits for this stage to run (again)."""
        return JobState.LATENTS_READY if self is Stage.REFINER else JobState.QUEUED


class Fault(enum.StrEnum):
    """Whose fault a failed attempt was; each kind has one route (`after_failure`)."""

    INFRA = "infra"
    WORKER = "worker"
    OOM = "oom"
    JOB = "job"


class Superseded(Exception):
    """The record changed since it was read: another writer won; this one wrote nothing."""


@dataclass(frozen=True)
class JobRecord:
    job: str
    batch: str
    state: JobState = JobState.QUEUED
    attempts: int = 0          # stage attempts started, all stages together
    worker: str | None = None  # who ran (or runs) the latest attempt
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    images: list[str] = field(default_factory=list)
    error: str | None = None
    error_kind: str | None = None   # a failed job: Fault.JOB or Fault.WORKER (or OOM)
    # what happened that is not an error: "handed back at step 37/150 on worker w-1's shutdown"
    note: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # per stage: worker, host, vram_class, profile, attempts (counted ones), started_at, ...
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    # every failed attempt: stage, attempt, worker, kind (a Fault), error, at
    failures: list[dict[str, Any]] = field(default_factory=list)
    # stage -> the VRAM class it was re-planned to after running out of memory
    replanned: dict[str, int] = field(default_factory=dict)
    # how many times the record was written: `commit` adds one, so the batch's state counters
    # (farm/tally.py) apply a late update of an older write never over a newer one
    seq: int = 0

    def with_stage(self, stage: str, **info: Any) -> dict[str, dict[str, Any]]:
        """`stages` with `stage`'s entry updated by `info`."""
        return {**self.stages, stage: {**self.stages.get(stage, {}), **info}}

    def stage_attempts(self, stage: str) -> int:
        return int(self.stages.get(stage, {}).get("attempts", 0))

    def to(self, state: JobState, **changes: Any) -> JobRecord:
        """The next record in the lifecycle; refuses a move this module does not allow."""
        if not self.state.can_become(state) and not (state == self.state and not state.final):
            raise ValueError(f"job {self.job} cannot go from {self.state.value} to {state.value}")
        return replace(self, state=state, updated_at=time.time(), **changes)

    def encode(self) -> dict[str, Any]:
        # shallow: JSON encoding reads the nested dicts and lists as they are, and asdict's deep
        # copy of them cost more than the record's write on the stand-in's hot path
        data = {name: getattr(self, name) for name in _RECORD_FIELDS}
        data["state"] = self.state.value
        return data

    @classmethod
    def decode(cls, data: Any) -> JobRecord:
        try:
            values = dict(data)
            values["state"] = JobState(values["state"])
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in values.items() if k in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"a job record is malformed: {exc}") from None


_RECORD_FIELDS = tuple(f.name for f in fields(JobRecord))


@dataclass(frozen=True)
class Held:
    """A record as read, with the version a write must still find (None: none stored yet)."""

    record: JobRecord
    version: str | None


def read(store: Store, batch: str, job: str) -> Held:
    """The job's record and its version; a job without one is queued (version None)."""
    try:
        data, version = store.get_versioned(keys.record_key(batch, job))
    except NotFound:
        return Held(JobRecord(job=job, batch=batch), None)
    import json

    try:
        return Held(JobRecord.decode(json.loads(data)), version)
    except ValueError as exc:
        raise IntegrityError(f"the record of {job} is not valid JSON: {exc}") from None


def commit(store: Store, held: Held, new: JobRecord,
           then: Callable[[JobRecord], Any] | None = None) -> Held:
    """Write `new` over the record `held` read, only if nobody wrote it since: else Superseded.
    A final record is never written over. `then` hears the written record, only when this
    write won (the batch's state counters, farm/tally.py: a lost compare-and-set never counts)."""
    if held.record.state.final:
        raise Superseded(f"job {held.record.job} is already {held.record.state.value}")
    new = replace(new, seq=held.record.seq + 1)
    key = keys.record_key(new.batch, new.job)
    try:
        version = put_json(store, key, new.encode(), create_once=held.version is None,
                           if_match=held.version)
    except (Conflict, AlreadyExists):
        raise Superseded(f"the record of {new.job} changed since it was read") from None
    if then is not None:
        then(new)
    return Held(new, version)


def read_record(store: Store, batch: str, job: str) -> JobRecord | None:
    """The stored record, for readers that write nothing (status, results, clean)."""
    try:
        return JobRecord.decode(get_json(store, keys.record_key(batch, job)))
    except NotFound:
        return None


# -- the moves a worker makes -------------------------------------------------------------------


def start(record: JobRecord, stage: Stage, worker: str, info: dict[str, Any], *,
          max_attempts: int, dead: str | None = None, abandoned: bool = False) -> JobRecord:
    """The record of `stage` starting on `worker` (one more counted attempt). `dead` names the
    worker that held the stage when it died: its attempt is recorded as a worker fault, and a
    stage whose attempts reach `max_attempts` so is dead-lettered (a failed record) instead.
    `abandoned`: the running attempt this one replaces was given up by a live process (the
    broker or store failed under it) and does not count."""
    now = time.time()
    if dead is not None:
        record = _failed_attempt(record, stage, Fault.WORKER, dead,
                                 f"worker {dead} died running the {stage} stage (its heartbeat "
                                 "stopped)", now)
        done = record.stage_attempts(stage)
        if done >= max_attempts:
            return _dead_letter(record, stage, now)
    state = stage.running_state
    counted = record.stage_attempts(stage) + (0 if abandoned and dead is None else 1)
    return record.to(state, attempts=record.attempts + 1, worker=worker, error=None,
                     started_at=record.started_at or now,
                     stages=record.with_stage(stage, **info, attempts=max(1, counted),
                                              started_at=now))


def after_failure(record: JobRecord, stage: Stage, fault: Fault, error: str, worker: str, *,
                  max_attempts: int, larger_class: int | None = None,
                  vram_class: int = 0) -> JobRecord:
    """The record after this attempt of `stage` failed for `fault`. An unfinished result means
    the stage must be queued again (at `replanned[stage]` when it was re-planned)."""
    now = time.time()
    if fault is Fault.INFRA:
        return _uncounted(record, stage, f"{stage} stage handed back by worker {worker}: the "
                          f"broker or store failed ({error}); not counted as an attempt")
    if fault is Fault.OOM:
        if larger_class is None:
            failed = _failed_attempt(record, stage, fault, worker, error, now)
            return failed.to(JobState.FAILED, error=f"out of memory on a {vram_class} GB worker "
                             f"and no larger class can run it: {error}", error_kind=fault.value,
                             finished_at=now)
        back = _uncounted(record, stage, f"out of memory on worker {worker} ({vram_class} GB): "
                          f"re-planned to the {larger_class} GB class")
        return replace(back, replanned={**record.replanned, stage.value: larger_class},
                       failures=[*record.failures, _failure(record, stage, fault, worker, error,
                                                            now)])
    failed = _failed_attempt(record, stage, fault, worker, error, now)
    if fault is Fault.JOB:
        return failed.to(JobState.FAILED, error=error, error_kind=fault.value, finished_at=now)
    if failed.stage_attempts(stage) >= max_attempts:
        return _dead_letter(failed, stage, now)
    return failed.to(stage.waiting_state, error=None,
                     note=f"attempt {failed.stage_attempts(stage)} of the {stage} stage failed on "
                          f"worker {worker} ({error}); retried on another worker")


def hand_back(record: JobRecord, stage: Stage, note: str, **entry: Any) -> JobRecord:
    """The stage goes back to wait for another worker; this attempt is not counted."""
    back = _uncounted(record, stage, note)
    return replace(back, stages=back.with_stage(stage, **entry))


def succeed(record: JobRecord, images: list[str], timings: dict[str, float]) -> JobRecord:
    now = time.time()
    return record.to(JobState.SUCCEEDED, images=images, finished_at=now, error=None,
                     timings={**timings, "total_s": round(now - (record.started_at or now), 4)})


def cancel(record: JobRecord, reason: str, worker: str | None = None) -> JobRecord:
    return record.to(JobState.CANCELED, error=reason, finished_at=time.time(),
                     worker=worker or record.worker)


def failed_workers(record: JobRecord, stage: Stage) -> set[str]:
    """The workers on which `stage` failed for a worker fault."""
    return {f["worker"] for f in record.failures
            if f.get("stage") == stage.value and f.get("kind") == Fault.WORKER.value}


def _failure(record: JobRecord, stage: Stage, fault: Fault, worker: str, error: str,
             now: float) -> dict[str, Any]:
    return {"stage": stage.value, "attempt": record.attempts, "worker": worker,
            "kind": fault.value, "error": error, "at": now}


def _failed_attempt(record: JobRecord, stage: Stage, fault: Fault, worker: str, error: str,
                    now: float) -> JobRecord:
    return replace(record, failures=[*record.failures,
                                     _failure(record, stage, fault, worker, error, now)])


def _uncounted(record: JobRecord, stage: Stage, note: str) -> JobRecord:
    attempts = max(0, record.stage_attempts(stage) - 1)
    return record.to(stage.waiting_state, note=note, error=None,
                     stages=record.with_stage(stage, attempts=attempts))


def _dead_letter(record: JobRecord, stage: Stage, now: float) -> JobRecord:
    workers = [f["worker"] for f in record.failures if f.get("stage") == stage.value]
    last = record.failures[-1]["error"] if record.failures else "?"
    return record.to(JobState.FAILED, finished_at=now, error_kind=Fault.WORKER.value,
                     error=f"dead-lettered: the {stage} stage failed {len(workers)} times on "
                           f"workers {', '.join(dict.fromkeys(workers))} (a worker fault each "
                           f"time; last: {last}); see the worker logs")

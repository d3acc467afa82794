"""What the store keeps about a batch: the manifest (written once at submit) and one record per
job (written by the worker that runs it). Together they are the batch's durable record; Redis
only carries the messages.

    batches/<batch>/manifest.json            the request and every job's spec and output keys
    batches/<batch>/jobs/<job>.json          state, attempts, timestamps, worker, error
    batches/<batch>/images/<job>-<k>.png     image k of the job (create-once)
    batches/<batch>/images/<job>-<k>.json    its sidecar: full provenance (create-once)
    batches/<batch>/intermediate/<job>/...   base → refiner latents (worker/handoff.py), and
                                             the checkpoint of a handed-back stage
                                             (worker/checkpoint.py)
    compile-cache/<model>/<key>.bin|.json    compile artefacts for the fleet (worker/compile.py)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from farm.errors import FarmError, IntegrityError, NotFound
from farm.jobs import Job, JobSpec, JobState
from farm.settings import Settings
from farm.store import Store, get_json, put_json

BATCHES = "batches"
# worker/compile.py: compile artefacts shared by the fleet, outside any batch
COMPILE_CACHE = "compile-cache"


def batch_prefix(batch: str) -> str:
    return f"{BATCHES}/{batch}"


def manifest_key(batch: str) -> str:
    return f"{batch_prefix(batch)}/manifest.json"


def record_key(batch: str, job: str) -> str:
    return f"{batch_prefix(batch)}/jobs/{job}.json"


def image_key(batch: str, job: str, k: int) -> str:
    return f"{batch_prefix(batch)}/images/{job}-{k}.png"


def sidecar_key(batch: str, job: str, k: int) -> str:
    return f"{batch_prefix(batch)}/images/{job}-{k}.json"


@dataclass(frozen=True)
class Manifest:
    batch: str
    created_at: float
    source: str                 # the file the prompts came from ("-" for stdin)
    defaults: dict[str, Any]    # the flags given to `farm submit`
    jobs: list[Job]
    aborted: str | None = None  # set when submit failed part-way: workers drop its jobs

    def encode(self) -> dict[str, Any]:
        return {
            "version": 1, "batch": self.batch, "created_at": self.created_at,
            "source": self.source, "defaults": self.defaults, "aborted": self.aborted,
            "jobs": [{"id": j.id, "index": j.index, "spec": j.spec.to_dict(),
                      "vram": j.vram_class, "stage": j.stage,
                      "refiner_vram": j.refiner_vram_class,
                      "images": [image_key(self.batch, j.id, k) for k in range(j.spec.n)]}
                     for j in self.jobs],
        }

    @classmethod
    def decode(cls, data: Any, settings: Settings) -> Manifest:
        try:
            batch = data["batch"]
            jobs = [Job(id=j["id"], batch=batch, index=j["index"],
                        spec=JobSpec.from_dict(j["spec"], settings), vram_class=int(j["vram"]),
                        stage=j.get("stage", "full"), refiner_vram_class=j.get("refiner_vram"))
                    for j in data["jobs"]]
            return cls(batch=batch, created_at=float(data["created_at"]),
                       source=data.get("source", ""), defaults=data.get("defaults", {}),
                       jobs=jobs, aborted=data.get("aborted"))
        except (KeyError, TypeError, ValueError, FarmError) as exc:
            raise IntegrityError(f"the manifest of batch is malformed: {exc}") from None


@dataclass(frozen=True)
class JobRecord:
    job: str
    batch: str
    state: JobState = JobState.QUEUED
    attempts: int = 0
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    images: list[str] = field(default_factory=list)
    error: str | None = None
    # whose fault a failure was: "job" (the work itself raised) or "worker" (workers died)
    error_kind: str | None = None
    # what happened that is not an error: "handed back at step 37/150 on worker w-1's shutdown"
    note: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # per stage ("full", "base", "refiner", "pair"): worker, host, vram_class, profile,
    # attempts, started_at, finished_at, seconds
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def with_stage(self, stage: str, **info: Any) -> dict[str, dict[str, Any]]:
        """`stages` with `stage`'s entry updated by `info`."""
        return {**self.stages, stage: {**self.stages.get(stage, {}), **info}}

    def to(self, state: JobState, **changes: Any) -> JobRecord:
        """The next record in the lifecycle; refuses a move jobs.py does not allow."""
        if state != self.state and not self.state.can_become(state):
            raise ValueError(f"job {self.job} cannot go from {self.state.value} to {state.value}")
        return replace(self, state=state, updated_at=time.time(), **changes)

    def encode(self) -> dict[str, Any]:
        data = asdict(self)
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


def read_manifest(store: Store, batch: str, settings: Settings) -> Manifest:
    try:
        data = get_json(store, manifest_key(batch))
    except NotFound:
        raise NotFound(f"no batch {batch!r} in {store.url}") from None
    return Manifest.decode(data, settings)


def read_record(store: Store, batch: str, job: str) -> JobRecord | None:
    try:
        return JobRecord.decode(get_json(store, record_key(batch, job)))
    except NotFound:
        return None


def write_record(store: Store, record: JobRecord) -> None:
    put_json(store, record_key(record.batch, record.job), record.encode())


def read_records(store: Store, batch: str) -> dict[str, JobRecord]:
    """Every job record of a batch that exists; a job without one is still queued."""
    records = {}
    for key in store.list_keys(f"{batch_prefix(batch)}/jobs/"):
        if key.endswith(".json"):
            try:
                record = JobRecord.decode(get_json(store, key))
            except NotFound:
                continue
            records[record.job] = record
    return records

"""What the store keeps about a batch: its manifest, the authority on what the batch is, and the
job records (farm/lifecycle.py) that say how far each job got. Redis only carries messages
that name jobs of a manifest (farm/jobs.py Message). Keys: farm/keys.py.

A submit is a transaction. Its progress is recorded beside the manifest, in a small object
that moves by compare-and-set (the manifest itself is written create-once and never changes, so
workers read it once per batch):

    submitting ──► submitted          every message was sent
         │  ▲
         ▼  │  (the same `farm submit --batch-id` run again)
       aborted                        the submit failed part-way: workers refuse its messages

The submit object is written before the manifest; a worker refuses the messages of a batch
without one. A batch left `submitting` (its submit was killed) is finished by running the same
submit again with its batch id, or canceled as a whole.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from farm import keys
from farm.errors import ConfigError, FarmError, IntegrityError, NotFound
from farm.jobs import Job, JobSpec
from farm.lifecycle import JobRecord, Stage
from farm.settings import Settings
from farm.store import Store, get_json, put_json


class SubmitState(enum.StrEnum):
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    ABORTED = "aborted"


@dataclass(frozen=True)
class Submit:
    """How far a batch's submit got."""

    batch: str
    state: SubmitState
    jobs: int
    request: str                # sha256 of the request: a retried submit must send the same
    reason: str | None = None   # why it was aborted
    updated_at: float = 0.0
    # when the batch was made: `farm batches` orders by it (ids tell only the second)
    created_at: float = 0.0

    def encode(self) -> dict[str, Any]:
        return {"batch": self.batch, "state": self.state.value, "jobs": self.jobs,
                "request": self.request, "reason": self.reason, "updated_at": self.updated_at,
                "created_at": self.created_at}

    @classmethod
    def decode(cls, data: Any) -> Submit:
        try:
            return cls(batch=str(data["batch"]), state=SubmitState(data["state"]),
                       jobs=int(data["jobs"]), request=str(data.get("request", "")),
                       reason=data.get("reason"), updated_at=float(data.get("updated_at", 0)),
                       created_at=float(data.get("created_at") or data.get("updated_at", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"a submit record is malformed: {exc}") from None

    def to(self, state: SubmitState, reason: str | None = None) -> Submit:
        return replace(self, state=state, reason=reason, updated_at=time.time())


def read_submit(store: Store, batch: str) -> tuple[Submit, str] | None:
    """The batch's submit record and its version; None when the batch has none."""
    try:
        data, version = store.get_versioned(keys.submit_key(batch))
    except NotFound:
        return None
    try:
        return Submit.decode(json.loads(data)), version
    except ValueError as exc:
        raise IntegrityError(f"the submit record of {batch} is not valid JSON: {exc}") from None


def write_submit(store: Store, submit: Submit, version: str | None) -> str:
    """Create the submit record (version None) or move it on (compare-and-set)."""
    return put_json(store, keys.submit_key(submit.batch), submit.encode(),
                    create_once=version is None, if_match=version)


def create_batch(store: Store, manifest: Manifest, state: SubmitState) -> tuple[Submit, str]:
    """Write a new batch: its submit record first, then its manifest (both create-once)."""
    submit = Submit(batch=manifest.batch, state=state, jobs=len(manifest.jobs),
                    request=manifest.request, updated_at=time.time(),
                    created_at=manifest.created_at)
    version = write_submit(store, submit, None)
    put_json(store, keys.manifest_key(manifest.batch), manifest.encode(), create_once=True)
    return submit, version


@dataclass(frozen=True)
class Manifest:
    batch: str
    created_at: float
    source: str                 # the file the prompts came from ("-" for stdin)
    defaults: dict[str, Any]    # the flags given to `farm submit`
    jobs: list[Job]
    # sha256 of the request (its lines and flags): a retried submit must send the same one
    request: str = ""
    # the http(s) URL told when the batch ends (farm/webhook.py); None: nobody
    notify: str | None = None
    # the settings it was planned with that every process must share (farm/fleet.py)
    settings: dict[str, Any] = field(default_factory=dict)
    _index: dict[str, Job] = field(default_factory=dict, compare=False, repr=False)

    def job(self, ident: str) -> Job:
        """The job `ident` of this batch; NotFound when the manifest has no such job."""
        if not self._index:
            self._index.update((j.id, j) for j in self.jobs)
        try:
            return self._index[ident]
        except KeyError:
            raise NotFound(f"batch {self.batch} has no job {ident}") from None

    def encode(self) -> dict[str, Any]:
        return {
            "version": 2, "batch": self.batch, "created_at": self.created_at,
            "source": self.source, "defaults": self.defaults, "request": self.request,
            "notify": self.notify, "settings": self.settings,
            "jobs": [{"id": j.id, "index": j.index, "spec": j.spec.to_dict(),
                      "vram": j.vram_class, "stage": j.stage.value,
                      "refiner_vram": j.refiner_vram_class,
                      "images": [keys.image_key(self.batch, j.id, k) for k in range(j.spec.n)]}
                     for j in self.jobs],
        }

    @classmethod
    def decode(cls, data: Any, settings: Settings) -> Manifest:
        batch = "?"
        try:
            batch = data["batch"]
            jobs = [Job(id=j["id"], batch=batch, index=j["index"],
                        spec=JobSpec.from_dict(j["spec"], settings, stored=True),
                        vram_class=int(j["vram"]),
                        stage=Stage(j.get("stage", "full")),
                        refiner_vram_class=j.get("refiner_vram"))
                    for j in data["jobs"]]
            return cls(batch=batch, created_at=float(data["created_at"]),
                       source=data.get("source", ""), defaults=data.get("defaults", {}),
                       jobs=jobs, request=data.get("request", ""), notify=data.get("notify"),
                       settings=data.get("settings") or {})
        except FarmError as exc:
            differ = _settings_differ(data.get("settings") or {}, settings)
            if differ:
                raise ConfigError(f"the manifest of batch {batch} was planned with other "
                                  f"settings than this process has ({differ}): {exc}") from None
            raise IntegrityError(f"the manifest of batch {batch} is malformed: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"the manifest of batch {batch} is malformed: {exc}") from None


def _settings_differ(planned: dict[str, Any], settings: Settings) -> str:
    """The shared settings a manifest was planned with that differ from `settings`, as
    `FARM_BUCKETS is 64x64 there, 1024x1024 here`; empty when none (or none recorded)."""
    from farm.fleet import shared_settings

    here = json.loads(json.dumps(shared_settings(settings), default=list))
    return "; ".join(f"FARM_{name.upper()} is {_show(value)} there, {_show(here.get(name))} here"
                     for name, value in sorted(planned.items())
                     if name in here and value != here[name])


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def read_manifest(store: Store, batch: str, settings: Settings) -> Manifest:
    try:
        data = get_json(store, keys.manifest_key(batch))
    except NotFound:
        raise NotFound(f"no batch {batch!r} in {store.url}") from None
    return Manifest.decode(data, settings)


# how many records are read at once: S3 answers each GET in 15-30 ms, so one at a time a batch of
# 10,000 takes minutes; boto3's connection pool holds 10 connections by default
READ_THREADS = 10


def read_all(store: Store, batch: str, jobs: list[str]) -> dict[str, JobRecord]:
    """The records of `jobs` that exist, read in parallel (a bounded pool); a job without one
    is still queued."""
    from concurrent.futures import ThreadPoolExecutor

    from farm.lifecycle import read_record

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        found = pool.map(lambda job: read_record(store, batch, job), jobs)
        return {record.job: record for record in found if record is not None}


def read_records(store: Store, batch: str) -> dict[str, JobRecord]:
    """Every job record of a batch that exists; a job without one is still queued."""
    records = {}
    for key in store.list_keys(keys.records_prefix(batch)):
        if key.endswith(".json"):
            try:
                record = JobRecord.decode(get_json(store, key))
            except NotFound:
                continue
            records[record.job] = record
    return records

"""The farm from Python: submit a batch, follow it, take its images as they land, cancel it.

    from farm import Farm

    farm = Farm()                                   # Settings.load(): FARM_* as for the CLI
    batch = farm.submit(["a red fox", {"prompt": "a lighthouse", "seed": 7}], steps=4)
    for result in batch.iter_results():             # each image as its job succeeds
        result.image().save(f"{result.job}-{result.index}.png")

A thin layer over the functions the CLI runs (scheduler/parse.py, submit.py, status.py,
results.py, cancel.py, replay.py): the same checks, the same errors (farm/errors.py: bad input raises
UsageError naming the job and the field), the same store and broker. No torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm import broker, keys
from farm.errors import NotFound, UsageError, ValidationError
from farm.jobs import INPUT_ONLY, JobSpec, is_id
from farm.scheduler.cancel import Canceled, cancel
from farm.scheduler.parse import check_jobs, parse_size
from farm.scheduler.replay import Replay, read_job
from farm.scheduler.results import Succeeded, batch_ended
from farm.scheduler.status import BatchCounts, BatchStatus, batch_counts, batch_status
from farm.scheduler.submit import Submitted, submit
from farm.settings import Settings
from farm.store import DOWNLOAD_THREADS, Store, get_json, open_store

POLL_SECONDS = 0.5   # how often wait() and iter_results() read the batch's state


@dataclass(frozen=True)
class Result:
    """One image of a job that succeeded: its PNG bytes as stored, and its sidecar."""

    job: str
    index: int            # image k of the job
    key: str              # its key in the store
    png: bytes
    sidecar: dict[str, Any]

    def image(self) -> Any:
        """The image as a PIL Image (decoded when asked)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.png))


class Farm:
    """A farm, as the settings (`FARM_*`, or `settings`) name its broker and store."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.load()
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store

    def submit(self, jobs: Iterable[str | Mapping[str, Any] | JobSpec], *,
               batch_id: str | None = None, idempotency_key: str | None = None,
               notify: str | None = None, **defaults: Any) -> Batch:
        """Submit `jobs` (prompts, dicts of job fields, or JobSpecs) as one batch, all or
        nothing. `defaults` are job fields every job gets unless it has its own (model, steps,
        guidance, seed, n, negative_prompt, scheduler, priority, min_vram, refiner, switch,
        split, preset, cfg_cutoff, vae, deep_cache, snap; and size="WIDTHxHEIGHT"), as the CLI's
        flags.
        `batch_id` or `idempotency_key` makes a retry continue the batch, never render twice;
        `notify`, an http(s) URL, is sent the batch's summary when it ends (farm/webhook.py)."""
        records = [(i, _fields(job, i)) for i, job in enumerate(jobs)]
        defaults = _defaults(defaults)
        try:
            specs = check_jobs(records, defaults, self.settings)
        except ValidationError as err:
            raise _at_job(err) from None
        request = hashlib.sha256(json.dumps({"jobs": [f for _, f in records],
                                             "defaults": defaults}, sort_keys=True,
                                            default=str).encode()).hexdigest()
        return self.submit_specs(specs, defaults=defaults, source="python",
                                 batch_id=batch_id, idempotency_key=idempotency_key,
                                 request=request, notify=notify)

    def submit_specs(self, specs: list[JobSpec], *, source: str,
                     defaults: dict[str, Any] | None = None, batch_id: str | None = None,
                     idempotency_key: str | None = None, request: str | None = None,
                     notify: str | None = None,
                     announce: Callable[[str], None] | None = None) -> Batch:
        """Submit checked specs (what `farm submit` does once it has read its file)."""
        done = submit(self.settings, specs, source=source, defaults=defaults,
                      store=self.store, batch_id=batch_id, idempotency_key=idempotency_key,
                      request=request, notify=notify, announce=announce)
        return Batch(done.batch, self, submitted=done)

    def broker(self) -> Any:
        """A Redis client of the broker, or None when the embedded one is not running (the
        store then answers alone)."""
        if self.settings.embedded and not broker.embedded_running(self.settings):
            return None
        return broker.redis_client(self.settings)

    def replay(self, path: str | Path, *, batch_id: str | None = None) -> Batch:
        """Submit again the job that made one image (a farm PNG or its sidecar): the same
        model, seed, sampler, size, preset, refiner and switch; `Batch.replayed` says which
        weights it had (scheduler/replay.py)."""
        found = read_job(path, self.settings)
        batch = self.submit_specs([found.spec], source=f"replay of {found.path}",
                                  batch_id=batch_id)
        batch.replayed = found
        return batch

    def batch(self, batch_id: str) -> Batch:
        """A batch submitted before (by anyone); NotFound when the store has no such batch."""
        if not isinstance(batch_id, str) or not is_id(batch_id):
            raise NotFound(f"{batch_id!r} is not a batch id")
        if not self.store.exists(keys.manifest_key(batch_id)):
            raise NotFound(f"no batch {batch_id!r} in {self.store.url}")
        return Batch(batch_id, self)


@dataclass
class Batch:
    """A batch of the farm: its id, and what this client's submit did (None when reopened)."""

    id: str
    farm: Farm = field(repr=False)
    submitted: Submitted | None = field(default=None, repr=False)
    replayed: Replay | None = field(default=None, repr=False)

    def status(self) -> BatchStatus:
        """Its state, counts and each job's state and images (every job record)."""
        return batch_status(self.farm.store, self.id, self.farm.settings)

    def counts(self) -> BatchCounts:
        """Its state and counts per state, at a constant cost whatever its size."""
        return batch_counts(self.farm.store, self.farm.broker(), self.id, self.farm.settings)

    def wait(self, timeout: float | None = None, poll: float = POLL_SECONDS) -> BatchStatus:
        """Block until the batch ends (succeeded, failed, canceled or aborted) and return its
        status; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (now := self.counts()).finished:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {self.id} is still {now.state} after {timeout} s: "
                                   + " ".join(f"{k}={v}" for k, v in now.counts.items()))
            time.sleep(poll)
        return self.status()

    def iter_results(self, timeout: float | None = None,
                     poll: float = POLL_SECONDS) -> Iterator[Result]:
        """Each image of the batch as its job succeeds, until the batch ends (TimeoutError
        after `timeout` seconds). Jobs that fail or are canceled yield nothing: status() says
        why. One image is held at a time."""
        store, settings, client = self.farm.store, self.farm.settings, self.farm.broker()
        deadline = None if timeout is None else time.monotonic() + timeout
        found = Succeeded(store, self.id)   # each look reads only the records that changed
        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
            while True:
                # whether it ended is read before the look: a look after the end sees every
                # job's final record
                over = batch_ended(store, self.id, settings, client)
                for key in found.look(pool):
                    sidecar = get_json(store, keys.sidecar_of(key))
                    yield Result(job=str(sidecar["job"]), index=int(sidecar["image_index"]),
                                 key=key, png=store.get(key), sidecar=sidecar)
                if over:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"batch {self.id} is still running after {timeout} s")
                time.sleep(poll)

    def cancel(self) -> Canceled:
        """Queued jobs never start; running ones stop within one denoising step."""
        return cancel(self.farm.settings, self.farm.store, self.id)


def _fields(job: Any, i: int) -> dict[str, Any]:
    """A job as fields: a prompt, a dict (None: not given, as in JSON Lines) or a JobSpec."""
    if isinstance(job, str):
        return {"prompt": job}
    if isinstance(job, JobSpec):
        return {k: v for k, v in job.to_dict().items() if v is not None and k != "snapped_from"}
    if isinstance(job, Mapping):
        return {k: v for k, v in job.items() if v is not None}
    raise ValidationError(f"jobs[{i}]", "must be a prompt, a dict of job fields or a JobSpec",
                          job)


def _defaults(given: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of submit() as job fields; UsageError naming one that is not."""
    out = {k: v for k, v in given.items() if v is not None}
    size = out.pop("size", None)
    if size is not None:
        out["width"], out["height"] = parse_size(size)
    known = [f for f in JobSpec.field_names() if f != "snapped_from"] + list(INPUT_ONLY)
    for name in out:
        if name not in known:
            raise UsageError(f"{name} is not a job field (known: {', '.join(known)}, size)")
    return out


def _at_job(err: ValidationError) -> ValidationError:
    """A job's error as the caller's list has it: jobs[2].steps, not line 2: steps."""
    if err.line is None:
        return err
    return ValidationError(f"jobs[{err.line}].{err.field}", err.rule, err.value,
                           show_value=err.show_value)

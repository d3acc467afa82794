"""Taking over a running stage: whose attempt it was decides whether it counts as a death.
A worker process is told apart from an earlier one under the same name (a container restarted
in its pod keeps its hostname and often its pid), so a poison job that kills its worker is
dead-lettered even when every restart comes back under the same name. In process, with the
stand-in backend and a real file store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from farm import lifecycle, models
from farm.jobs import Job, JobSpec
from farm.lifecycle import Fault, JobRecord, JobState, Stage
from farm.settings import Settings
from farm.store import FileStore
from farm.worker import standin
from farm.worker.stage import WorkerContext, run_message
from tests.integration.helpers import one_job_batch, plant

BATCH = "20261203-000000-7a4e00"


@pytest.fixture
def farm(tmp_path: Path) -> tuple[FileStore, Job, Settings]:
    settings = Settings(home=tmp_path, max_attempts=3)
    store = FileStore(tmp_path / "store")
    spec = JobSpec.from_dict({"prompt": "a fox", "seed": 1, "steps": 2, "width": 64,
                              "height": 64}, settings)
    return store, one_job_batch(store, BATCH, spec, settings), settings


def _running(job: Job, worker: str, incarnation: str, attempts: int) -> JobRecord:
    """The record a worker left when it stopped mid-stage (its `attempts`-th attempt)."""
    record = JobRecord(job=job.id, batch=job.batch)
    return lifecycle.replace(record.to(JobState.RUNNING), worker=worker, attempts=attempts,
                             stages={"full": {"worker": worker, "incarnation": incarnation,
                                              "attempts": attempts}})


def _worker(store: FileStore, settings: Settings, name: str, incarnation: str,
            live: dict[str, str]) -> WorkerContext:
    model = standin.load_model(models.resolve("tiny-sdxl"), settings, "cpu")
    return WorkerContext(settings=settings, store=store, models={"tiny-sdxl": model},
                         backend=standin, name=name, incarnation=incarnation,
                         alive=lambda worker, inc: live.get(worker) == inc)


def _run(ctx: WorkerContext, job: Job) -> Any:
    return run_message(ctx, job.encode())


def test_a_restart_under_the_same_name_counts_the_earlier_process_as_dead(farm: Any) -> None:
    store, job, settings = farm
    plant(store, _running(job, "pod-0", "first-life", 1))
    ctx = _worker(store, settings, "pod-0", "second-life", live={"pod-0": "second-life"})
    assert _run(ctx, job).state == "succeeded"
    record = lifecycle.read_record(store, BATCH, job.id)
    assert record is not None and record.stage_attempts("full") == 2
    assert [(f["worker"], f["kind"]) for f in record.failures] == [("pod-0", Fault.WORKER)]


def test_a_poison_job_is_dead_lettered_across_same_name_restarts(farm: Any) -> None:
    store, job, settings = farm
    plant(store, _running(job, "pod-0", "third-life", settings.max_attempts))
    ctx = _worker(store, settings, "pod-0", "fourth-life", live={"pod-0": "fourth-life"})
    result = _run(ctx, job)
    assert result.state == "failed" and "dead-lettered" in (result.error or "")
    record = lifecycle.read_record(store, BATCH, job.id)
    assert record is not None and record.state == JobState.FAILED
    assert record.error_kind == Fault.WORKER
    assert store.list_keys(f"batches/{BATCH}/images/") == []  # it never ran a fourth time


@pytest.mark.parametrize(("holder", "incarnation", "live"), [
    ("pod-0", "this-process", {}),                        # its own attempt, given up (infra)
    ("other", "their-process", {"other": "their-process"}),  # alive, but no longer holding it
])
def test_an_attempt_given_up_by_a_live_process_is_not_a_death(
        farm: Any, holder: str, incarnation: str, live: dict[str, str]) -> None:
    store, job, settings = farm
    plant(store, _running(job, holder, incarnation, 1))
    ctx = _worker(store, settings, "pod-0", "this-process", live=live)
    assert _run(ctx, job).state == "succeeded"
    record = lifecycle.read_record(store, BATCH, job.id)
    assert record is not None and record.failures == [] and record.stage_attempts("full") == 1
    assert record.stages[Stage.FULL]["incarnation"] == "this-process"

"""The routes of farm/lifecycle.py: each kind of failure, and how worker/faults.py tells them
apart."""

from __future__ import annotations

import pytest

from farm import lifecycle
from farm.errors import StoreUnavailable, ValidationError
from farm.lifecycle import Fault, JobRecord, JobState, Stage
from farm.worker.context import StageFailed
from farm.worker.faults import classify

INFO = {"worker": "w", "vram_class": 8}


def running(stage: Stage = Stage.FULL, worker: str = "w-1") -> JobRecord:
    record = JobRecord(job="b-0000", batch="b")
    if stage is Stage.REFINER:
        record = record.to(JobState.RUNNING).to(JobState.LATENTS_READY)
    return lifecycle.start(record, stage, worker, INFO, max_attempts=3)


def test_infra_trouble_goes_back_without_counting_an_attempt() -> None:
    back = lifecycle.after_failure(running(), Stage.FULL, Fault.INFRA, "store down", "w-1",
                                   max_attempts=3)
    assert back.state == JobState.QUEUED and back.stage_attempts("full") == 0
    assert back.failures == [] and "not counted" in (back.note or "")


@pytest.mark.parametrize("stage", [Stage.FULL, Stage.REFINER])
def test_a_worker_fault_is_retried_then_dead_lettered_with_every_attempt(stage: Stage) -> None:
    record = running(stage, "w-1")
    for n, worker in enumerate(("w-1", "w-2", "w-3"), start=1):
        if n > 1:
            record = lifecycle.start(record, stage, worker, INFO, max_attempts=3)
        record = lifecycle.after_failure(record, stage, Fault.WORKER, f"CUDA error {n}", worker,
                                         max_attempts=3)
        if n < 3:
            assert record.state == stage.waiting_state and "retried on another worker" in (
                record.note or "")
    assert record.state == JobState.FAILED and record.error_kind == "worker"
    assert [f["worker"] for f in record.failures] == ["w-1", "w-2", "w-3"]
    assert "dead-lettered" in (record.error or "") and "CUDA error 3" in (record.error or "")
    assert lifecycle.failed_workers(record, stage) == {"w-1", "w-2", "w-3"}


def test_a_dead_workers_attempt_counts_and_the_last_one_dead_letters() -> None:
    record = running(worker="w-1")
    record = lifecycle.start(record, Stage.FULL, "w-2", INFO, max_attempts=2, dead="w-1")
    assert record.state == JobState.RUNNING and record.stage_attempts("full") == 2
    record = lifecycle.start(record, Stage.FULL, "w-3", INFO, max_attempts=2, dead="w-2")
    assert record.state == JobState.FAILED and "w-1, w-2" in (record.error or "")


def test_out_of_memory_replans_to_a_larger_class_or_fails_at_the_largest() -> None:
    back = lifecycle.after_failure(running(), Stage.FULL, Fault.OOM, "CUDA out of memory", "w-1",
                                   max_attempts=3, larger_class=12, vram_class=8)
    assert back.state == JobState.QUEUED and back.replanned == {"full": 12}
    assert back.stage_attempts("full") == 0 and "re-planned to the 12 GB class" in (back.note or "")
    top = lifecycle.after_failure(running(), Stage.FULL, Fault.OOM, "CUDA out of memory", "w-1",
                                  max_attempts=3, larger_class=None, vram_class=80)
    assert top.state == JobState.FAILED and "no larger class" in (top.error or "")


def test_a_job_error_fails_at_once() -> None:
    failed = lifecycle.after_failure(running(), Stage.FULL, Fault.JOB, "ValueError: bad", "w-1",
                                     max_attempts=3)
    assert failed.state == JobState.FAILED and failed.error_kind == "job"


class OutOfMemoryError(RuntimeError):
    pass


@pytest.mark.parametrize(("exc", "fault"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), Fault.WORKER),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), Fault.WORKER),
    (RuntimeError("something nobody has seen"), Fault.WORKER),
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), Fault.OOM),
    (MemoryError(), Fault.OOM),
    (StoreUnavailable("cannot reach the object store"), Fault.INFRA),
    (NotADirectoryError(20, "Not a directory"), Fault.INFRA),
    (ConnectionError("reset"), Fault.INFRA),
    (ValueError("height must be divisible by 8"), Fault.JOB),
    (ValidationError("steps", "must be at most 150", 500), Fault.JOB),
    (StageFailed("the latents are corrupt"), Fault.JOB),
    (NotImplementedError("no latents"), Fault.JOB),
])
def test_failures_are_classified(exc: BaseException, fault: Fault) -> None:
    assert classify(exc) is fault

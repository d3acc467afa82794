"""Every job-record write is a compare-and-set on the record it read (farm/lifecycle.py), on
both stores: the file store and S3 over HTTP (moto's server, If-Match)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from farm import lifecycle
from farm.errors import Conflict
from farm.lifecycle import JobRecord, JobState, Stage, Superseded
from farm.settings import Settings
from farm.store import FileStore, Store, open_store

BATCH, JOB = "20261203-000000-abcdef", "20261203-000000-abcdef-0000"
INFO = {"worker": "w", "host": "h", "device": "cpu", "vram_class": 8, "profile": "lean",
        "model_hash": "0" * 64}


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return FileStore(tmp_path / "store")
    return open_store(Settings.load(env=request.getfixturevalue("s3_env")))


def _start(record: JobRecord, worker: str) -> JobRecord:
    return lifecycle.start(record, Stage.FULL, worker, {**INFO, "worker": worker},
                           max_attempts=3)


def test_of_two_workers_that_read_the_same_record_only_one_starts_the_job(store: Store) -> None:
    first = lifecycle.read(store, BATCH, JOB)
    second = lifecycle.read(store, BATCH, JOB)
    assert first.version is None and first.record.state == JobState.QUEUED
    won = lifecycle.commit(store, first, _start(first.record, "w-1"))
    with pytest.raises(Superseded):
        lifecycle.commit(store, second, _start(second.record, "w-2"))
    assert lifecycle.read(store, BATCH, JOB) == won
    assert won.record.worker == "w-1" and won.record.attempts == 1


def test_a_stale_writer_cannot_overwrite_a_newer_attempt_or_a_final_record(store: Store) -> None:
    held = lifecycle.commit(store, lifecycle.read(store, BATCH, JOB),
                            _start(JobRecord(job=JOB, batch=BATCH), "frozen"))
    # another worker takes the stage over (the first was presumed dead), then succeeds
    taken = lifecycle.read(store, BATCH, JOB)
    taken = lifecycle.commit(store, taken, lifecycle.start(
        taken.record, Stage.FULL, "replacement", {**INFO, "worker": "replacement"},
        max_attempts=3, dead="frozen"))
    done = lifecycle.commit(store, taken, lifecycle.succeed(taken.record, ["a.png"], {}))
    # the frozen worker wakes up and writes what its stale record says: refused, every time
    for stale in (lifecycle.succeed(held.record, ["b.png"], {}),
                  lifecycle.after_failure(held.record, Stage.FULL, lifecycle.Fault.JOB, "boom",
                                          "frozen", max_attempts=3)):
        with pytest.raises(Superseded):
            lifecycle.commit(store, held, stale)
    assert lifecycle.read(store, BATCH, JOB) == done
    # and a final record is final even for a writer holding its latest version
    with pytest.raises(Superseded, match="already succeeded"):
        lifecycle.commit(store, done, replace(done.record, state=JobState.FAILED))
    record = done.record
    assert (record.state, record.worker, record.attempts) == (JobState.SUCCEEDED,
                                                             "replacement", 2)
    assert [(f["worker"], f["kind"]) for f in record.failures] == [("frozen", "worker")]


def test_the_store_refuses_a_write_whose_version_is_stale(store: Store) -> None:
    first = store.put("batches/x/obj.json", b"1")
    second = store.put("batches/x/obj.json", b"2", if_match=first)
    with pytest.raises(Conflict):
        store.put("batches/x/obj.json", b"3", if_match=first)
    assert store.get_versioned("batches/x/obj.json") == (b"2", second)
    with pytest.raises(Conflict):
        store.put("batches/x/gone.json", b"1", if_match=second)

"""A batch's state counters (farm/tally.py), its summary (farm/summary.py) and what status reads
(scheduler/status.py `batch_counts`), against a real Redis and a file store: counts move only
with a compare-and-set that won, a note applied twice or late changes nothing, a writer that
died between its store write and its note is repaired, and status counts from the records
(and says so) when Redis lost its data."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis

from farm import fleet, keys, lifecycle, summary, tally
from farm.errors import ConfigError
from farm.jobs import JobSpec
from farm.lifecycle import JobRecord, JobState, Stage, Superseded
from farm.records import Submit, SubmitState, read_manifest, write_submit
from farm.scheduler.status import Source, batch_counts, recent_batches
from farm.scheduler.submit import _manifest, batch_marker
from farm.settings import Settings
from farm.store import open_store, put_json
from tests.conftest import REDIS_URL


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _batch(settings: Settings, client: Any, batch: str, jobs: int, *,
           notify: str | None = None, created_at: float | None = None) -> Any:
    """A batch written through the farm's own code (manifest, submit record, tally), with no
    message sent."""
    specs = [JobSpec.from_dict({"prompt": f"a fox {i}", "seed": i + 1, "steps": 2,
                                "width": 64, "height": 64}, settings) for i in range(jobs)]
    manifest = _manifest(batch, specs, settings, "-", {}, "r", notify)
    if created_at is not None:
        from dataclasses import replace

        manifest = replace(manifest, created_at=created_at)
    store = open_store(settings)
    put_json(store, keys.manifest_key(batch), manifest.encode(), create_once=True)
    write_submit(store, Submit(batch=batch, state=SubmitState.SUBMITTED, jobs=jobs, request="r",
                               created_at=manifest.created_at), None)
    tally.start(client, batch, jobs)
    client.set(batch_marker(batch), jobs)
    return manifest


def _move(store: Any, counter: tally.Tally, batch: str, job: str, state: JobState,
          then: bool = True) -> JobRecord:
    held = lifecycle.read(store, batch, job)
    record = held.record
    if state is JobState.RUNNING:
        new = lifecycle.start(record, Stage.FULL, "w-1", {}, max_attempts=3)
    elif state is JobState.SUCCEEDED:
        new = lifecycle.succeed(record, [], {})
    elif state is JobState.FAILED:
        new = record.to(JobState.FAILED, error="job error: no", error_kind="job")
    else:
        new = lifecycle.cancel(record, "canceled by the user")
    return lifecycle.commit(store, held, new, then=counter.note if then else None).record


def test_counts_follow_the_records_and_a_lost_compare_and_set_never_counts(
        settings: Settings, client: Any) -> None:
    store = open_store(settings)
    manifest = _batch(settings, client, "b-counts", 3)
    counter = tally.Tally(client)
    a, b, c = (j.id for j in manifest.jobs)
    assert tally.counts(client, "b-counts") == (3, {**_zero(), "queued": 3})
    _move(store, counter, "b-counts", a, JobState.RUNNING)
    stale = lifecycle.read(store, "b-counts", b)
    _move(store, counter, "b-counts", b, JobState.RUNNING)
    # a second worker that read job b before the first one's write loses, and counts nothing
    with pytest.raises(Superseded):
        lifecycle.commit(store, stale, lifecycle.start(stale.record, Stage.FULL, "w-2", {},
                                                       max_attempts=3), then=counter.note)
    assert tally.counts(client, "b-counts") == (3, {**_zero(), "queued": 1, "running": 2})
    done = _move(store, counter, "b-counts", a, JobState.SUCCEEDED)
    # the same note again, and an older write's note arriving late, change nothing
    assert counter.note(done) == tally.Noted(changed=False, final=1, total=3)
    older = lifecycle.read(store, "b-counts", b).record
    assert counter.note(older).changed is False
    assert tally.counts(client, "b-counts") == (3, {**_zero(), "queued": 1, "running": 1,
                                                    "succeeded": 1})


def test_a_writer_that_died_before_its_note_is_repaired_and_the_end_is_summarised_once(
        settings: Settings, client: Any) -> None:
    store = open_store(settings)
    manifest = _batch(settings, client, "b-end", 2)
    counter = tally.Tally(client)
    a, b = (j.id for j in manifest.jobs)
    _move(store, counter, "b-end", a, JobState.RUNNING)
    _move(store, counter, "b-end", a, JobState.SUCCEEDED)
    _move(store, counter, "b-end", b, JobState.RUNNING)
    # its worker wrote the record, then died before counting it
    failed = _move(store, counter, "b-end", b, JobState.FAILED, then=False)
    st = batch_counts(store, client, "b-end", settings)
    assert (st.source, st.state, st.done) == (Source.TALLY, "running", 1)
    # the second delivery of its message finds the record final and counts it: the batch ended
    got = counter.note(failed)
    assert got is not None and got.changed and got.ended
    written = summary.finish(store, client, manifest)
    assert written is not None and written.counts == {"succeeded": 1, "failed": 1}
    assert written.failed == [{"id": b, "error": "job error: no", "fault": "job"}]
    assert summary.finish(store, client, manifest) is None   # idempotent
    st = batch_counts(store, client, "b-end", settings)
    assert (st.source, st.state, st.counts) == (Source.SUMMARY, "failed",
                                                {"succeeded": 1, "failed": 1})
    assert st.failed == written.failed


def test_status_counts_from_the_records_and_says_so_when_redis_lost_its_data(
        settings: Settings, client: Any) -> None:
    store = open_store(settings)
    manifest = _batch(settings, client, "b-lost", 3)
    counter = tally.Tally(client)
    _move(store, counter, "b-lost", manifest.jobs[0].id, JobState.RUNNING)
    client.flushdb()
    st = batch_counts(store, client, "b-lost", settings)
    assert (st.source, st.state, st.counts) == (Source.RECORDS, "running",
                                                {"queued": 2, "running": 1})
    assert counter.note(lifecycle.read(store, "b-lost", manifest.jobs[0].id).record) is None
    # no broker at all: the same
    assert batch_counts(store, None, "b-lost", settings).source is Source.RECORDS
    # and `farm batches` says which batches it counted from their records
    from click.testing import CliRunner

    from farm.cli.main import cli

    shown = CliRunner().invoke(cli, ["batches"], env={"FARM_HOME": str(settings.home),
                                                      "FARM_BROKER_URL": REDIS_URL})
    assert shown.exit_code == 0, shown.output
    assert "note: the broker has no counters and the store no summary for b-lost" in \
        shown.output


def test_a_resubmitted_batch_starts_its_tally_from_the_records(settings: Settings,
                                                               client: Any) -> None:
    store = open_store(settings)
    manifest = _batch(settings, client, "b-seed", 2)
    counter = tally.Tally(client)
    _move(store, counter, "b-seed", manifest.jobs[0].id, JobState.CANCELED)
    client.flushdb()
    from farm.records import read_all

    records = read_all(store, "b-seed", [j.id for j in manifest.jobs])
    assert tally.start(client, "b-seed", 2, records)
    assert not tally.start(client, "b-seed", 2)   # one that exists is left alone
    assert tally.counts(client, "b-seed") == (2, {**_zero(), "queued": 1, "canceled": 1})


def test_batches_are_newest_first_within_one_second(settings: Settings, client: Any) -> None:
    now = time.time()
    # made in the same second, in this order; their random suffixes sort the other way
    ids = ["20261129-151200-ffffff", "20261129-151200-aaaaaa", "20261129-151200-000000"]
    for i, batch in enumerate(ids):
        _batch(settings, client, batch, 1, created_at=now + i * 0.01)
    _batch(settings, client, "20261129-151159-ffffff", 1, created_at=now - 1)
    found = recent_batches(open_store(settings), client, settings, limit=1)
    assert [b.batch for b in found] == [ids[-1]]
    found = recent_batches(open_store(settings), client, settings, limit=10)
    assert [b.batch for b in found] == list(reversed(ids)) + ["20261129-151159-ffffff"]


def test_a_manifest_planned_with_other_settings_names_the_batch_and_the_settings(
        settings: Settings, client: Any) -> None:
    _batch(settings, client, "b-planned", 1)
    other = settings.replace(buckets="1024x1024")
    with pytest.raises(ConfigError) as err:
        read_manifest(open_store(settings), "b-planned", other)
    message = str(err.value)
    assert "the manifest of batch b-planned was planned with other settings" in message
    assert "FARM_BUCKETS is unset there, 1024x1024 here" in message
    assert "malformed" not in message


def test_settings_claimed_by_workers_that_are_gone_bind_no_one(settings: Settings,
                                                               client: Any) -> None:
    old = settings.replace(max_attempts=5)
    fleet.check_shared(client, old, claim_ttl=60)          # the last worker's claim
    fleet.check_shared(client, settings)                    # it exited: nothing to disagree with
    fleet.publish(client, fleet.WorkerInfo(name="w", host="h", pid=1, device="cpu", models=[],
                                           queues=[]), ttl=60)
    client.set(fleet.SETTINGS_KEY, json.dumps(fleet.shared_settings(old), default=list))
    with pytest.raises(ConfigError, match="on the live workers"):
        fleet.check_shared(client, settings)


def test_two_finishers_at_once_write_one_summary(settings: Settings, client: Any) -> None:
    store = open_store(settings)
    manifest = _batch(settings, client, "b-race", 2)
    counter = tally.Tally(client)
    for job in manifest.jobs:
        _move(store, counter, "b-race", job.id, JobState.CANCELED)
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(summary.finish(store, client,
                                                                         manifest)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([s for s in got if s is not None]) == 1


def _zero() -> dict[str, int]:
    return {s.value: 0 for s in JobState}


def test_farm_status_of_a_large_batch_shows_its_counts_and_failed_jobs_without_its_records(
        env: dict[str, str], redis_url: str, client: Any) -> None:
    from click.testing import CliRunner

    from farm.cli.main import cli

    env = {**env, "FARM_BROKER_URL": redis_url}
    settings = Settings.load(env=env)
    store = open_store(settings)
    manifest = _batch(settings, client, "b-large", 60)
    counter = tally.Tally(client)
    for job in manifest.jobs[:3]:
        _move(store, counter, "b-large", job.id, JobState.RUNNING)
    out = CliRunner().invoke(cli, ["status", "b-large"], env=env)
    assert out.exit_code == 0, out.output
    assert out.output.splitlines() == [
        "batch b-large: running  queued=57 running=3",
        "  (57 job(s) waiting: no live worker; `farm status b-large --jobs` says what each "
        "needs)"]
    for job in manifest.jobs[3:]:
        _move(store, counter, "b-large", job.id, JobState.CANCELED)
    for job in manifest.jobs[:3]:
        _move(store, counter, "b-large", job.id, JobState.FAILED)
    assert summary.finish(store, client, manifest) is not None
    out = CliRunner().invoke(cli, ["status", "b-large"], env=env)
    lines = out.output.splitlines()
    assert lines[0] == "batch b-large: failed  failed=3 canceled=57"
    assert lines[1:] == [f"  {j.id}  failed     job error: job error: no"
                         for j in manifest.jobs[:3]]
    listed = CliRunner().invoke(cli, ["status", "b-large", "--jobs"], env=env)
    assert len(listed.output.splitlines()) == 61
    shown = json.loads(CliRunner().invoke(cli, ["batches", "--json"], env=env).output)
    assert [(b["batch"], b["state"], b["jobs"], b["source"]) for b in shown] == [
        ("b-large", "failed", 60, "summary")]


def test_a_job_waiting_for_a_refiner_no_live_worker_serves_says_so(settings: Settings) -> None:
    from farm.records import Manifest
    from farm.scheduler.status import BatchStatus, JobView

    spec = JobSpec.from_dict({"prompt": "a fox", "seed": 1, "steps": 20, "width": 64,
                              "height": 64, "refiner": "tiny-sdxl-refiner", "split": "always"},
                             settings)
    manifest: Manifest = _manifest("b-refiner", [spec, spec], settings, "-", {}, "r")
    first, second = manifest.jobs
    ready = JobRecord(job=first.id, batch="b-refiner", state=JobState.LATENTS_READY)
    st = BatchStatus(batch="b-refiner", created_at=0.0, manifest=manifest, jobs=[
        JobView(first.id, JobState.LATENTS_READY, [], None, ready),
        JobView(second.id, JobState.QUEUED, [], None, None)])
    base_only = fleet.WorkerInfo(name="w", host="h", pid=1, device="cpu", models=["tiny-sdxl"],
                                 queues=[], vram_class=80)
    waiting = [v.waiting for v in st.with_fleet([base_only]).jobs]
    assert waiting == [f"waiting: no live worker serves the refiner tiny-sdxl-refiner at "
                       f">={first.refiner_vram_class} GB", None]
    both = fleet.WorkerInfo(name="w", host="h", pid=1, device="cpu",
                            models=["tiny-sdxl", "tiny-sdxl-refiner"], queues=[], vram_class=80)
    assert [v.waiting for v in st.with_fleet([both]).jobs] == [None, None]


def test_a_summary_recounts_the_records_when_the_tally_missed_a_job_and_repairs_it(
        settings: Settings, client: Any) -> None:
    store = open_store(settings)
    manifest = _batch(settings, client, "b-recount", 2)
    counter = tally.Tally(client)
    a, b = (j.id for j in manifest.jobs)
    _move(store, counter, "b-recount", a, JobState.CANCELED)
    _move(store, counter, "b-recount", b, JobState.FAILED, then=False)   # died before its note
    written = summary.finish(store, client, manifest)   # reconciling, once no job is open
    assert written is not None
    assert (written.state, written.counts) == ("failed", {"failed": 1, "canceled": 1})
    assert tally.counts(client, "b-recount") == (2, {**_zero(), "failed": 1, "canceled": 1})
    assert tally.job_states(client, "b-recount") == {a: JobState.CANCELED, b: JobState.FAILED}


def test_reconciling_closes_the_jobs_the_tally_counts_final_and_a_note_that_never_ran_waits(
        settings: Settings, client: Any) -> None:
    from farm import recovery

    def open_set() -> set[str]:
        return {j.decode() for j in client.smembers(recovery.OPEN + "b-open")}

    def missing() -> list[str]:   # a round of reconciling (the batch's queues are empty)
        return recovery.missing_jobs(client, "b-open", [], grace=0)

    store = open_store(settings)
    manifest = _batch(settings, client, "b-open", 3)
    a, b, c = (j.id for j in manifest.jobs)
    recovery.open_jobs(client, "b-open", [a, b, c])
    recovery.activate(client, "b-open")
    counter = tally.Tally(client)
    _move(store, counter, "b-open", a, JobState.RUNNING)
    _move(store, counter, "b-open", a, JobState.SUCCEEDED)
    assert open_set() == {a, b, c}   # the note is the job's one command: the set waits
    _move(store, counter, "b-open", b, JobState.RUNNING)
    failed = _move(store, counter, "b-open", b, JobState.FAILED, then=False)  # died first
    assert missing() == []           # first sighting
    assert open_set() == {b, c}      # a is final in the tally: closed
    assert missing() == [b, c]       # b's note never ran: it stays open, found nowhere
    assert not recovery.ended(client, "b-open")
    # whoever reads the final record again (a second delivery, reconciling) notes it
    assert counter.note(failed) == tally.Noted(changed=True, final=2, total=3)
    assert missing() == [c]
    assert open_set() == {c}
    _move(store, counter, "b-open", c, JobState.CANCELED)
    assert recovery.ended(client, "b-open")
    assert missing() == []           # ended: the batch leaves the set reconciling reads
    assert recovery.active_batches(client) == [] and not open_set()


def test_a_batch_without_a_tally_ends_when_its_open_set_is_empty(client: Any) -> None:
    from farm import recovery

    recovery.open_jobs(client, "b-bare", ["b-bare-0", "b-bare-1"])
    recovery.job_ended(client, "b-bare", "b-bare-0")
    assert not recovery.ended(client, "b-bare")
    recovery.job_ended(client, "b-bare", "b-bare-1")
    assert recovery.ended(client, "b-bare")

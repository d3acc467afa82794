"""The job lifecycle against faults a real fleet has every week, with real worker processes (the
stand-in backend with injected faults: tests/faults.py), the embedded broker and the file store.

Each test forces the situation it claims to prove: which worker runs what is decided by which
workers are running, or by a gate file the test creates, never by who wins a race.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farm import broker, fleet, lifecycle, procs, queues
from farm.jobs import JobSpec
from farm.lifecycle import Fault, JobState
from farm.records import read_manifest
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store
from tests.conftest import ROOT, run_farm

# beats every half second, presumed dead after two; a quarantined worker stays listed long enough
# for `farm workers` to show it, then exits
FAST = {"FARM_HEARTBEAT_INTERVAL": "0.5", "FARM_HEARTBEAT_TTL": "2",
        "FARM_QUARANTINE_EXIT_SECONDS": "20"}


class Workers:
    """Stand-in worker processes (python -m tests.faults), each with its own flags and env."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults", "--name", name, *args],
                env={**self.env, **env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def signal(self, name: str, sig: int) -> None:
        os.killpg(self.procs[name].pid, sig)

    def stop(self) -> None:
        procs.stop_group([p for p in self.procs.values() if p.poll() is None], 15.0)

    def settled_logs(self) -> str:
        """Every log once every worker has stopped: a worker records a job's end in the store
        before it prints its line, so the lines are counted only after the workers exit."""
        self.stop()
        return self.all_logs()


@pytest.fixture
def farm(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Settings, Workers]]:
    env = {**env, **FAST}
    settings = Settings.load(env=env)
    workers = Workers(env, tmp_path / "logs")
    try:
        yield settings, workers
    finally:
        workers.stop()
        broker.stop_broker(settings)


def wait(what: str, check: Callable[[], Any], timeout: float = 120, logs: Workers | None = None
         ) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = logs.all_logs()[-4000:] if logs is not None else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.05)


def specs(settings: Settings, count: int, prompt: str = "a fox", **fields: Any) -> list[JobSpec]:
    return [JobSpec.from_dict({"prompt": prompt, "seed": i + 1, "steps": 4, "width": 64,
                               "height": 64, **fields}, settings) for i in range(count)]


def records(settings: Settings, batch: str) -> dict[str, lifecycle.JobRecord]:
    from farm.records import read_records

    return read_records(open_store(settings), batch)


def finished(settings: Settings, batch: str, count: int) -> bool:
    found = records(settings, batch)
    return len(found) == count and all(r.state.final for r in found.values())


def succeeded_lines(log: str) -> Counter[str]:
    """How many times each job was rendered to success, from the workers' own lines."""
    return Counter(line.split(" job ")[1].split()[0] for line in log.splitlines()
                   if line.startswith("worker ") and line.rstrip().endswith(" succeeded"))


# -- 1. one broken GPU: quarantined, its failed stages succeed on other workers ------------------


def test_a_broken_gpu_is_quarantined_and_its_jobs_succeed_elsewhere(farm: Any) -> None:
    settings, workers = farm
    result = submit(settings, specs(settings, 30))
    # the broken worker runs alone first: it must take (and fail) the first jobs itself
    broken = workers.start("broken", "--broken")
    wait("the broken worker's quarantine", lambda: any(
        w.name == "broken" and w.state == fleet.WorkerState.QUARANTINED
        for w in fleet.live_workers(broker.redis_client(settings))), logs=workers)
    shown = run_farm(workers.env, "workers")
    assert "broken is quarantined" in shown.stdout and "CUDA error" in shown.stdout, shown
    assert broken.wait(timeout=60) == 70  # it leaves, non-zero, for its platform to restart
    for name in ("healthy-1", "healthy-2"):
        workers.start(name)
    wait("the batch", lambda: finished(settings, result.batch, 30), logs=workers)
    found = records(settings, result.batch)
    assert {r.state for r in found.values()} == {JobState.SUCCEEDED}
    failed_on_broken = {j: r for j, r in found.items() if r.failures}
    assert len(failed_on_broken) == settings.quarantine_after  # three different jobs, once each
    for record in failed_on_broken.values():
        (failure,) = record.failures
        assert failure["worker"] == "broken" and failure["kind"] == Fault.WORKER
        assert "illegal memory access" in failure["error"]
        assert record.worker in ("healthy-1", "healthy-2")  # retried on another worker
        assert record.stage_attempts("full") == 2
    status = run_farm(workers.env, "status", result.batch)
    assert "worker trouble" in status.stdout and "job error" not in status.stdout
    # a restart releases it: the same name, its GPU fixed, alone, takes work again
    for name in ("healthy-1", "healthy-2"):
        workers.signal(name, signal.SIGTERM)
        assert workers.procs[name].wait(timeout=60) == 0
    workers.start("broken")
    later = submit(settings, specs(settings, 1, "after the repair"))
    wait("the repaired worker's job", lambda: finished(settings, later.batch, 1), logs=workers)
    record = records(settings, later.batch)[later.jobs[0].id]
    assert (record.state, record.worker) == (JobState.SUCCEEDED, "broken")


# -- 2. the store fails for longer than its retries: handed back, no attempt counted -----------


def test_a_store_outage_hands_the_stage_back_without_counting_an_attempt(farm: Any) -> None:
    settings, workers = farm
    result = submit(settings, specs(settings, 1))
    (job,) = result.jobs
    images = settings.home / "store" / "batches" / result.batch / "images"
    images.parent.mkdir(parents=True, exist_ok=True)
    images.write_text("not a folder: every image write fails (NotADirectoryError)")
    workers.start("w-1")
    wait("two hand-backs", lambda: workers.log("w-1").count("handing job back") >= 2,
         logs=workers)
    workers.signal("w-1", signal.SIGTERM)  # stopped between attempts: the record holds still
    assert workers.procs["w-1"].wait(timeout=60) == 0
    held = records(settings, result.batch)[job.id]
    assert held.state == JobState.QUEUED and held.stage_attempts("full") == 0
    assert held.failures == [] and "broker or store failed" in (held.note or "")
    images.unlink()  # the store is back
    workers.start("w-2")
    wait("the job", lambda: finished(settings, result.batch, 1), logs=workers)
    record = records(settings, result.batch)[job.id]
    assert record.state == JobState.SUCCEEDED
    assert record.stage_attempts("full") == 1 and record.failures == []


# -- 3. a killed submit, finished by running the same submit with its batch id -------------------

KILL_SUBMIT = """
import os, sys
from celery import Celery
from farm import records
from farm.cli.main import main
from farm.records import SubmitState

point, count = sys.argv[1], int(sys.argv[2])
if point == "before-manifest":
    create = records.create_batch
    def dying_create(store, manifest, state):
        records.write_submit(store, records.Submit(batch=manifest.batch, state=state,
                             jobs=len(manifest.jobs), request=manifest.request), None)
        os._exit(9)
    import farm.scheduler.submit as sub
    sub.create_batch = dying_create
elif point == "after-some":
    send, sent = Celery.send_task, []
    def dying_send(self, *a, **k):
        if len(sent) == count:
            os._exit(9)
        sent.append(1)
        return send(self, *a, **k)
    Celery.send_task = dying_send
elif point == "after-all":
    import farm.scheduler.submit as sub
    write = sub.write_submit
    def dying_write(store, submit, version):
        if submit.state is SubmitState.SUBMITTED:
            os._exit(9)
        return write(store, submit, version)
    sub.write_submit = dying_write
main(["submit", sys.argv[3], "--batch-id", sys.argv[4]])
"""


@pytest.mark.parametrize("point", ["before-manifest", "after-some", "after-all"])
def test_a_killed_submit_is_finished_by_the_same_submit_with_its_batch_id(
        farm: Any, tmp_path: Path, point: str) -> None:
    settings, workers = farm
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"fox {i}", "steps": 4, "width": 64,
                                           "height": 64}) + "\n" for i in range(12)))
    batch = f"retry-{point}"
    gate = tmp_path / "gate"
    broker.ensure_broker(settings)
    # workers render while the submit runs, each holding its job until the test opens the gate
    for name in ("w-1", "w-2"):
        workers.start(name, "--gate", str(gate))
    killed = subprocess.run([sys.executable, "-c", KILL_SUBMIT, point, "5", str(prompts), batch],
                            env=workers.env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == 9, killed.stderr
    if point != "before-manifest":
        status = run_farm(workers.env, "status", batch)
        assert f"batch {batch}: submitting" in status.stdout, status
        assert f"--batch-id {batch}" in status.stderr and "lost its data" not in status.stderr
    retried = run_farm(workers.env, "submit", str(prompts), "--batch-id", batch)
    gate.touch()
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == batch
    wait("the batch", lambda: finished(settings, batch, 12), logs=workers)
    found = records(settings, batch)
    assert {r.state for r in found.values()} == {JobState.SUCCEEDED}
    assert all(r.attempts == 1 for r in found.values())
    assert succeeded_lines(workers.settled_logs()) == Counter({j: 1 for j in found})
    # once more: nothing left to queue, nothing rendered again
    again = run_farm(workers.env, "submit", str(prompts), "--batch-id", batch)
    assert again.returncode == 0 and "queued 0 of its 12 jobs" in again.stderr, again
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "something else"}\n')
    clash = run_farm(workers.env, "submit", str(other), "--batch-id", batch)
    assert clash.returncode == 2 and "different request" in clash.stderr


# -- 4. a submit that failed: nothing of it renders, until the same submit runs again ----------


def test_an_aborted_batch_renders_nothing_until_submitted_again(
        farm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import Celery
    from kombu import Producer

    from farm.errors import BrokerUnavailable

    settings, workers = farm
    jobs = specs(settings, 5)
    real, sent = Celery.send_task, []

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(sent) == 3:
            raise ConnectionError("broker went away")
        sent.append(1)
        return real(self, *args, **kwargs)

    batch = Producer.batch

    def flushing(self: Any, max_size: int = 1) -> Any:
        return batch(self, 1)  # each message flushed on its own: a broken send leaves some

    with monkeypatch.context() as patched:
        patched.setattr(Celery, "send_task", flaky)
        patched.setattr(Producer, "batch", flushing)
        with pytest.raises(BrokerUnavailable, match="nothing was submitted"):
            submit(settings, jobs, batch_id="aborted-batch")
    client = broker.redis_client(settings)
    queue = queues.queue_name("tiny-sdxl", 4, 5)
    assert client.llen(queue) == 3  # three messages got through (the retries got none)
    workers.start("w-1", "--max-jobs", "3")
    assert workers.procs["w-1"].wait(timeout=120) == 0
    assert workers.log("w-1").count("was aborted") == 3
    assert records(settings, "aborted-batch") == {}
    assert open_store(settings).list_keys("batches/aborted-batch/images/") == []
    again = submit(settings, jobs, batch_id="aborted-batch")
    assert again.continued and again.sent == 5
    workers.start("w-2")
    wait("the batch", lambda: finished(settings, "aborted-batch", 5), logs=workers)
    assert {r.state for r in records(settings, "aborted-batch").values()} == {JobState.SUCCEEDED}
    assert succeeded_lines(workers.settled_logs()) == Counter({j.id: 1 for j in again.jobs})


# -- 5. a message cannot overwrite the truth ---------------------------------------------------


def _push(settings: Settings, queue: str, message: Any) -> None:
    app = broker.celery_app(settings)
    try:
        app.send_task(queues.RENDER_TASK, args=[message], queue=queue)
    finally:
        app.close()


def test_messages_cannot_change_create_or_overwrite_work(farm: Any) -> None:
    settings, workers = farm
    store = open_store(settings)
    done = submit(settings, specs(settings, 1, "the real prompt"))
    (job,) = done.jobs
    workers.start("w-1")
    wait("the job", lambda: finished(settings, done.batch, 1), logs=workers)
    before = store.get_versioned(f"batches/{done.batch}/jobs/{job.id}.json")
    side_before = store.get(f"batches/{done.batch}/images/{job.id}-0.json")
    queue = queues.stage_queue(job)
    hostile = [
        # (a) a stage the job does not have; and a refiner worker's queue for a base job
        {**job.encode(), "stage": "refiner"},
        # (b) a spec of its own: another prompt and seed for the same job
        {**job.encode(), "spec": {"prompt": "an injected prompt", "seed": 666}},
        # (c) a batch no one submitted
        {"v": 2, "batch": "20990101-000000-ffffff", "id": "20990101-000000-ffffff-0000",
         "stage": "full"},
        # a job the manifest does not have
        {**job.encode(), "id": f"{done.batch}-0099"},
    ]
    for message in hostile:
        _push(settings, queue, message)
    _push(settings, queues.queue_name("tiny-sdxl-refiner", 4, 5), job.encode())
    workers.start("refiner-only", "--model", "tiny-sdxl-refiner")
    wait("every hostile message", lambda: workers.all_logs().count("rejected") >= 5,
         logs=workers)
    assert store.get_versioned(f"batches/{done.batch}/jobs/{job.id}.json") == before
    assert store.get(f"batches/{done.batch}/images/{job.id}-0.json") == side_before
    assert store.list_dirs("batches") == [done.batch]  # nothing for the unsubmitted batch
    log = workers.all_logs()
    assert "message.spec is not a known field" in log
    assert "has no manifest" in log and "has no job" in log
    assert "does not serve model tiny-sdxl" in log

    # (b) a second message for a queued job of another batch renders the manifest's job, once
    queued = submit(settings, specs(settings, 1, "the other batch's prompt"))
    _push(settings, queues.stage_queue(queued.jobs[0]), queued.jobs[0].encode())
    wait("the other job", lambda: finished(settings, queued.batch, 1), logs=workers)
    side = json.loads(store.get(f"batches/{queued.batch}/images/{queued.jobs[0].id}-0.json"))
    assert side["prompt"] == "the other batch's prompt" and side["seed"] == 1
    wait("both messages", lambda: workers.all_logs().count(f"job {queued.jobs[0].id} ") >= 2,
         logs=workers)
    assert succeeded_lines(workers.all_logs())[queued.jobs[0].id] == 1


# -- 6. a running job is left alone by resubmit and by a second delivery -------------------------


def test_resubmit_and_a_second_delivery_leave_a_running_job_alone(farm: Any,
                                                                  tmp_path: Path) -> None:
    settings, workers = farm
    gate = tmp_path / "gate"
    result = submit(settings, specs(settings, 1))
    (job,) = result.jobs
    workers.start("runner", "--gate", str(gate))  # holds the job until the gate opens
    wait("the job running", lambda: records(settings, result.batch).get(job.id) is not None
         and records(settings, result.batch)[job.id].state == JobState.RUNNING, logs=workers)
    for _ in range(3):
        out = run_farm(workers.env, "resubmit", result.batch)
        assert out.returncode == 0, out.stderr
    _push(settings, queues.stage_queue(job), job.encode())  # a second delivery, by hand
    workers.start("bystander")
    wait("the duplicate", lambda: "running on live worker runner" in workers.log("bystander"),
         logs=workers)
    gate.touch()
    wait("the job", lambda: finished(settings, result.batch, 1), logs=workers)
    record = records(settings, result.batch)[job.id]
    assert record.state == JobState.SUCCEEDED and record.worker == "runner"
    assert record.attempts == 1 and record.failures == []
    assert succeeded_lines(workers.settled_logs()) == Counter({job.id: 1})


# -- 7. a worker presumed dead that was not: nothing of its attempt is kept -----------------------


@pytest.mark.parametrize("first", ["frozen", "replacement"])
def test_a_frozen_worker_that_wakes_keeps_nothing(farm: Any, tmp_path: Path, first: str) -> None:
    settings, workers = farm
    store = open_store(settings)
    gate = tmp_path / "gate"
    result = submit(settings, specs(settings, 1))
    (job,) = result.jobs
    frozen = workers.start("frozen", "--gate", str(tmp_path / "frozen-gate"))
    wait("the job running", lambda: job.id in records(settings, result.batch), logs=workers)
    workers.signal("frozen", signal.SIGSTOP)
    (tmp_path / "frozen-gate").touch()  # it would finish as soon as it runs again
    workers.start("replacement", "--gate", str(gate))
    wait("the takeover", lambda: records(settings, result.batch)[job.id].attempts == 2,
         logs=workers)
    if first == "frozen":
        workers.signal("frozen", signal.SIGCONT)
        wait("the frozen attempt's end", lambda: "superseded" in workers.log("frozen"),
             logs=workers)
        gate.touch()
    else:
        gate.touch()
        wait("the job", lambda: finished(settings, result.batch, 1), logs=workers)
        workers.signal("frozen", signal.SIGCONT)
        wait("the frozen attempt's end", lambda: "superseded" in workers.log("frozen"),
             logs=workers)
    wait("the job", lambda: finished(settings, result.batch, 1), logs=workers)
    record = records(settings, result.batch)[job.id]
    assert record.state == JobState.SUCCEEDED
    assert (record.worker, record.attempts) == ("replacement", 2)
    death = record.failures[0]
    assert death["worker"] == "frozen" and death["kind"] == Fault.WORKER
    side = json.loads(store.get(f"batches/{result.batch}/images/{job.id}-0.json"))
    assert (side["worker"], side["attempt"]) == ("replacement", 2)
    assert frozen.poll() is None  # alive all along: it was only presumed dead


# -- out of memory: re-planned to the next class, not failed ----------------------------------


def test_out_of_memory_replans_the_job_to_the_next_class(farm: Any) -> None:
    settings, workers = farm
    result = submit(settings, specs(settings, 1, "BIG", min_vram=8))
    (job,) = result.jobs
    assert job.vram_class == 8
    workers.start("small", "--oom-on", "BIG", "--oom-below", "12", FARM_VRAM="8")
    wait("the re-plan", lambda: records(settings, result.batch).get(job.id) is not None
         and records(settings, result.batch)[job.id].replanned == {"full": 12}, logs=workers)
    record = records(settings, result.batch)[job.id]
    assert record.state == JobState.QUEUED and "re-planned to the 12 GB class" in (record.note or "")
    assert record.stage_attempts("full") == 0
    workers.start("big", "--oom-on", "BIG", "--oom-below", "12", FARM_VRAM="12")
    wait("the job", lambda: finished(settings, result.batch, 1), logs=workers)
    record = records(settings, result.batch)[job.id]
    assert record.state == JobState.SUCCEEDED and record.worker == "big"
    assert [f["kind"] for f in record.failures] == [Fault.OOM]
    assert read_manifest(open_store(settings), result.batch, settings).jobs[0].vram_class == 8

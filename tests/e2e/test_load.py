"""The load test: a 1,000-job burst over four stand-in worker processes while workers are killed
with `kill -9` every couple of seconds and replaced; the bar is 1,000 done, 0 lost, 0 duplicated.

The stage is the named stand-in (worker/standin.py: no diffusion, a flat 64x64 image per job,
`--render-seconds` of sleep), so the test exercises the farm's control plane (queue, in-flight
tracking, heartbeat recovery, job records, create-once images), not the CPU's denoising. Every
KILL_EVERY_S a random worker that has taken a job gets SIGKILL (its whole process group) and a
replacement starts under a fresh name (`StandInFleet`, tests/e2e/test_poison.py). Heartbeats
are fast and the visibility timeout keeps its default, so a killed worker's stage can only come
back through the workers' recovery sweep (farm/recovery.py), not through the broker.

Counted at the end, from the store (and the workers' logs):
  done        jobs whose record is `succeeded` with its one PNG and sidecar in the store
  lost        jobs of the batch that are not succeeded when the run ends
  duplicated  jobs with more than one PNG object per image slot, or that more than one worker
              reported succeeding ("worker X: job J succeeded" in two logs)
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from farm import broker, fleet, recovery
from farm.jobs import JobSpec
from farm.lifecycle import JobRecord, JobState, read_record
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import Store, open_store
from tests.e2e.test_poison import FAST_BEATS, StandInFleet, sigterm_cleans_up

N_JOBS = 1000
N_WORKERS = 4
RENDER_S = "0.05"     # the stand-in's render (a sleep): at least 12.5 s of it per worker
KILL_EVERY_S = 2.0
# Kills stop after KILL_PHASE_S: the run takes about 25 s on an idle 2-core machine, so there they
# go on to the end; on a busy one the rest of the batch then finishes without them, however slowly
# (the bar is what is lost or duplicated, not how fast the machine is).
KILL_PHASE_S = 60.0
MIN_KILLS = 5         # kills while the batch still had jobs to run
RUN_LIMIT_S = 420.0   # the run ends here even with jobs left: they count as lost
STALL_S = 60.0        # ...and earlier when no job has ended for this long
SUCCESS = re.compile(r"worker (\S+): job (\S+) succeeded")
RECOVERY_PATHS = {"heartbeat sweep": "stopped beating while running",
                  "orphan sweep": "had no worker behind it",
                  "reconciling": "was in no queue and held by no worker"}


def _wait_ready(client: object, names: set[str], crew: StandInFleet, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not names <= {w.name for w in fleet.live_workers(client)
                        if w.state == fleet.WorkerState.READY}:
        assert not crew.supervise() and time.monotonic() < deadline, crew.tails()
        time.sleep(0.1)


def _submit(settings: Settings, specs: list[JobSpec], out: list[Any]) -> None:
    try:
        out.append(submit(settings, specs, source="test-load"))
    except BaseException as exc:  # noqa: BLE001 - re-raised by the test's thread
        out.append(exc)


def _victim(client: Any, store: Store, crew: StandInFleet, rng: random.Random,
            killed_on: Counter[str], max_attempts: int) -> tuple[str | None, str | None]:
    """A random worker that has taken at least one job, and the job it is running, if any.

    A replacement is spared until it has taken a job: its heartbeat says "ready" a little
    before its consumer connects, and on a loaded machine killing it in that gap, again and
    again, would leave no worker consuming. So is a worker whose job was already killed
    max_attempts - 1 times: one more death would rightly dead-letter that job as poison
    (tests/e2e/test_poison.py proves that), which is not what this test counts."""
    up = sorted({w.name for w in fleet.live_workers(client)
                 if w.state == fleet.WorkerState.BUSY or w.jobs_done + w.jobs_failed > 0}
                & set(crew.procs))
    rng.shuffle(up)
    for name in up:
        # the job its in-flight record names, while the record still says it runs there
        job = json.loads(client.get(recovery.INFLIGHT + name) or "{}").get("job")
        record = read_record(store, job.rsplit("-", 1)[0], job) if job else None
        if record is None or record.state != JobState.RUNNING or record.worker != name:
            job = None
        if job is None or killed_on[job] < max_attempts - 1:
            return name, job
    return None, None


def _whereabouts(client: Any, job: str, record: JobRecord | None) -> str:
    """Where a job that did not finish is: its record, and where its message sits in Redis."""
    where = []
    for tag, raw in client.hgetall(recovery.UNACKED).items():
        if recovery.message_job(json.loads(raw)[0]) == job:
            since = client.zscore(recovery.UNACKED_INDEX, tag)
            where.append(f"unacked since {time.time() - (since or 0):.0f} s ago")
    for key in client.scan_iter(match="farm.*"):
        if client.type(key) == b"list" and any(recovery.message_job(json.loads(m)) == job
                                               for m in client.lrange(key, 0, -1)):
            where.append(f"queued on {key.decode()}")
    for key in client.scan_iter(match=recovery.INFLIGHT + "*"):
        if job.encode() in (client.get(key) or b""):
            where.append(f"in flight on {key.decode()}")
    state = "no record" if record is None else (
        f"{record.state.value}, attempt {record.attempts} on {record.worker}")
    return f"  lost {job}: {state}; message: {', '.join(where) or 'nowhere in Redis'}"


def test_a_1000_job_burst_with_random_kills_loses_and_duplicates_nothing(
        env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, **FAST_BEATS}
    settings = Settings.load(env=env)
    crew = StandInFleet(env, tmp_path / "logs", "--render-seconds", RENDER_S)
    rng = random.Random(6)
    with sigterm_cleans_up():
        try:
            broker.ensure_broker(settings)
            broker.wait_for_broker(settings)
            client = broker.redis_client(settings)
            names = {crew.start(f"load-{i}") for i in range(N_WORKERS)}
            _wait_ready(client, names, crew)

            specs = [JobSpec.from_dict({"prompt": f"load test {i}", "seed": i, "steps": 2,
                                        "width": 64, "height": 64}, settings)
                     for i in range(N_JOBS)]
            store = open_store(settings)
            began = time.monotonic()
            # the burst is submitted in the background, so workers are killed during submit too
            # (1,000 messages take seconds to send on a busy 2-core machine)
            submitted: list[Any] = []
            sender = threading.Thread(target=_submit, args=(settings, specs, submitted),
                                      daemon=True)
            sender.start()
            kills = mid_stage = 0
            killed_on: Counter[str] = Counter()  # kills per job, from the victim's in-flight record
            last_kill, last_look = began, 0.0
            progress = (0, began)  # (jobs ended, when that count last grew)
            while True:
                now = time.monotonic()
                assert now - began < RUN_LIMIT_S or not sender.is_alive(), "submit is stuck"
                crew.supervise()  # a worker that died on its own is replaced too (none should)
                if now - last_kill >= KILL_EVERY_S and now - began < KILL_PHASE_S:
                    victim, held = _victim(client, store, crew, rng, killed_on,
                                           settings.max_attempts)
                    if victim is not None:
                        crew.kill(victim)
                        kills += 1
                        last_kill = now
                        if held is not None:
                            mid_stage += 1
                            killed_on[held] += 1
                if now - last_look >= 1.0 and not sender.is_alive():
                    last_look = now
                    result = submitted[0]
                    if isinstance(result, BaseException):
                        raise result
                    status = batch_status(store, result.batch, settings)
                    if status.finished or now - began > RUN_LIMIT_S:
                        break
                    if status.done > progress[0]:
                        progress = (status.done, now)
                    elif now - progress[1] > STALL_S:
                        break  # what is left is stuck: count it as lost now, not at the limit
                time.sleep(0.05)
            elapsed = time.monotonic() - began
            workers = [f"  {w.name}: {w.state}, {w.jobs_done} jobs done, running {w.current_job}"
                       for w in fleet.live_workers(client)]
            crew.stop()  # nothing may change while it is counted (a warm stop: no job is cut short)

            # the count, from the store: every job's record and every PNG object of the batch
            # (images/<job>-<k>.png and .json: PNG objects per image slot, and per job)
            keys = store.list_keys(f"batches/{result.batch}/images/")
            pngs = Counter(k.rsplit("/", 1)[1].removesuffix(".png") for k in keys
                           if k.endswith(".png"))
            pngs_per_job = Counter(slot.rsplit("-", 1)[0] for slot in pngs.elements())
            sidecars = {k.rsplit("/", 1)[1].removesuffix(".json") for k in keys
                        if k.endswith(".json")}
            # ...and who said they finished each job, from every worker's log (killed ones too)
            successes: Counter[str] = Counter()
            paths: Counter[str] = Counter()  # how lost stages came back (farm/recovery.py)
            for log in (tmp_path / "logs").glob("*.log"):
                text = log.read_text(errors="replace")
                successes.update(job for _, job in SUCCESS.findall(text))
                for path, marker in RECOVERY_PATHS.items():
                    paths[path] += text.count(marker)
            done = lost = duplicated = retried = 0
            missing: list[str] = []
            for job in result.jobs:
                record = read_record(store, job.batch, job.id)
                slots = [f"{job.id}-{k}" for k in range(job.spec.n)]
                if (successes[job.id] > 1 or any(pngs[s] > 1 for s in slots)
                        or pngs_per_job[job.id] > job.spec.n):
                    duplicated += 1
                if (record is not None and record.state == JobState.SUCCEEDED
                        and all(pngs[s] == 1 and s in sidecars for s in slots)):
                    done += 1
                    retried += record.attempts > 1
                else:
                    lost += 1
                    missing.append(_whereabouts(client, job.id, record))
            line = (f"load: {N_JOBS} jobs, {N_WORKERS} workers, {kills} kills: done {done}, "
                    f"lost {lost}, duplicated {duplicated} in {elapsed:.1f} s")
            print(f"\n{line} ({mid_stage} kills mid-stage, {retried} jobs ran again after their "
                  f"worker was killed, {len(crew.crashes())} workers died on their own; "
                  f"recovered by: " + ", ".join(f"{k} {v}" for k, v in paths.items()) + ")")
            assert (done, lost, duplicated) == (N_JOBS, 0, 0), "\n".join(
                [line, *missing[:20], "live workers at the end:", *workers])
            assert kills >= MIN_KILLS, line
            assert not crew.crashes(), crew.exits
        finally:
            try:
                crew.stop()
            finally:
                broker.stop_broker(settings)

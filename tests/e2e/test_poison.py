"""A poison job: one prompt that kills every worker that renders it (a segfaulting kernel), in a
batch of ordinary jobs, over stand-in worker processes that a supervisor restarts as they die.

The stand-in (worker/standin.py, no diffusion) is started with the test tool `--crash-on
POISON` (tests/faults.py): a job whose prompt contains POISON makes the worker's process exit at once
(os._exit(1)) half-way through its steps. Heartbeats are fast and the visibility timeout stays
at its default, so each death is noticed from the missing heartbeat (farm/recovery.py's sweep)
and the stage runs again on another worker, until the attempt cap dead-letters it.

`StandInFleet`, the supervisor, is shared with the load test (tests/e2e/test_load.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from farm import broker, procs
from farm.jobs import JobSpec
from farm.lifecycle import JobRecord, JobState, read_record
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store
from tests.conftest import ROOT, run_farm

# beats every half second, presumed dead after two; FARM_VISIBILITY_TIMEOUT keeps its default,
# so only the heartbeat sweep can bring a dead worker's stage back within the test's time
FAST_BEATS = {"FARM_HEARTBEAT_INTERVAL": "0.5", "FARM_HEARTBEAT_TTL": "2"}
POISON = "POISON-PILL"


class StandInFleet:
    """Stand-in worker processes (`python -m tests.faults`) in slots: a worker
    that exits non-zero, or is killed, is replaced in its slot by a fresh one under a new name
    (`<slot>-<generation>`), so the dead one's stage can only come back through the sweep."""

    def __init__(self, env: dict[str, str], logs: Path, *args: str) -> None:
        self.env, self.logs, self.args = env, logs, list(args)
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.slot_of: dict[str, str] = {}
        self.generation: Counter[str] = Counter()
        self.exits: list[tuple[str, int]] = []  # (name, status) of every worker that ended

    def start(self, slot: str) -> str:
        self.generation[slot] += 1
        name = f"{slot}-{self.generation[slot]}"
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "tests.faults", "--name", name,
                 *self.args], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self.slot_of[name] = slot
        return name

    def supervise(self) -> list[str]:
        """Restart every worker that has exited non-zero; returns the new workers' names."""
        started = []
        for name, proc in list(self.procs.items()):
            status = proc.poll()
            if status is None:
                continue
            del self.procs[name]
            self.exits.append((name, status))
            if status != 0:
                started.append(self.start(self.slot_of[name]))
        return started

    def kill(self, name: str) -> str:
        """kill -9 the worker (its whole process group), then start its replacement."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.exits.append((name, proc.returncode))
        return self.start(self.slot_of[name])

    def crashes(self) -> list[str]:
        """Workers that exited on their own with a non-zero status (not killed by us)."""
        return [name for name, status in self.exits if status > 0]

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every worker (a warm shutdown), SIGKILL what is left after `grace`."""
        running = list(self.procs.values())
        self.procs.clear()
        procs.stop_group(running, grace)

    def tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text(errors="replace").strip().splitlines()[-lines:]
            out.append(f"-- {log.stem}:\n" + "\n".join(text))
        return "\n".join(out)


@contextlib.contextmanager
def sigterm_cleans_up() -> Iterator[None]:
    """Turn a SIGTERM to the test run (a canceled CI job, a stray kill) into an exception, so
    the test's `finally` still stops its workers and the broker instead of leaving them."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _record(settings: Settings, batch: str, job: str) -> JobRecord:
    record = read_record(open_store(settings), batch, job)
    assert record is not None, f"{job} has no record"
    return record


def test_a_poison_job_is_dead_lettered_and_blocks_nothing(env: dict[str, str],
                                                          tmp_path: Path) -> None:
    env = {**env, **FAST_BEATS}
    settings = Settings.load(env=env)
    fleet = StandInFleet(env, tmp_path / "logs", "--crash-on", POISON, "--render-seconds",
                         "0.05")
    began = time.monotonic()
    with sigterm_cleans_up():
        try:
            broker.ensure_broker(settings)
            broker.wait_for_broker(settings)
            for slot in ("poison-a", "poison-b", "poison-c"):
                fleet.start(slot)
            # the poison job first, so the first free worker takes it ahead of the rest
            specs = [JobSpec.from_dict({"prompt": f"{POISON} crashes its worker" if i == 0 else
                                        f"an ordinary job {i}", "seed": i, "steps": 4,
                                        "width": 64, "height": 64}, settings) for i in range(10)]
            result = submit(settings, specs, source="test-poison")
            poison, others = result.jobs[0], result.jobs[1:]
            # a failure that is the job's own fault, for `farm status` to contrast with: the
            # stand-in has no latents, so a split base stage raises (see worker/standin.py)
            needs_latents = {"prompt": "needs latents", "seed": 1, "steps": 4, "width": 64,
                             "height": 64, "refiner": "tiny-sdxl-refiner", "split": "always",
                             "switch": 0.5}
            plain = submit(settings, [JobSpec.from_dict(needs_latents, settings)]).jobs[0]

            store = open_store(settings)
            deadline = time.monotonic() + 90
            while not (batch_status(store, result.batch, settings).finished
                       and batch_status(store, plain.batch, settings).finished):
                fleet.supervise()
                assert time.monotonic() < deadline, fleet.tails()
                time.sleep(0.1)
            elapsed = time.monotonic() - began

            # the poison job: three attempts, each on a worker that died, then the dead letter
            record = _record(settings, poison.batch, poison.id)
            assert record.state == JobState.FAILED, (record, fleet.tails())
            assert record.attempts == settings.max_attempts == 3, record
            assert record.stages["full"]["attempts"] == 3, record.stages
            assert record.error_kind == "worker", record
            assert record.error is not None and "dead-lettered" in record.error, record.error
            assert len(fleet.crashes()) == 3, fleet.exits  # one death per attempt, no more
            images = store.list_keys(f"batches/{result.batch}/images/")
            assert not [k for k in images if f"/{poison.id}-" in k], images

            # every other job succeeded once, with one image, while the poison job was retried
            for job in others:
                other = _record(settings, job.batch, job.id)
                assert other.state == JobState.SUCCEEDED and other.attempts == 1, other
                pngs = [k for k in images if f"/{job.id}-" in k and k.endswith(".png")]
                assert pngs == [f"batches/{job.batch}/images/{job.id}-0.png"], pngs
                assert other.finished_at is not None and record.finished_at is not None
                assert other.finished_at < record.finished_at, "the poison job blocked the rest"

            # `farm status` tells a failing worker from a failing job
            out = run_farm(env, "status", result.batch)
            assert out.returncode == 0, out.stderr
            (line,) = [ln for ln in out.stdout.splitlines() if poison.id in ln]
            assert "failed" in line and "worker trouble: dead-lettered" in line, out.stdout
            assert "succeeded=9" in out.stdout and "failed=1" in out.stdout, out.stdout
            assert out.stdout.count("1 image(s)") == 9, out.stdout
            out = run_farm(env, "status", plain.batch)
            (line,) = [ln for ln in out.stdout.splitlines() if plain.id in ln]
            assert "failed" in line and "  job error: " in line and "worker trouble" not in line, line
            assert _record(settings, plain.batch, plain.id).error_kind == "job"
            print(f"poison: dead-lettered after {record.attempts} attempts, "
                  f"{len(fleet.crashes())} worker deaths, batch done in {elapsed:.1f} s")
        finally:
            try:
                fleet.stop()
            finally:
                broker.stop_broker(settings)

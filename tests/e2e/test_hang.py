"""A hung stage, injected: the render stops making denoising-step progress, as a stuck kernel or
driver would, and nothing in Python can interrupt it.

The hanging worker is a stand-in (worker/standin.py) started with the test tool `--hang-on
TEXT` (tests/faults.py). With FARM_HANG_TIMEOUT at 3 s its watchdog (worker/runtime.py) must notice the missing
progress and take the process down (exit 75), and another worker must run the stage again from
the missing heartbeat, to one image, well before the broker's visibility timeout (24 h here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from farm import broker, fleet
from farm.jobs import JobSpec
from farm.lifecycle import JobState, read_record
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store
from tests.e2e.test_poison import FAST_BEATS, StandInFleet, sigterm_cleans_up

HANG = "HANG-HERE"
HANG_TIMEOUT_S = 3.0


def _wait_for(predicate: Callable[[], bool], limit: float, what: str,
              tails: Callable[[], str]) -> float:
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < limit, f"{what} within {limit} s\n{tails()}"
        time.sleep(0.1)
    return time.monotonic() - began


def test_a_hung_stage_is_detected_and_runs_again_elsewhere(env: dict[str, str],
                                                           tmp_path: Path) -> None:
    env = {**env, **FAST_BEATS, "FARM_HANG_TIMEOUT": str(HANG_TIMEOUT_S)}
    settings = Settings.load(env=env)
    hanging = StandInFleet(env, tmp_path / "logs", "--hang-on", HANG)
    healthy = StandInFleet(env, tmp_path / "logs")
    with sigterm_cleans_up():
        try:
            broker.ensure_broker(settings)
            client = broker.redis_client(settings)
            stuck = hanging.start("hang-a")
            _wait_for(lambda: any(w.name == stuck and w.state == fleet.WorkerState.READY
                                  for w in fleet.live_workers(client)), 60, "ready",
                      hanging.tails)
            spec = JobSpec.from_dict({"prompt": f"{HANG} on step 4", "seed": 3, "steps": 8,
                                      "width": 64, "height": 64}, settings)
            job = submit(settings, [spec], source="test-hang").jobs[0]
            log = tmp_path / "logs" / f"{stuck}.log"
            _wait_for(lambda: "no more step progress" in log.read_text(errors="replace"), 60,
                      "the stand-in hangs", hanging.tails)
            hung_at = time.monotonic()
            helper = healthy.start("healthy-a")

            # the watchdog takes the hung worker down: exit 75, once hang_timeout has passed
            proc = hanging.procs[stuck]
            _wait_for(lambda: proc.poll() is not None, 30, "the hung worker exits",
                      hanging.tails)
            detected = time.monotonic() - hung_at
            assert proc.returncode == 75, hanging.tails()
            assert detected >= HANG_TIMEOUT_S - 0.5, detected
            assert "made no progress" in log.read_text(errors="replace"), hanging.tails()

            # ...and the healthy worker runs the stage again, to one image
            store = open_store(settings)
            _wait_for(lambda: batch_status(store, job.batch, settings).finished, 60,
                      "the job finishes elsewhere", healthy.tails)
            record = read_record(store, job.batch, job.id)
            assert record is not None and record.state == JobState.SUCCEEDED, record
            assert record.worker == helper and record.attempts == 2, record
            pngs = [k for k in store.list_keys(f"batches/{job.batch}/images/")
                    if k.endswith(".png")]
            assert pngs == [f"batches/{job.batch}/images/{job.id}-0.png"], pngs
            print(f"hang: detected after {detected:.1f} s (timeout {HANG_TIMEOUT_S} s), job done "
                  f"on {helper} {time.monotonic() - hung_at:.1f} s after it hung")
        finally:
            try:
                hanging.stop()
                healthy.stop()
            finally:
                broker.stop_broker(settings)

"""Spot and scale-in: SIGTERM in the middle of a long stage, on real worker processes and the
embedded broker. With a short grace period the worker hands the stage back with its latents and
exits 0, and another worker resumes it from them; with a long one it finishes the stage."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farm import broker, models, vram
from farm.jobs import JobSpec
from farm.lifecycle import JobState, read_record
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import get_json, open_store
from tests.conftest import ROOT, farm_cmd, run_farm


def _start(env: dict[str, str], name: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(farm_cmd("worker", "--device", "cpu", "--name", name, *extra),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _long(settings: Settings) -> JobSpec:
    """A tiny-model job of several seconds on this CPU (150 steps)."""
    return JobSpec.from_dict({"prompt": "a long night", "seed": 7, "steps": 150, "width": 128,
                              "height": 128, "scheduler": "euler"}, settings)


def _sigterm_while_running(settings: Settings, worker: subprocess.Popen[str], batch: str,
                           job: str) -> tuple[int, str, float]:
    """SIGTERM once the job has run for a second; (exit code, stderr, seconds to exit)."""
    store = open_store(settings)
    deadline = time.monotonic() + 300
    while (record := read_record(store, batch, job)) is None or \
            record.state != JobState.RUNNING:
        assert worker.poll() is None and time.monotonic() < deadline, record
        time.sleep(0.05)
    time.sleep(1.0)  # some of its 150 steps done, most not
    worker.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = worker.communicate(timeout=120)
    return worker.returncode, err, time.monotonic() - sent


# every load profile, as a worker of its class loads it (one no class takes by default: an
# 8 GB worker with --profile)
PROFILE_FLAGS = {name: (("--vram", str(min(c for c, p in vram.PROFILE_BY_CLASS.items()
                                            if p == name)))
                        if name in vram.PROFILE_BY_CLASS.values()
                        else ("--vram", "8", "--profile", name))
                 for name in vram.PROFILES}


@pytest.mark.parametrize("profile", sorted(vram.PROFILES))
def test_short_grace_hands_the_stage_back_and_another_worker_resumes_it(
        env: dict[str, str], profile: str) -> None:
    settings = Settings.load(env=env)
    flags = PROFILE_FLAGS[profile]
    try:
        spec = _long(settings)
        (job,) = submit(settings, [spec]).jobs
        stopping = _start({**env, "FARM_STOP_GRACE": "2"}, "spot-1", *flags)
        code, err, took = _sigterm_while_running(settings, stopping, job.batch, job.id)
        assert code == 0, err[-3000:]
        assert took < 20, took  # it did not render the rest of the stage first
        store = open_store(settings)
        record = read_record(store, job.batch, job.id)
        assert record is not None and record.state == JobState.QUEUED, record
        step = record.stages["full"]["handed_back"][0]["step"]
        assert 0 < step < 150 and record.note == (
            f"handed back at step {step}/150 of image 1/1 on worker spot-1's shutdown")
        (checkpoint,) = store.list_keys(f"batches/{job.batch}/intermediate/")
        assert checkpoint.endswith(f"resume-full-0-{step:04d}.safetensors")
        assert store.list_keys(f"batches/{job.batch}/images/") == []
        # `farm status` says why the job is queued again
        out = run_farm(env, "status", job.batch)
        assert out.returncode == 0, out.stderr
        assert f"queued     (handed back at step {step}/150" in out.stdout, out.stdout

        rescuer = _start(env, "rescuer", "--max-jobs", "1", *flags)
        _, err = rescuer.communicate(timeout=300)
        assert rescuer.returncode == 0, err[-3000:]
        record = read_record(store, job.batch, job.id)
        assert record is not None and record.state == JobState.SUCCEEDED, record
        assert record.stages["full"]["resumed"] == {"image": 0, "step": step,
                                                    "worker": "rescuer"}
        images = store.list_keys(f"batches/{job.batch}/images/")
        assert len(images) == 2  # exactly one PNG and its sidecar
        side = get_json(store, record.images[0].replace(".png", ".json"))
        assert side["worker"] == "rescuer" and side["stages"]["full"]["resumed"]["step"] == step
        assert side["profile"] == profile
        assert store.list_keys(f"batches/{job.batch}/intermediate/") == []

        # the resumed image is the uninterrupted render's under that profile, pixel for pixel
        from farm.worker import pipelines

        model = pipelines.load_model(models.TINY_BASE, settings, "cpu", vram.PROFILES[profile])
        expected = np.array(pipelines.render(model, spec)[0])
        png = Image.open(Path(env["FARM_HOME"]) / "store" / record.images[0])
        assert np.array_equal(np.array(png), expected)
    finally:
        broker.stop_broker(settings)


def test_long_grace_finishes_the_stage_and_leaves_no_checkpoint(env: dict[str, str]) -> None:
    settings = Settings.load(env=env)
    try:
        (job,) = submit(settings, [_long(settings)]).jobs
        worker = _start(env, "on-demand", "--stop-grace", "600")
        code, err, _ = _sigterm_while_running(settings, worker, job.batch, job.id)
        assert code == 0, err[-3000:]
        store = open_store(settings)
        record = read_record(store, job.batch, job.id)
        assert record is not None and record.state == JobState.SUCCEEDED, record
        assert record.worker == "on-demand" and "handed_back" not in record.stages["full"]
        assert len(store.list_keys(f"batches/{job.batch}/images/")) == 2
        assert store.list_keys(f"batches/{job.batch}/intermediate/") == []
    finally:
        broker.stop_broker(settings)

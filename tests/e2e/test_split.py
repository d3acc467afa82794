"""Base and refiner on two worker processes of different classes, through the store."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from farm import broker, models
from farm.jobs import JobSpec
from farm.lifecycle import JobState, read_record
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import get_json, open_store
from tests.conftest import ROOT, farm_cmd


def _worker(env: dict[str, str], name: str, model: str, vram: int, *extra: str
            ) -> subprocess.Popen[str]:
    return subprocess.Popen(farm_cmd("worker", "--device", "cpu", "--name", name, "--model",
                                     model, "--vram", str(vram), *extra),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def _reference(settings: Settings, spec: JobSpec) -> list[np.ndarray]:
    import torch

    from farm.worker import pipelines

    torch.set_num_threads(1)
    base = pipelines.load_model(models.TINY_BASE, settings, "cpu")
    refiner = pipelines.load_model(models.TINY_REFINER, settings, "cpu")
    return [np.array(im) for im in pipelines.ensemble(base, refiner, spec)]


def test_split_job_runs_on_two_workers_and_equals_the_one_process_ensemble(
        env: dict[str, str]) -> None:
    settings = Settings.load(env=env)
    try:
        specs = [JobSpec.from_dict({"prompt": "a lighthouse", "seed": 9, "steps": 12,
                                    "width": 64, "height": 64, "refiner": "tiny-sdxl-refiner",
                                    "switch": 0.75, "split": "always", "scheduler": sched,
                                    "n": n}, settings)
                 for sched, n in (("euler", 2), ("euler_a", 1))]
        result = submit(settings, specs)
        base = _worker(env, "base-8", "tiny-sdxl", 8, "--max-jobs", "2")
        refiner = _worker(env, "refiner-24", "tiny-sdxl-refiner", 24, "--max-jobs", "2")
        _wait(base)
        _wait(refiner)
        store = open_store(settings)
        for job, spec in zip(result.jobs, specs, strict=True):
            record = read_record(store, job.batch, job.id)
            assert record is not None and record.state == JobState.SUCCEEDED, record
            expected = _reference(settings, spec)
            for k, key in enumerate(record.images):
                side = get_json(store, key.replace(".png", ".json"))
                base_stage, refiner_stage = side["stages"]["base"], side["stages"]["refiner"]
                assert (base_stage["worker"], base_stage["vram_class"]) == ("base-8", 8)
                assert base_stage["profile"] == "lean"
                assert (refiner_stage["worker"], refiner_stage["vram_class"]) == ("refiner-24",
                                                                                  24)
                assert refiner_stage["profile"] == "resident-pair"
                assert side["refiner"] == "tiny-sdxl-refiner" and side["switch"] == 0.75
                png = Image.open(open_store(settings).root / key)  # type: ignore[attr-defined]
                assert np.array_equal(np.array(png), expected[k])
            assert store.list_keys(f"batches/{job.batch}/intermediate/") == []
    finally:
        broker.stop_broker(settings)


def test_killing_the_refiner_mid_stage_reruns_only_the_refiner(env: dict[str, str]) -> None:
    # fast heartbeats: the killed worker's stage comes back within seconds (farm/recovery.py)
    env = {**env, "FARM_HEARTBEAT_INTERVAL": "0.5", "FARM_HEARTBEAT_TTL": "2"}
    settings = Settings.load(env=env)
    try:
        spec = JobSpec.from_dict({"prompt": "slow", "seed": 2, "steps": 150, "width": 128,
                                  "height": 128, "refiner": "tiny-sdxl-refiner",
                                  "switch": 0.3, "split": "always"}, settings)
        (job,) = submit(settings, [spec]).jobs
        store = open_store(settings)
        base = _worker(env, "base", "tiny-sdxl", 8, "--max-jobs", "1")
        first = _worker(env, "refiner-1", "tiny-sdxl-refiner", 24)
        deadline = time.monotonic() + 300
        while True:
            record = read_record(store, job.batch, job.id)
            if record is not None and record.state == JobState.REFINING:
                break
            assert time.monotonic() < deadline, "the refiner stage never started"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert "stopped after 1 jobs" in _wait(base)
        second = _worker(env, "refiner-2", "tiny-sdxl-refiner", 24, "--max-jobs", "1")
        _wait(second, timeout=300)
        record = read_record(store, job.batch, job.id)
        assert record is not None and record.state == JobState.SUCCEEDED, record
        assert record.stages["base"]["attempts"] == 1 and record.stages["base"]["worker"] == \
            "base"
        assert record.stages["refiner"]["attempts"] == 2
        assert record.stages["refiner"]["worker"] == "refiner-2"
        side = json.loads((Path(env["FARM_HOME"]) / "store" /
                           record.images[0].replace(".png", ".json")).read_text())
        assert side["worker"] == "refiner-2"
    finally:
        broker.stop_broker(settings)

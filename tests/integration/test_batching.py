"""The throughput mode with a real tiny-model worker process (FARM_BATCH_JOBS, worker/batching.py):
jobs that share every pipeline input but prompt and seed render in one call, each with its own
record, images and sidecar; any other job renders alone. The messages are all queued before
the worker starts, so what it takes together does not depend on timing."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import redis

from farm import queues, recovery
from farm.jobs import JobSpec
from farm.keys import image_key, sidecar_of
from farm.lifecycle import JobState, read_record
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import get_json, open_store
from farm.worker import pipelines
from farm.worker.batching import batch_key
from tests.conftest import run_farm


def _psnr(a: Any, b: Any) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def test_one_call_renders_each_job_as_alone_give_or_take_rounding(
        loaded: dict[str, Any]) -> None:
    """render_batch: each job's own prompt, negative prompt and seeds, in order, with the CFG
    cut-off applied to every image of the call; within rounding of each job rendered alone."""
    settings, base = loaded["settings"], loaded["tiny-sdxl"]
    specs = [JobSpec.from_dict({"prompt": prompt, "negative_prompt": "blur", "seed": seed,
                                "n": n, "steps": 4, "width": 64, "height": 64,
                                "cfg_cutoff": 0.5, "scheduler": "euler_a"}, settings)
             for prompt, seed, n in (("a red barn", 1, 1), ("a blue boat", 2, 2),
                                     ("a green hill", 3, 1))]
    together = pipelines.render_batch(base, specs)
    assert [len(images) for images in together] == [1, 2, 1]
    for spec, images in zip(specs, together, strict=True):
        alone = pipelines.render(base, spec)
        for got, want in zip(images, alone, strict=True):
            assert _psnr(got, want) > 40, spec.prompt


def _spec(settings: Settings, prompt: str, seed: int, **more: object) -> JobSpec:
    return JobSpec.from_dict({"prompt": prompt, "seed": seed, "steps": 3, "width": 64,
                              "height": 64, **more}, settings)


def test_compatible_queued_jobs_share_one_call_and_the_rest_render_alone(
        s3_env: dict[str, str], redis_url: str) -> None:
    env = {**s3_env, "FARM_BROKER_URL": redis_url}
    settings = Settings.load(env=env)
    specs = [
        _spec(settings, "a red barn", 1),
        _spec(settings, "a blue boat", 2, n=2),
        _spec(settings, "a green hill", 3),
        _spec(settings, "fewer steps", 4, steps=2),    # another batch key: alone
        _spec(settings, "a grey sky", 5),              # shares the first three's key
    ]
    result = submit(settings, specs, source="test-batching")
    a, b, c, d, e = result.jobs
    keys = [batch_key(job) for job in result.jobs]
    assert keys[0] == keys[1] == keys[2] == keys[4] != keys[3]
    client = redis.Redis.from_url(redis_url)
    queue = queues.stage_queue(a)
    assert client.llen(queue) == 5   # all queued before the worker starts

    out = run_farm(env, "worker", "--device", "cpu", "--batch-jobs", "3", "--max-jobs", "5",
                   "--name", "w-batch", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr

    # the first three in one call; d then takes e, which does not fit, and puts it back; each
    # of d and e renders alone
    store = open_store(settings)
    expected = {a.id: 3, b.id: 3, c.id: 3, d.id: None, e.id: None}
    for job in result.jobs:
        record = read_record(store, job.batch, job.id)
        assert record is not None and record.state == JobState.SUCCEEDED, record
        assert record.attempts == 1 and record.worker == "w-batch", record
        images = sorted(k for k in store.list_keys(f"batches/{job.batch}/images/")
                        if f"/{job.id}-" in k)
        pngs = [image_key(job.batch, job.id, k) for k in range(job.spec.n)]
        assert images == sorted(pngs + [sidecar_of(p) for p in pngs]), images
        for k, png in enumerate(pngs):
            side = get_json(store, sidecar_of(png))
            assert side.get("batched") == expected[job.id], (job.id, side)
            assert side["seed"] == job.spec.seed + k and side["prompt"] == job.spec.prompt
        # rendered once: one "succeeded" line per job, no duplicate delivery
        assert log.count(f"job {job.id} succeeded") == 1, log[-3000:]
    assert "duplicate" not in log and "stopped after 5 jobs" in log, log[-3000:]
    # every message acked, none left queued
    assert client.hlen(recovery.UNACKED) == 0 and client.llen(queue) == 0
    # the batched images are their own: every prompt and seed gives other pixels
    pixels = {store.get(image_key(j.batch, j.id, 0)) for j in (a, b, c)}
    assert len(pixels) == 3

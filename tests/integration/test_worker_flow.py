"""The whole path with a real worker process: submit → Redis → worker → store → results."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

from PIL import Image

from farm import broker, queues
from farm.images import read_parameters
from farm.jobs import JobSpec
from farm.keys import image_key
from farm.lifecycle import read_record
from farm.scheduler.results import download
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store
from tests.conftest import run_farm

REQUEST = [
    {"prompt": "a lighthouse at dusk", "seed": 3, "steps": 4, "width": 192, "height": 80,
     "n": 2, "scheduler": "euler_a", "negative_prompt": "fog", "min_vram": 8},
    {"prompt": "a bowl of ramen", "seed": 5, "steps": 3, "width": 96, "height": 168,
     "scheduler": "dpmpp_2m", "guidance": 7.5},
    {"prompt": "ünïcödé prompt ✨", "steps": 3, "width": 64, "height": 64, "scheduler": "ddim"},
]


def _worker(env: dict[str, str], max_jobs: int, name: str) -> subprocess.CompletedProcess[str]:
    result = run_farm(env, "worker", "--device", "cpu", "--max-jobs", str(max_jobs),
                      "--name", name, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_full_batch_renders_into_s3_and_comes_back(s3_env: dict[str, str], redis_url: str,
                                                     tmp_path: Path) -> None:
    env = {**s3_env, "FARM_BROKER_URL": redis_url}
    settings = Settings.load(env=env)
    specs = [JobSpec.from_dict(r, settings) for r in REQUEST]
    result = submit(settings, specs, source="test")
    log = _worker(env, max_jobs=3, name="w-s3").stderr
    assert "ready" in log and log.index("ready") < log.index("succeeded")

    store = open_store(settings)
    assert store.url.startswith("s3://")
    status = batch_status(store, result.batch, settings)
    assert status.state == "succeeded", status.to_json()
    got = download(store, result.batch, tmp_path / "out", settings)
    assert len(got.images) == 4 and got.contact_sheet is not None and not got.missing
    Image.open(got.contact_sheet).verify()

    for job, request in zip(result.jobs, REQUEST, strict=True):
        for k in range(job.spec.n):
            png = (tmp_path / "out" / f"{job.id}-{k}.png").read_bytes()
            side = json.loads((tmp_path / "out" / f"{job.id}-{k}.json").read_text())
            image = Image.open(io.BytesIO(png))
            assert image.size == (request["width"], request["height"])
            for field, value in request.items():
                if field != "seed":
                    assert side[field] == value, field
            assert side["seed"] == job.spec.seed + k and side["job_seed"] == job.spec.seed
            assert side["worker"] == "w-s3" and side["device"] == "cpu"
            assert len(side["model_hash"]) == 64 and side["versions"]["torch"]
            assert side["timings"]["render_s"] > 0
            params = read_parameters(png) or ""
            assert params.startswith(request["prompt"]) and f"Seed: {job.spec.seed + k}" in params
        record = read_record(store, result.batch, job.id)
        assert record is not None and record.attempts == 1 and record.worker == "w-s3"


def test_same_seed_gives_identical_bytes_on_two_workers_over_the_embedded_broker(
        env: dict[str, str]) -> None:
    settings = Settings.load(env=env)
    try:
        spec = JobSpec.from_dict({"prompt": "same everywhere", "seed": 42, "steps": 4,
                                  "width": 64, "height": 64, "scheduler": "euler_a"}, settings)
        a = submit(settings, [spec])
        _worker(env, 1, "first")
        b = submit(settings, [spec])
        _worker(env, 1, "second")
        store = open_store(settings)
        png_a = store.get(image_key(a.batch, a.jobs[0].id, 0))
        png_b = store.get(image_key(b.batch, b.jobs[0].id, 0))
        assert png_a == png_b
        workers = {read_record(store, x.batch, x.jobs[0].id).worker for x in (a, b)}  # type: ignore[union-attr]
        assert workers == {"first", "second"}
    finally:
        broker.stop_broker(settings)


def test_worker_rejects_hostile_messages_and_ignores_duplicates(env: dict[str, str]) -> None:
    settings = Settings.load(env=env)
    try:
        good = submit(settings, [JobSpec.from_dict({"prompt": "ok", "seed": 1, "steps": 2,
                                                    "width": 64, "height": 64}, settings)])
        app = broker.celery_app(settings)
        queue = queues.queue_name("tiny-sdxl", 80, 5)
        hostile = [
            {"v": 1, "id": "../../etc", "batch": "x", "index": 0, "spec": {}},
            {**good.jobs[0].encode(), "spec": {**good.jobs[0].spec.to_dict(), "steps": 10**6}},
            "not even an object",
        ]
        for message in hostile:
            app.send_task(queues.RENDER_TASK, args=[message], queue=queue)
        # the same job delivered a second time
        app.send_task(queues.RENDER_TASK, args=[good.jobs[0].encode()], queue=queue)
        app.close()
        log = _worker(env, 5, "guard").stderr
        assert log.count("rejected: malformed message") == 3, log[-3000:]
        # a message cannot carry its own spec: the manifest's is the only one
        assert "message.spec is not a known field" in log
        assert "duplicate" in log
        store = open_store(settings)
        status = batch_status(store, good.batch, settings)
        assert status.state == "succeeded"
        png = image_key(good.batch, good.jobs[0].id, 0)
        assert store.list_keys(f"batches/{good.batch}/images/") == sorted(
            [png, png.replace(".png", ".json")])
        assert store.list_dirs("batches") == [good.batch]  # nothing written for "x"
    finally:
        broker.stop_broker(settings)

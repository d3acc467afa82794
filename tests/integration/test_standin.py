"""The load-test machinery stays honest: a stand-in worker process (worker/standin.py, no
diffusion) takes a batch through the real embedded Redis and the store, like a real worker."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from farm import broker
from farm.jobs import JobSpec
from farm.keys import image_key, sidecar_key
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store
from farm.worker.standin import seed_colour
from tests.conftest import ROOT

N_JOBS = 20


def test_a_standin_worker_process_completes_a_batch_through_redis(
        env: dict[str, str], tmp_path: Path) -> None:
    settings = Settings.load(env=env)
    try:
        specs = [JobSpec.from_dict({"prompt": f"load {i}", "seed": 100 + 3 * i, "steps": 4,
                                    "width": 112, "height": 144, "n": 1 + i % 2}, settings)
                 for i in range(N_JOBS)]
        result = submit(settings, specs, source="test")
        stats = tmp_path / "stats.json"
        worker = subprocess.run(
            [sys.executable, "-m", "benchmarks._standin_worker", "--name", "standin-1",
             "--max-jobs", str(N_JOBS), "--stats", str(stats)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert worker.returncode == 0, worker.stderr[-3000:]

        store = open_store(settings)
        status = batch_status(store, result.batch, settings)
        assert status.counts == {"succeeded": N_JOBS}, status.to_json()
        for job in result.jobs:
            for k in range(job.spec.n):
                png = store.get(image_key(job.batch, job.id, k))
                image = Image.open(io.BytesIO(png))
                assert image.size == (112, 144)
                assert image.convert("RGB").getpixel((5, 5)) == seed_colour(job.spec.seed + k)
                side = json.loads(store.get(sidecar_key(job.batch, job.id, k)))
                assert side["worker"] == "standin-1" and side["dtype"] == "standin"
        counted = json.loads(stats.read_text())
        assert counted["jobs"] == N_JOBS
        images = sum(s.n for s in specs)
        assert counted["store_calls"]["put image"] == images
        assert counted["store_calls"]["put record"] == 2 * N_JOBS  # running, succeeded
    finally:
        broker.stop_broker(settings)


def test_standin_output_is_deterministic_and_needs_no_torch() -> None:
    # the worker's control plane too: a stand-in worker process starts without torch
    code = ("import sys, farm.worker.standin as s, farm.worker.runtime, farm.worker.stage\n"
            "from farm import models\n"
            "from farm.jobs import JobSpec\n"
            "from farm.settings import Settings\n"
            "spec = JobSpec.from_dict({'prompt': 'x', 'seed': 7, 'n': 3, 'width': 64, "
            "'height': 64}, Settings.load(env={}))\n"
            "model = s.load_model(models.resolve('tiny-sdxl'), Settings.load(env={}), 'cpu')\n"
            "a = [i.tobytes() for i in s.render(model, spec)]\n"
            "b = [i.tobytes() for i in s.render(model, spec)]\n"
            "assert a == b and len(a) == 3 and len(set(a)) == 3\n"
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)

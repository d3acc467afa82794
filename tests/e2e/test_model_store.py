"""A fleet on the store's catalog: a tiny model pushed once into S3 (moto over HTTP) with
`farm models push`; two worker processes on one machine pull it at once into the machine's cache
and render; a third worker loads the same weights from a local folder (diffusers' own fp16 cast
of the source) and renders the same jobs. Same pixels, one download of each blob."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import torch
from PIL import Image

from farm import catalog
from farm.records import read_records
from farm.settings import Settings
from farm.store import get_json, open_store
from farm.worker import tiny
from tests.conftest import ROOT, farm_cmd, run_farm

JOBS = [{"prompt": f"a lighthouse {i}", "seed": 40 + i, "steps": 4, "width": 128,
         "height": 128} for i in range(2)]


def _submit(env: dict[str, str], tmp_path: Path, model: str) -> str:
    path = tmp_path / f"{re.sub(r'[^a-z0-9]+', '-', model)}.jsonl"
    path.write_text("".join(json.dumps({**job, "model": model}) + "\n" for job in JOBS))
    sub = run_farm(env, "submit", str(path), "--json")
    assert sub.returncode == 0, sub.stderr
    batch: str = json.loads(sub.stdout)["batch"]
    return batch


def _pixels(store: object, batch: str) -> dict[str, tuple[bytes, dict]]:
    """prompt -> (raw pixels, sidecar) of each image of a batch."""
    out = {}
    for record in read_records(store, batch).values():  # type: ignore[arg-type]
        assert record.state == "succeeded", (record.state, record.error)
        for key in record.images:
            side = get_json(store, key[:-4] + ".json")  # type: ignore[arg-type]
            png = store.get(key)  # type: ignore[attr-defined]
            out[side["prompt"]] = (Image.open(io.BytesIO(png)).tobytes(), side)
    return out


def test_two_workers_pull_one_pushed_model_and_render_what_a_local_folder_renders(
        s3_env: dict[str, str], redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    env = {**s3_env, "FARM_BROKER_URL": redis_url, "FARM_BUCKETS": "128x128"}
    settings = Settings.load(env=env)
    store = open_store(settings)
    source = models_dir / "tiny-sdxl"
    tiny.build_tiny("tiny-sdxl", source)
    pushed = run_farm(env, "models", "push", str(source), "--name", "fleet-tiny", "--json")
    assert pushed.returncode == 0, pushed.stderr
    manifest = catalog.find(store, "fleet-tiny")
    assert json.loads(pushed.stdout)["digest"] == manifest.digest

    from diffusers import StableDiffusionXLPipeline

    local = tmp_path / "local-fp16"
    StableDiffusionXLPipeline.from_pretrained(source, dtype=torch.float16).save_pretrained(local)

    pulled_batch = _submit(env, tmp_path, "fleet-tiny")
    local_batch = _submit(env, tmp_path, str(local))

    # two workers of one machine (one FARM_HOME, one model cache), started together
    workers = [subprocess.Popen(farm_cmd("worker", "--device", "cpu", "--model", "fleet-tiny",
                                         "--name", f"pull-{i}", "--max-jobs", "1"),
                                env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = []
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        logs.append(err)
    one = subprocess.run(farm_cmd("worker", "--device", "cpu", "--model", str(local),
                                  "--name", "local", "--max-jobs", str(len(JOBS))),
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    # each blob was downloaded once on this machine, whichever worker fetched it
    fetched = sum(int(n) for log in logs for n in re.findall(r"pulled (\d+) blobs", log))
    assert fetched == len({f.sha256 for f in manifest.files}), logs

    pulled, from_folder = _pixels(store, pulled_batch), _pixels(store, local_batch)
    assert sorted(pulled) == sorted(from_folder) == sorted(j["prompt"] for j in JOBS)
    assert {side["worker"] for _, side in pulled.values()} == {"pull-0", "pull-1"}
    for prompt, (pixels, side) in pulled.items():
        assert side["model_catalog"] == {"name": "fleet-tiny", "version": 1,
                                         "variant": "fp16", "manifest": manifest.digest}
        assert from_folder[prompt][1]["model_catalog"] is None
        assert pixels == from_folder[prompt][0], prompt

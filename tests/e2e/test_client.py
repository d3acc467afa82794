"""The Python client (`from farm import Farm`) and `farm replay` against a real worker process,
the real Redis and S3 over HTTP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from farm import Farm
from farm.errors import UsageError
from farm.jobs import JobSpec
from farm.records import read_manifest
from farm.settings import Settings
from farm.store import get_json
from tests.conftest import ROOT, farm_cmd, run_farm


@pytest.fixture
def farm_env(s3_env: dict[str, str], redis_url: str) -> dict[str, str]:
    # the two sizes these tests render: a worker warms each bucket before it is ready
    return {**s3_env, "FARM_BROKER_URL": redis_url, "FARM_BUCKETS": "64x64,128x128"}


def _worker(env: dict[str, str], jobs: int, *models: str) -> subprocess.Popen[str]:
    args = [a for m in models for a in ("--model", m)]
    return subprocess.Popen(farm_cmd("worker", "--device", "cpu", "--name", "w1", "--max-jobs",
                                     str(jobs), *args),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _done(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)


def test_a_batch_submitted_from_python_yields_each_image_as_its_job_succeeds(
        farm_env: dict[str, str]) -> None:
    farm = Farm(Settings.load(env=farm_env))
    slow = JobSpec.from_dict({"prompt": "a slow one", "seed": 3, "steps": 80, "width": 128,
                              "height": 128}, farm.settings)
    batch = farm.submit(["a red fox", {"prompt": "a lighthouse", "seed": 7, "negative_prompt":
                                       "fog"}, slow], steps=4, size="64x64", seed=100)
    assert batch.status().state == "queued" and len(batch.status().jobs) == 3
    worker = _worker(farm_env, 3)
    try:
        results = []
        for result in batch.iter_results(timeout=300):
            # the first image comes while the slow job still runs: as it lands, not at the end
            results.append((result, batch.status().finished))
        assert [r.job for r, _ in results] == [j.id for j in batch.status().jobs]
        assert results[0][1] is False
    finally:
        _done(worker)
    st = batch.wait(timeout=10)
    assert st.state == "succeeded"
    stored = {key for job in st.jobs for key in job.images}
    assert {r.key for r, _ in results} == stored and len(stored) == 3
    for result, _ in results:
        assert result.png == farm.store.get(result.key)
        assert result.sidecar == get_json(farm.store, result.key.replace(".png", ".json"))
        assert result.sidecar["job"] == result.job and result.index == 0
    sizes = [r.image().size for r, _ in results]
    assert sizes == [(64, 64), (64, 64), (128, 128)]
    assert [r.sidecar["seed"] for r, _ in results] == [100, 7, 3]
    assert results[1][0].sidecar["negative_prompt"] == "fog"
    assert farm.batch(batch.id).status().state == "succeeded"  # reopened by id


def test_cancel_a_queued_batch_and_bad_input_from_python(farm_env: dict[str, str]) -> None:
    farm = Farm(Settings.load(env=farm_env))
    batch = farm.submit(["one", "two", "three"], steps=2)  # no worker: they stay queued
    canceled = batch.cancel()
    assert len(canceled.marked) == 3 and canceled.stopping == [] and canceled.done == []
    assert batch.wait(timeout=10).state == "canceled"
    assert farm.batch(batch.id).status().counts == {"canceled": 3}
    keyed = farm.submit(["one", "two"], steps=2, idempotency_key="nightly-42")
    retried = farm.submit(["one", "two"], steps=2, idempotency_key="nightly-42")
    assert retried.id == keyed.id and retried.submitted is not None
    assert retried.submitted.continued and retried.submitted.sent == 0
    with pytest.raises(UsageError, match="exists with a different request"):
        farm.submit(["one", "three"], steps=2, idempotency_key="nightly-42")
    keyed.cancel()
    told = farm.submit(["one"], steps=2, notify="http://127.0.0.1:9/hook")
    assert read_manifest(farm.store, told.id, farm.settings).notify == "http://127.0.0.1:9/hook"
    told.cancel()
    assert told.counts().state == "canceled" and told.counts().total == 1
    before = farm.store.list_dirs("batches")
    with pytest.raises(UsageError, match="must be an http:// or https:// URL"):
        farm.submit(["one"], notify="ftp://example.com/hook")
    with pytest.raises(UsageError) as err:
        farm.submit([{"prompt": "fine"}, {"prompt": "bad", "guidance": 99}])
    assert str(err.value) == "jobs[1].guidance must be a number from 0 to 30, got 99"
    assert farm.store.list_dirs("batches") == before  # nothing submitted


def test_replay_renders_the_same_bytes_from_the_png_and_from_the_sidecar(
        farm_env: dict[str, str], tmp_path: Path) -> None:
    farm = Farm(Settings.load(env=farm_env))
    first = farm.submit([{"prompt": "a lighthouse", "n": 2, "seed": 41, "steps": 6,
                          "scheduler": "euler_a", "negative_prompt": "fog", "guidance": 6.5},
                         {"prompt": "a harbour", "preset": "quality", "seed": 5, "steps": 10}],
                        size="64x64")
    # two jobs, then one replay through the CLI, one through Python, and one whose sidecar
    # names other weights than the worker's
    worker = _worker(farm_env, 5, "tiny-sdxl", "tiny-sdxl-refiner")
    try:
        originals = {(r.job, r.index): r for r in first.iter_results(timeout=300)}
        assert first.status().state == "succeeded"
        second_image = originals[(f"{first.id}-0000", 1)]  # seed 42: image 1 of seed 41
        quality = originals[(f"{first.id}-0001", 0)]
        assert quality.sidecar["refiner"] == "tiny-sdxl-refiner"
        png = tmp_path / "lighthouse.png"
        png.write_bytes(second_image.png)
        sidecar = tmp_path / "harbour.json"
        sidecar.write_text(json.dumps(quality.sidecar))

        cli = run_farm(farm_env, "replay", str(png), "--wait", "--json")
        assert cli.returncode == 0, cli.stderr[-3000:]
        replayed = farm.batch(json.loads(cli.stdout.splitlines()[0])["batch"])
        from_python = farm.replay(sidecar)
        again = {**{"cli": list(replayed.iter_results(timeout=300))},
                 "python": list(from_python.iter_results(timeout=300))}
        other = tmp_path / "other-weights.json"
        other.write_text(json.dumps({**quality.sidecar, "model_hash": "0123456789" * 6 + "abcd"}))
        refused = farm.replay(other).wait(timeout=300)
    finally:
        _done(worker)
    (cli_image,), (py_image,) = again["cli"], again["python"]
    assert cli_image.png == second_image.png  # byte-identical: pixels and parameters
    assert py_image.png == quality.png
    for new, old in ((cli_image, second_image), (py_image, quality)):
        keep = ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "width",
                "height", "model", "model_hash", "refiner", "switch", "preset", "cfg_cutoff",
                "vae")
        assert {k: new.sidecar.get(k) for k in keep} == {k: old.sidecar.get(k) for k in keep}
        assert new.sidecar["batch"] != old.sidecar["batch"]
    assert from_python.replayed is not None and from_python.replayed.same_weights(py_image.sidecar)
    # a replay runs on the weights its image was made with, or fails before rendering
    assert refused.state == "failed", refused.to_json()
    (job,) = refused.jobs
    assert "asks for tiny-sdxl with weights sha256:012345678901; this worker's are " \
        f"sha256:{quality.sidecar['model_hash'][:12]}" in (job.error or ""), job.error
    assert not job.images


def test_replay_of_what_is_not_the_farms_exits_2_in_one_line_and_submits_nothing(
        env: dict[str, str], tmp_path: Path) -> None:
    plain = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(plain)
    broken = tmp_path / "broken.json"
    broken.write_text('{"prompt": "a cat", ')
    for path, message in ((plain, f"error: {plain} has no farm metadata"),
                          (broken, f"error: {broken} is neither a PNG nor a JSON sidecar"),
                          (tmp_path / "gone.png", f"error: {tmp_path / 'gone.png'} does not "
                                                  "exist")):
        result = run_farm(env, "replay", str(path))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
        assert result.stdout == ""
    assert not (Path(env["FARM_HOME"]) / "store" / "batches").exists()

"""Job records, queue names, PNG metadata and the contact sheet: no Redis, no torch."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from farm import queues
from farm.images import a1111_parameters, contact_sheet, encode_png, read_parameters
from farm.jobs import JobSpec
from farm.keys import image_key, manifest_key, record_key, sidecar_key
from farm.lifecycle import JobRecord, JobState
from farm.records import Manifest
from farm.scheduler.status import batch_status
from farm.settings import Settings
from farm.store import FileStore

SETTINGS = Settings.load(env={})


def spec(**fields: object) -> JobSpec:
    return JobSpec.from_dict({"prompt": "a cat", "seed": 7, **fields}, SETTINGS)


def test_record_follows_the_lifecycle_and_refuses_a_skip() -> None:
    r = JobRecord(job="b-0000", batch="b")
    r = r.to(JobState.RUNNING, attempts=1)
    r = r.to(JobState.SUCCEEDED, images=["k"])
    assert r.state is JobState.SUCCEEDED and r.attempts == 1 and r.updated_at
    with pytest.raises(ValueError, match="cannot go from succeeded to running"):
        r.to(JobState.RUNNING)
    with pytest.raises(ValueError, match="cannot go from queued to succeeded"):
        JobRecord(job="b-0000", batch="b").to(JobState.SUCCEEDED)


def test_record_round_trips_through_json() -> None:
    r = JobRecord(job="b-0001", batch="b").to(JobState.RUNNING, attempts=2, worker="w1")
    assert JobRecord.decode(r.encode()) == r


def test_a_manifest_keeps_a_snapped_jobs_origin() -> None:
    from farm.jobs import Job

    snapped = spec(model="sdxl-base", width=1000, height=1000, snap=True)
    manifest = Manifest(batch="b1", created_at=1.0, source="x", defaults={},
                        jobs=[Job(id="b1-0000", batch="b1", index=0, spec=snapped, vram_class=24)])
    (job,) = Manifest.decode(manifest.encode(), SETTINGS).jobs
    assert job.spec == snapped and job.spec.snapped_from == "1000x1000"


def test_keys_are_deterministic_per_job_and_image() -> None:
    assert manifest_key("b") == "batches/b/manifest.json"
    assert record_key("b", "b-0002") == "batches/b/jobs/b-0002.json"
    assert image_key("b", "b-0002", 1) == "batches/b/images/b-0002-1.png"
    assert sidecar_key("b", "b-0002", 1) == "batches/b/images/b-0002-1.json"


def test_queue_names() -> None:
    assert queues.queue_name("tiny-sdxl", 8, 5) == "farm.tiny-sdxl.8gb.p5"
    assert queues.queue_name("stabilityai/stable-diffusion-xl-base-1.0", 24, 9) == \
        "farm.sdxl-base.24gb.p9"
    path_queue = queues.queue_name("/models/my-sdxl", 12, 0)
    assert path_queue.startswith("farm.path-") and path_queue.endswith(".12gb.p0")
    assert "/" not in path_queue
    with pytest.raises(ValueError):
        queues.queue_name("tiny-sdxl", 8, 10)
    assert queues.redis_lists("farm.tiny-sdxl.8gb.p5") == ["farm.tiny-sdxl.8gb.p5"]


def test_png_carries_a1111_parameters_and_is_byte_stable() -> None:
    s = spec(negative_prompt="blurry", scheduler="euler_a", guidance=7.5, width=192, height=80)
    text = a1111_parameters(s, 7, "abcdef0123456789")
    assert text.splitlines() == [
        "a cat", "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 192x80, "
        "Model hash: abcdef0123, Model: tiny-sdxl"]
    img = Image.new("RGB", (192, 80), (10, 20, 30))
    a, b = encode_png(img, text), encode_png(img.copy(), text)
    assert a == b
    assert read_parameters(a) == text


def test_contact_sheet_holds_every_image_in_a_grid() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    items = [(Image.new("RGB", (64, 64), c), f"seed {i} · a prompt") for i, c in enumerate(colours)]
    sheet = contact_sheet(items, cell=64, title="batch x")
    # 5 images → 3 columns, 2 rows
    assert sheet.width == 3 * (64 + 8) + 8
    centre = [(8 + c * 72 + 32, 30 + 8 + r * (64 + 34 + 8) + 32) for r in range(2)
              for c in range(3)][:5]
    assert [sheet.getpixel(p) for p in centre] == colours
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    with pytest.raises(ValueError):
        contact_sheet([])


def test_status_counts_and_batch_state(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from farm.jobs import Job
    from farm.store import put_json

    store = FileStore(tmp_path)
    jobs = [Job(id=f"b1-{i:04d}", batch="b1", index=i, spec=spec(), vram_class=4)
            for i in range(3)]
    put_json(store, manifest_key("b1"),
             Manifest(batch="b1", created_at=1.0, source="x", defaults={}, jobs=jobs).encode())
    st = batch_status(store, "b1", SETTINGS)
    assert (st.state, st.counts, st.done) == ("queued", {"queued": 3}, 0)
    _plant(store, JobRecord(job="b1-0000", batch="b1").to(JobState.RUNNING))
    assert batch_status(store, "b1", SETTINGS).state == "running"
    _plant(store, JobRecord(job="b1-0000", batch="b1", state=JobState.SUCCEEDED))
    _plant(store, JobRecord(job="b1-0001", batch="b1", state=JobState.SUCCEEDED))
    _plant(store, JobRecord(job="b1-0002", batch="b1", state=JobState.FAILED,
                                  error="boom"))
    st = batch_status(store, "b1", SETTINGS)
    assert (st.state, st.counts) == ("failed", {"succeeded": 2, "failed": 1})
    assert st.to_json()["jobs"][2] == {"id": "b1-0002", "state": "failed", "images": [],
                                        "error": "boom"}


def _plant(store: Any, record: JobRecord) -> None:
    """Put a record in the store as a worker would have left it (a test's set-up)."""
    from farm.keys import record_key
    from farm.store import put_json

    put_json(store, record_key(record.batch, record.job), record.encode())

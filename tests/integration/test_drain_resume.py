"""A stage handed back on a worker's shutdown, and resumed by another worker, in-process on real
tiny pipelines and a real store: the checkpoint, its verification, the resume message's checks,
and that the resumed image equals the uninterrupted one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from farm import models, vram
from farm.errors import IntegrityError, ValidationError
from farm.jobs import Job, JobSpec, Message, ResumePoint
from farm.keys import checkpoint_key
from farm.lifecycle import JobState, read_record
from farm.settings import Settings
from farm.store import FileStore, get_json
from farm.worker import latents, pipelines
from farm.worker.drain import Drain
from farm.worker.render import Continue
from farm.worker.stage import WorkerContext, run_message
from tests.integration.helpers import one_job_batch

BATCH = "20261129-000000-d4a1b2"


class Farm:
    """One job in a real store; workers that stop after a given step, and the queue."""

    def __init__(self, loaded: dict[str, Any], tmp: Path, **fields: Any) -> None:
        self.loaded = loaded
        self.settings: Settings = loaded["settings"]
        self.store = FileStore(tmp / "store")
        self.spec = JobSpec.from_dict({"prompt": "a lighthouse", "seed": 5, "steps": 12,
                                       "width": 64, "height": 64, **fields}, self.settings)
        self.job = one_job_batch(self.store, BATCH, self.spec, self.settings)
        self.queued: list[Job] = []

    def worker(self, name: str, *, stop_after: int | None = None, grace: float = 0.5,
               serve: tuple[str, ...] = ("tiny-sdxl",)) -> WorkerContext:
        """A worker that gets SIGTERM after its `stop_after`-th step (a `grace` s period)."""
        drain = Drain(grace)
        steps = [0]

        def progressed() -> None:
            steps[0] += 1
            if stop_after is not None and steps[0] == stop_after:
                drain.request()

        return WorkerContext(settings=self.settings, store=self.store,
                             models={m: self.loaded[m] for m in serve},
                             name=name, vram_class=24,
                             backend=pipelines, enqueue=self.queued.append,
                             on_progress=progressed, drain=drain)

    def run(self, job: Job, ctx: WorkerContext) -> Any:
        # through the wire format: the worker decodes (and checks) every message
        return run_message(ctx, job.encode())

    def record(self) -> Any:
        return read_record(self.store, BATCH, self.job.id)

    def pixels(self, k: int = 0) -> np.ndarray:
        from PIL import Image

        return np.array(Image.open(self.store.root / "batches" / BATCH / "images" /
                                   f"{self.job.id}-{k}.png"))

    def intermediates(self) -> list[str]:
        return self.store.list_keys(f"batches/{BATCH}/intermediate/")


@pytest.mark.parametrize(("scheduler", "n", "stop_after", "image", "step"), [
    ("euler", 1, 5, 0, 5),
    ("euler_a", 2, 16, 1, 4),     # image 0 finished, image 1 at step 4
    ("euler", 2, 12, 1, 0),       # image 0 just finished: image 1 starts from scratch
])
def test_a_full_stage_handed_back_resumes_to_the_uninterrupted_image(
        loaded: dict[str, Any], tmp_path: Path, scheduler: str, n: int, stop_after: int,
        image: int, step: int) -> None:
    farm = Farm(loaded, tmp_path, scheduler=scheduler, n=n, cfg_cutoff=0.5)
    expected = [np.array(im) for im in pipelines.render(loaded["tiny-sdxl"], farm.spec)]

    outcome = farm.run(farm.job, farm.worker("w-stopping", stop_after=stop_after))
    assert outcome.state == "handed_back", outcome
    record = farm.record()
    assert record.state == JobState.QUEUED and record.error is None
    assert record.note == (f"handed back at step {step}/12 of image {image + 1}/{n} on worker "
                           "w-stopping's shutdown")
    assert record.stages["full"]["attempts"] == 0  # a hand-back is not an attempt
    (resume_msg,) = farm.queued
    key = checkpoint_key(BATCH, farm.job.id, "full", image, step)
    assert resume_msg.resume == ResumePoint(key=key, image=image, step=step)
    assert farm.intermediates() == [key]
    assert farm.store.list_keys(f"batches/{BATCH}/images/") == []

    assert farm.run(resume_msg, farm.worker("w-rescuer")).state == "succeeded"
    record = farm.record()
    assert record.state == JobState.SUCCEEDED and record.worker == "w-rescuer"
    assert record.stages["full"]["resumed"] == {"image": image, "step": step,
                                                "worker": "w-rescuer"}
    assert record.stages["full"]["attempts"] == 1
    assert [h["worker"] for h in record.stages["full"]["handed_back"]] == ["w-stopping"]
    for k in range(n):
        assert np.array_equal(farm.pixels(k), expected[k])
    side = get_json(farm.store, record.images[0].replace(".png", ".json"))
    assert side["stages"]["full"]["resumed"]["step"] == step
    assert farm.intermediates() == []  # the checkpoint is gone after success


def test_a_turbo_stage_hands_back_where_its_next_step_is_full_and_resumes_identical(
        loaded: dict[str, Any], tmp_path: Path) -> None:
    """The deep feature cache runs the full UNet at steps 0, 3, 6, 9 (and at 7, where the CFG
    cut-off after step 6 halves the batch). Stopping is asked for at step 4; the stage goes on
    to step 6, where the uninterrupted render computes in full too, so the resumed image is
    the same."""
    farm = Farm(loaded, tmp_path, preset="turbo", deep_cache=3, cfg_cutoff=0.5)
    expected = np.array(pipelines.render(loaded["tiny-sdxl"], farm.spec)[0])
    assert farm.run(farm.job, farm.worker("w-stopping", stop_after=4)).state == "handed_back"
    (resume_msg,) = farm.queued
    assert (resume_msg.resume.image, resume_msg.resume.step) == (0, 6)
    assert farm.run(resume_msg, farm.worker("w-rescuer")).state == "succeeded"
    assert np.array_equal(farm.pixels(0), expected)


# Every load profile loads on CPU (offloading is a no-op there; the VAE swap and fp8 storage are
# applied), so a stage is resumed under each; and a `vae: tiny` job (the fast preset's) on a
# worker whose profile keeps the model's VAE, which swaps the tiny one in for that job.
@pytest.mark.parametrize(("profile", "vae"), [*((p, "default") for p in vram.PROFILES),
                                              ("resident", "tiny")])
def test_a_stage_handed_back_resumes_under_every_load_profile(
        loaded: dict[str, Any], tmp_path: Path, profile: str, vae: str) -> None:
    settings = loaded["settings"]
    model = pipelines.load_model(models.TINY_BASE, settings, "cpu", vram.PROFILES[profile])
    unet_dtypes = {p.dtype for p in model.pipe.unet.parameters()}
    assert (torch.float8_e4m3fn in unet_dtypes) == vram.PROFILES[profile].fp8_weights
    farm = Farm({"settings": settings, "tiny-sdxl": model}, tmp_path, scheduler="euler_a", n=2,
                cfg_cutoff=0.5, vae=vae)
    expected = [np.array(im) for im in pipelines.render(model, farm.spec)]

    # image 0 finished (decoded from its latents on resume), image 1 stopped at step 4 of 12
    assert farm.run(farm.job, farm.worker("w-stopping", stop_after=16)).state == "handed_back"
    (resume_msg,) = farm.queued
    assert resume_msg.resume is not None
    assert (resume_msg.resume.image, resume_msg.resume.step) == (1, 4)

    assert farm.run(resume_msg, farm.worker("w-rescuer")).state == "succeeded"
    record = farm.record()
    assert record.stages["full"]["resumed"] == {"image": 1, "step": 4, "worker": "w-rescuer"}
    for k in range(2):
        assert np.array_equal(farm.pixels(k), expected[k]), (profile, vae, k)
    side = get_json(farm.store, record.images[1].replace(".png", ".json"))
    assert side["profile"] == profile and side["stages"]["full"]["resumed"]["step"] == 4


def test_resuming_leaves_the_worker_pipeline_in_its_own_dtype(loaded: dict[str, Any]) -> None:
    """The resume builds its img2img pipeline from the worker's own modules; building it must
    not cast them (diffusers' `from_pipe` casts to float32), or every later job on a CUDA
    worker would run in float32. bfloat16 stands in on CPU for a CUDA worker's float16."""
    settings = loaded["settings"]
    model = pipelines.load_model(models.TINY_BASE, settings, "cpu")
    model.pipe.to(dtype=torch.bfloat16)
    model = replace(model, dtype=torch.bfloat16)
    spec = JobSpec.from_dict({"prompt": "half precision", "seed": 3, "steps": 4, "width": 64,
                              "height": 64, "scheduler": "euler_a"}, settings)
    # the latents and generator after step 2, as a stopping worker checkpoints them
    seen: dict[str, Any] = {}

    def track(k: int, generator: torch.Generator, step: int) -> None:
        seen["generator"] = generator

    def step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == 1:
            seen["point"] = Continue(kwargs["latents"].clone(), 2,
                                     seen["generator"].get_state().clone())
        return kwargs

    pipelines.render(model, spec, callback=step, track=track)
    modules = {n: c for n, c in model.pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert {c.dtype for c in modules.values()} == {torch.bfloat16}
    (image,) = pipelines.render(model, spec, resume={0: seen["point"]})
    assert image.size == (64, 64)
    assert {n: c.dtype for n, c in modules.items()} == dict.fromkeys(modules, torch.bfloat16)


def test_a_long_grace_finishes_the_stage_and_writes_no_checkpoint(
        loaded: dict[str, Any], tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path)
    assert farm.run(farm.job, farm.worker("w-1", stop_after=3, grace=600)).state == "succeeded"
    assert farm.queued == [] and farm.intermediates() == []
    assert np.array_equal(farm.pixels(), np.array(pipelines.render(loaded["tiny-sdxl"],
                                                                   farm.spec)[0]))


def test_a_resumed_stage_handed_back_again_resumes_from_the_later_checkpoint(
        loaded: dict[str, Any], tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path, scheduler="euler_a")
    assert farm.run(farm.job, farm.worker("w-1", stop_after=3)).state == "handed_back"
    first = farm.queued.pop()
    assert farm.run(first, farm.worker("w-2", stop_after=4)).state == "handed_back"
    second = farm.queued.pop()
    assert second.resume is not None and second.resume.step == 7
    assert farm.intermediates() == [second.resume.key]  # the first checkpoint was replaced
    assert farm.run(second, farm.worker("w-3")).state == "succeeded"
    assert np.array_equal(farm.pixels(), np.array(pipelines.render(loaded["tiny-sdxl"],
                                                                   farm.spec)[0]))
    assert farm.record().attempts == 3 and farm.record().stages["full"]["attempts"] == 1


def test_the_split_base_stage_hands_back_and_the_job_equals_the_ensemble(
        loaded: dict[str, Any], tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path, refiner="tiny-sdxl-refiner", switch=0.75, split="always",
                scheduler="euler_a")
    assert farm.job.stage == "base"
    assert farm.run(farm.job, farm.worker("w-base", stop_after=4)).state == "handed_back"
    (resume_msg,) = farm.queued
    assert resume_msg.stage == "base" and resume_msg.resume is not None
    assert resume_msg.resume.step == 4
    farm.queued.clear()
    assert farm.run(resume_msg, farm.worker("w-base-2")).state == "latents_ready"
    (refine_msg,) = farm.queued
    assert refine_msg.stage == "refiner" and refine_msg.resume is None
    assert farm.intermediates() == [latents.handoff_key(farm.job)]  # checkpoint gone
    refiner = farm.worker("w-refiner", serve=("tiny-sdxl-refiner",))
    assert farm.run(refine_msg, refiner).state == "succeeded"
    expected = pipelines.ensemble(loaded["tiny-sdxl"], loaded["tiny-sdxl-refiner"], farm.spec)
    assert np.array_equal(farm.pixels(), np.array(expected[0]))
    assert farm.record().stages["base"]["resumed"]["step"] == 4


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_refiner_stage_handed_back_runs_again_from_the_base_latents(
        loaded: dict[str, Any], tmp_path: Path, in_memory: bool) -> None:
    """The refiner's checkpoint is its input: a stopping worker stores the base's latents if it
    held them only in memory (split "auto", both models here), puts the job back to
    latents_ready without counting the attempt, and queues the refiner stage again."""
    farm = Farm(loaded, tmp_path, refiner="tiny-sdxl-refiner", switch=0.5,
                split="auto" if in_memory else "always", scheduler="euler_a", steps=12)
    both = ("tiny-sdxl", "tiny-sdxl-refiner")
    if in_memory:
        # the base's 6 steps run here, then the refiner's: stop in the refiner's 2nd step
        stopping = farm.worker("w-both", stop_after=8, serve=both)
        assert farm.run(farm.job, stopping).state == "handed_back"
    else:
        assert farm.run(farm.job, farm.worker("w-base")).state == "latents_ready"
        (first,) = farm.queued
        farm.queued.clear()
        stopping = farm.worker("w-refiner", stop_after=2, serve=("tiny-sdxl-refiner",))
        assert farm.run(first, stopping).state == "handed_back"
    record = farm.record()
    assert record.state == JobState.LATENTS_READY and record.error is None
    assert record.note is not None and "refiner stage handed back" in record.note
    assert record.stages["refiner"]["attempts"] == 0  # not an attempt
    assert farm.intermediates() == [latents.handoff_key(farm.job)]
    assert farm.store.list_keys(f"batches/{BATCH}/images/") == []
    (again,) = farm.queued
    assert again.stage == "refiner" and again.resume is None

    assert farm.run(again, farm.worker("w-rescuer", serve=both)).state == "succeeded"
    expected = pipelines.ensemble(loaded["tiny-sdxl"], loaded["tiny-sdxl-refiner"], farm.spec)
    assert np.array_equal(farm.pixels(), np.array(expected[0]))
    record = farm.record()
    assert record.stages["refiner"]["attempts"] == 1
    assert [h["worker"] for h in record.stages["refiner"]["handed_back"]] == [stopping.name]
    assert farm.intermediates() == []


def test_a_damaged_or_foreign_checkpoint_is_refused_and_the_stage_runs_from_the_start(
        loaded: dict[str, Any], tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path)
    farm.run(farm.job, farm.worker("w-1", stop_after=5))
    (resume_msg,) = farm.queued
    assert resume_msg.resume is not None
    key = resume_msg.resume.key
    good = farm.store.get(key)
    model_hash = loaded["tiny-sdxl"].weights_hash
    assert latents.decode_checkpoint(good, resume_msg, model_hash).images[0].step == 5
    bad = bytearray(good)
    bad[-3] ^= 0xFF
    with pytest.raises(IntegrityError, match="fails its checksum"):
        latents.decode_checkpoint(bytes(bad), resume_msg, model_hash)
    with pytest.raises(IntegrityError, match="unreadable"):
        latents.decode_checkpoint(good[: len(good) // 2], resume_msg, model_hash)
    with pytest.raises(IntegrityError, match="model_hash is"):
        latents.decode_checkpoint(good, resume_msg, "0" * 64)
    other = replace(resume_msg, spec=replace(resume_msg.spec, seed=6))
    with pytest.raises(IntegrityError, match="seeds is"):
        latents.decode_checkpoint(good, other, model_hash)
    # damaged in the store: the resuming worker renders from step 0 (the same image, later)
    farm.store.put(key, bytes(bad))
    assert farm.run(resume_msg, farm.worker("w-2")).state == "succeeded"
    assert "unusable" in (farm.record().note or "")
    assert np.array_equal(farm.pixels(), np.array(pipelines.render(loaded["tiny-sdxl"],
                                                                   farm.spec)[0]))


def test_resume_fields_are_checked_like_every_other_field(loaded: dict[str, Any],
                                                          tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path)
    key = checkpoint_key(BATCH, farm.job.id, "full", 0, 5)
    good = {**farm.job.encode(), "resume": {"key": key, "image": 0, "step": 5}}
    assert farm.job.for_message(Message.decode(good)).resume == ResumePoint(key, 0, 5)
    hostile = [
        ({"key": f"batches/{BATCH}/jobs/{farm.job.id}.json", "image": 0, "step": 5},
         "message.resume.key"),
        ({"key": "batches/other-batch/intermediate/x/resume-full-0-0005.safetensors",
          "image": 0, "step": 5}, "message.resume.key"),
        ({"key": key.replace("0005", "0006"), "image": 0, "step": 5}, "message.resume.key"),
        ({"key": key, "image": 0, "step": 12}, "message.resume.step"),
        ({"key": key, "image": 1, "step": 5}, "message.resume.image"),
        ({"key": key, "image": 0, "step": True}, "message.resume.step"),
        ({"key": key, "image": 0}, "message.resume"),
        ({"key": key, "image": 0, "step": 5, "extra": 1}, "message.resume"),
        ("../../etc/passwd", "message.resume"),
    ]
    for value, field in hostile:
        with pytest.raises(ValidationError) as info:
            farm.job.for_message(Message.decode({**good, "resume": value}))
        assert str(info.value).startswith(field), (value, str(info.value))
    split = Farm(loaded, tmp_path / "s", refiner="tiny-sdxl-refiner", split="always")
    refiner_msg = {**replace(split.job, stage="refiner").encode(),
                   "resume": {"key": key, "image": 0, "step": 5}}
    with pytest.raises(ValidationError, match="only allowed on the full and base stages"):
        split.job.for_message(Message.decode(refiner_msg))
    # the worker refuses it before any model work
    outcome = run_message(farm.worker("w"), {**good, "resume": hostile[0][0]})
    assert outcome.state == "rejected" and "message.resume.key" in (outcome.error or "")

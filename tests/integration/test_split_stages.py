"""The base → refiner stages run in-process on real tiny pipelines and a real store: the
handoff, its verification, the split policies, and which stage runs again after a failure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from farm.jobs import Job, JobSpec
from farm.lifecycle import JobState, read_record
from farm.settings import Settings
from farm.store import FileStore, get_json
from farm.worker import latents, pipelines
from farm.worker.stage import WorkerContext, run_message
from tests.integration.helpers import one_job_batch

BATCH = "20261129-000000-abcdef"


class Farm:
    """One batch in a real store, a worker context, and the messages it enqueued."""

    def __init__(self, loaded: dict[str, Any], tmp: Path, serve: tuple[str, ...],
                 vram_class: int = 24, **fields: Any) -> None:
        self.settings: Settings = loaded["settings"]
        self.store = FileStore(tmp / "store")
        request = {"prompt": "a lighthouse", "seed": 5, "steps": 10, "width": 64, "height": 64,
                   "refiner": "tiny-sdxl-refiner", "switch": 0.6, "split": "always", **fields}
        self.spec = JobSpec.from_dict(request, self.settings)
        self.job = one_job_batch(self.store, BATCH, self.spec, self.settings)
        self.queued: list[Job] = []
        self.calls = {"base": 0, "refine": 0}
        self.fail_refine = 0
        self.ctx = self.context("w-both", serve, vram_class, loaded)

    def context(self, name: str, serve: tuple[str, ...], vram_class: int,
                loaded: dict[str, Any]) -> WorkerContext:
        farm = self

        class Backend:  # the real pipelines, counting calls (and failing when told to)
            @staticmethod
            def denoise_base(*a: Any, **k: Any) -> Any:
                farm.calls["base"] += 1
                return pipelines.denoise_base(*a, **k)

            @staticmethod
            def refine(*a: Any, **k: Any) -> Any:
                farm.calls["refine"] += 1
                if farm.fail_refine:
                    farm.fail_refine -= 1
                    raise RuntimeError("refiner fell over")
                return pipelines.refine(*a, **k)

            ensemble = staticmethod(pipelines.ensemble)

        return WorkerContext(settings=self.settings, store=self.store,
                             models={m: loaded[m] for m in serve},
                             name=name, vram_class=vram_class, backend=Backend,
                             enqueue=self.queued.append)

    def run(self, job: Job, ctx: WorkerContext | None = None) -> Any:
        return run_message(ctx or self.ctx, job.encode())

    def record(self) -> Any:
        return read_record(self.store, BATCH, self.job.id)

    def pixels(self) -> np.ndarray:
        from PIL import Image

        return np.array(Image.open(self.store.root / "batches" / BATCH / "images" /
                                   f"{self.job.id}-0.png"))


def reference(loaded: dict[str, Any], spec: JobSpec) -> np.ndarray:
    return np.array(pipelines.ensemble(loaded["tiny-sdxl"], loaded["tiny-sdxl-refiner"],
                                       spec)[0])


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_split_through_the_store_equals_the_one_process_ensemble(
        loaded: dict[str, Any], tmp_path: Path, scheduler: str) -> None:
    farm = Farm(loaded, tmp_path, ("tiny-sdxl",), 8, scheduler=scheduler)
    base_worker = farm.ctx
    refiner_worker = farm.context("w-refiner", ("tiny-sdxl-refiner",), 24, loaded)
    assert farm.run(farm.job).state == "latents_ready"
    assert farm.record().state == JobState.LATENTS_READY
    key = latents.handoff_key(farm.job)
    assert farm.store.exists(key)
    (refine_msg,) = farm.queued
    assert refine_msg.stage == "refiner" and refine_msg.stage_class == 4  # the tiny refiner
    assert farm.run(refine_msg, refiner_worker).state == "succeeded"
    assert np.array_equal(farm.pixels(), reference(loaded, farm.spec))
    record = farm.record()
    assert record.stages["base"]["worker"] == base_worker.name
    assert record.stages["refiner"]["worker"] == "w-refiner"
    assert (record.stages["base"]["vram_class"], record.stages["refiner"]["vram_class"]) == (8, 24)
    assert not farm.store.exists(key)  # the intermediate is gone after success
    side = get_json(farm.store, record.images[0].replace(".png", ".json"))
    assert side["stages"]["base"]["worker"] == base_worker.name
    assert side["stages"]["refiner"]["profile"] == "resident"
    assert side["stages"]["base"]["seconds"] > 0 and side["handed_off"] is True


def test_auto_finishes_on_the_base_worker_when_it_serves_the_refiner(
        loaded: dict[str, Any], tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path, ("tiny-sdxl", "tiny-sdxl-refiner"), split="auto")
    assert farm.run(farm.job).state == "succeeded"
    assert farm.queued == [] and farm.store.list_keys(f"batches/{BATCH}/intermediate/") == []
    assert np.array_equal(farm.pixels(), reference(loaded, farm.spec))
    stages = farm.record().stages
    assert stages["base"]["worker"] == stages["refiner"]["worker"] == "w-both"


def test_never_runs_both_halves_as_one_pair_stage(loaded: dict[str, Any],
                                                  tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path, ("tiny-sdxl", "tiny-sdxl-refiner"), split="never")
    assert farm.job.stage == "pair"
    assert farm.run(farm.job).state == "succeeded"
    assert farm.queued == [] and set(farm.record().stages) == {"pair"}
    assert np.array_equal(farm.pixels(), reference(loaded, farm.spec))


def test_a_failed_base_fails_the_job_and_never_queues_the_refiner(
        loaded: dict[str, Any], tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path, ("tiny-sdxl",), steps=10)
    ctx = replace(farm.ctx, backend=type("Broken", (), {"denoise_base": staticmethod(
        lambda *a, **k: (_ for _ in ()).throw(ValueError("base blew up")))}))
    outcome = farm.run(farm.job, ctx)
    assert outcome.state == "failed" and farm.queued == []
    record = farm.record()
    assert record.state == JobState.FAILED and record.error == "base stage: ValueError: " \
                                                                "base blew up"


def test_a_failed_refiner_retries_only_the_refiner_from_stored_latents(
        loaded: dict[str, Any], tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path, ("tiny-sdxl", "tiny-sdxl-refiner"), split="auto")
    farm.fail_refine = 1
    # in memory first; the failure stores the latents and queues the refiner stage alone
    assert farm.run(farm.job).state == "retrying"
    assert farm.record().state == JobState.LATENTS_READY
    (retry,) = farm.queued
    assert retry.stage == "refiner" and farm.store.exists(latents.handoff_key(farm.job))
    assert farm.run(retry).state == "succeeded"
    assert farm.calls == {"base": 1, "refine": 2}
    record = farm.record()
    assert record.stages["refiner"]["attempts"] == 2 and record.stages["base"]["attempts"] == 1
    assert np.array_equal(farm.pixels(), reference(loaded, farm.spec))


def test_refiner_gives_up_after_its_attempts(loaded: dict[str, Any], tmp_path: Path) -> None:
    farm = Farm(loaded, tmp_path, ("tiny-sdxl", "tiny-sdxl-refiner"), split="always")
    farm.run(farm.job)
    farm.fail_refine = 99
    for _ in range(3):
        outcome = farm.run(farm.queued.pop())
    assert outcome.state == "failed" and "refiner stage failed 3 times" in (outcome.error or "")
    assert farm.queued == [] and farm.calls["base"] == 1


def _handed_off(loaded: dict[str, Any], tmp_path: Path) -> Farm:
    farm = Farm(loaded, tmp_path, ("tiny-sdxl", "tiny-sdxl-refiner"), split="always")
    assert farm.run(farm.job).state == "latents_ready"
    return farm


def test_corrupt_latents_fail_clearly_and_write_no_image(loaded: dict[str, Any],
                                                         tmp_path: Path) -> None:
    farm = _handed_off(loaded, tmp_path)
    path = farm.store.root / latents.handoff_key(farm.job)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    outcome = farm.run(farm.queued[0])
    assert outcome.state == "failed" and "fails its checksum" in (outcome.error or "")
    assert farm.store.list_keys(f"batches/{BATCH}/images/") == []
    assert farm.record().state == JobState.FAILED


def test_truncated_missing_or_mismatched_latents_fail_clearly(loaded: dict[str, Any],
                                                              tmp_path: Path) -> None:
    farm = _handed_off(loaded, tmp_path)
    key = latents.handoff_key(farm.job)
    good = farm.store.get(key)
    with pytest.raises(Exception, match="unreadable"):
        latents.decode_handoff(good[: len(good) // 2], farm.job)
    other = replace(farm.job, spec=replace(farm.spec, switch=0.7))
    with pytest.raises(Exception, match="was made for other settings: switch is 0.6, this job "
                                        "has 0.7"):
        latents.decode_handoff(good, other)
    farm.store.delete(key)
    outcome = farm.run(farm.queued[0])
    assert outcome.state == "failed" and "are missing" in (outcome.error or "")
    assert farm.store.list_keys(f"batches/{BATCH}/images/") == []


def test_a_duplicate_base_delivery_only_requeues_the_refiner(loaded: dict[str, Any],
                                                            tmp_path: Path) -> None:
    farm = _handed_off(loaded, tmp_path)
    assert farm.run(farm.job).state == "latents_ready"
    assert farm.calls["base"] == 1 and [j.stage for j in farm.queued] == ["refiner", "refiner"]
    assert farm.run(farm.queued[0]).state == "succeeded"
    assert farm.run(farm.queued[1]).state == "duplicate"


def test_failed_jobs_keep_their_latents_until_farm_clean(loaded: dict[str, Any],
                                                         tmp_path: Path) -> None:
    from farm.scheduler.clean import clean_intermediates

    farm = Farm(loaded, tmp_path, ("tiny-sdxl", "tiny-sdxl-refiner"), split="always")
    farm.run(farm.job)
    key = latents.handoff_key(farm.job)
    # a job still on its way keeps its latents whatever their age
    assert clean_intermediates(farm.store, farm.settings, older_than_hours=0).deleted == []
    farm.fail_refine = 99
    for _ in range(3):
        farm.run(farm.queued.pop())
    assert farm.record().state == JobState.FAILED and farm.store.exists(key)
    kept = clean_intermediates(farm.store, farm.settings)  # failed just now: within 24 h
    assert kept.deleted == [] and kept.kept == 1
    dry = clean_intermediates(farm.store, farm.settings, older_than_hours=0, dry_run=True)
    assert dry.deleted == [key] and farm.store.exists(key)
    assert clean_intermediates(farm.store, farm.settings, older_than_hours=0).deleted == [key]
    assert not farm.store.exists(key)

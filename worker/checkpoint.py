"""The checkpoint of a stage handed back on a worker's shutdown (worker/drain.py): what another
worker needs to continue it exactly, in the handoff's format (worker/handoff.py: safetensors, a
sha256 over every tensor and the metadata).

    batches/<batch>/intermediate/<job>/resume-<stage>-<image>-<step>.safetensors
      tensors   latents.<k>     image k's latents: after `step` steps for the image in flight,
                                the finished ones for the images before it (still scaled)
                generator.<k>   its CPU generator's state then (an ancestral sampler draws more)
      metadata  "farm"          JSON: the job's settings as the handoff records them, the stage,
                                where it resumes (image, step), each image's step, the model's
                                weights hash, who handed it back and when
                "checksum"      as in the handoff

The resuming worker checks the checksum, that the job, stage, resume point and model weights
match; any difference is an IntegrityError and the stage starts again from step 0 (never a
wrong image, and no lost job: the steps are re-run).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from farm.errors import IntegrityError
from farm.jobs import Job, ResumePoint, checkpoint_key
from farm.worker import handoff
from farm.worker.drain import InFlight
from farm.worker.render import Continue

FORMAT = "farm-checkpoint/1"


def resume_point(job: Job, inflight: InFlight) -> ResumePoint:
    """Where the stage continues: the first image not complete, at the step it reached."""
    image = inflight.current
    state = inflight.images.get(image)
    step = state.done if state is not None else 0
    if state is not None and state.complete:
        image, step = image + 1, 0
    return ResumePoint(key=checkpoint_key(job.batch, job.id, job.stage, image, step),
                       image=image, step=step)


def encode(job: Job, inflight: InFlight, model_hash: str, worker: str
           ) -> tuple[bytes, ResumePoint]:
    point = resume_point(job, inflight)
    tensors: dict[str, torch.Tensor] = {}
    images: dict[str, Any] = {}
    for k, state in sorted(inflight.images.items()):
        if k > point.image or state.latents is None or (k == point.image and point.step == 0):
            continue
        tensors[f"latents.{k}"] = state.latents.detach().contiguous().cpu()
        tensors[f"generator.{k}"] = state.generator.get_state().clone()
        images[str(k)] = {"step": state.done, "done": k < point.image}
    meta = {**handoff._expected(job), "format": FORMAT, "stage": job.stage,
            "resume": {"image": point.image, "step": point.step}, "images": images,
            "model_hash": model_hash, "worker": worker, "written_at": time.time()}
    text = json.dumps(meta, sort_keys=True, default=str)
    data = bytes(st_save(tensors, metadata={"farm": text,
                                            "checksum": handoff._checksum(tensors, text)}))
    return data, point


@dataclass(frozen=True)
class Checkpoint:
    images: dict[int, Continue]
    meta: dict[str, Any]


def decode(data: bytes, job: Job, model_hash: str) -> Checkpoint:
    """Read and verify the checkpoint `job.resume` names; IntegrityError on any mismatch."""
    assert job.resume is not None
    where = f"checkpoint of job {job.id}"
    try:
        header_len = int.from_bytes(data[:8], "little")
        stored = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        text, checksum = stored["farm"], stored["checksum"]
        meta = json.loads(text)
        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001 - truncated or garbled bytes fail in many ways
        raise IntegrityError(f"{where} is unreadable ({type(exc).__name__})") from None
    if handoff._checksum(tensors, text) != checksum:
        raise IntegrityError(f"{where} fails its checksum: the stored object is corrupt")
    expected = {**handoff._expected(job), "format": FORMAT, "stage": job.stage,
                "resume": {"image": job.resume.image, "step": job.resume.step},
                "model_hash": model_hash}
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        k = wrong[0]
        raise IntegrityError(f"{where} was made for other settings: {k} is {meta.get(k)!r}, "
                             f"this job has {expected[k]!r}")
    shape = [1, 4, job.spec.height // 8, job.spec.width // 8]
    images: dict[int, Continue] = {}
    try:
        for name, info in meta["images"].items():
            index = int(name)
            latents, gen = tensors[f"latents.{index}"], tensors[f"generator.{index}"]
            if list(latents.shape) != shape or not 0 <= index < job.spec.n:
                raise IntegrityError(f"{where} has latents of shape {list(latents.shape)} for "
                                     f"image {index}, expected {shape}")
            images[index] = Continue(latents=latents, step=int(info["step"]), generator_state=gen,
                                 done=bool(info["done"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{where} is incomplete ({type(exc).__name__}: {exc})") from None
    point = images.get(job.resume.image)
    if job.resume.step > 0 and (point is None or point.done or point.step != job.resume.step):
        raise IntegrityError(f"{where} holds no latents for image {job.resume.image} at step "
                             f"{job.resume.step}")
    if any(k not in images or not images[k].done for k in range(job.resume.image)):
        raise IntegrityError(f"{where} misses a finished image before image {job.resume.image}")
    return Checkpoint(images=images, meta=meta)

"""The one codec for latents files: the base → refiner handoff and the checkpoint of a stage
handed back on a worker's shutdown (worker/drain.py). Both are safetensors with a sha256 over
every tensor and the metadata; keys come from farm/keys.py.

Handoff (intermediate/<job>/latents.safetensors):
      tensors   latents.<k>     (1, 4, H/8, W/8), the base's dtype, still scaled
                generator.<k>   the CPU generator's state after the base half (uint8)
      metadata  "farm"          JSON: job, image seeds, steps, switch, scheduler and its config,
                                the step the refiner starts at, prompts' sha256, base model and
                                weights hash, who ran the base and when
                "checksum"      sha256 over every tensor (name, dtype, shape, bytes) and "farm"

Checkpoint (intermediate/<job>/resume-<stage>-<image>-<step>.safetensors):
      tensors   latents.<k>     image k's latents: after `step` steps for the image in flight,
                                the finished ones for the images before it (still scaled)
                generator.<k>   its CPU generator's state then (an ancestral sampler draws more)
      metadata  "farm"          JSON: the job's settings as the handoff records them, the stage,
                                where it resumes (image, step), each image's step, the model's
                                weights hash, who handed it back and when
                "checksum"      as in the handoff

A reader checks the checksum and that the job (and for a checkpoint: the stage, resume point and
model weights) match what it runs; any difference is an IntegrityError: never a wrong image. A
refiner whose handoff fails fails clearly; a stage whose checkpoint fails starts again from
step 0 (the same image, later).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from farm import keys
from farm.errors import IntegrityError
from farm.jobs import Job, JobSpec, ResumePoint
from farm.worker.drain import InFlight
from farm.worker.render import Continue

HANDOFF_FORMAT = "farm-latents/1"
CHECKPOINT_FORMAT = "farm-checkpoint/1"


def handoff_key(job: Job) -> str:
    return keys.handoff_key(job.batch, job.id)


def _expected(job: Job) -> dict[str, Any]:
    """What the base ran and the refiner (or a resumed stage) must agree with."""
    spec: JobSpec = job.spec
    return {
        "format": HANDOFF_FORMAT, "batch": job.batch, "job": job.id, "seeds": spec.image_seeds(),
        "steps": spec.steps, "switch": spec.switch, "scheduler": spec.scheduler,
        "guidance": spec.guidance, "width": spec.width, "height": spec.height,
        "base_model": spec.model, "refiner": spec.refiner,
        "prompt_sha256": hashlib.sha256(spec.prompt.encode()).hexdigest(),
        "negative_sha256": hashlib.sha256(spec.negative_prompt.encode()).hexdigest(),
    }


def _checksum(tensors: dict[str, torch.Tensor], meta: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(meta.encode())
    return digest.hexdigest()


def _pack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    text = json.dumps(meta, sort_keys=True, default=str)
    return bytes(st_save(tensors, metadata={"farm": text, "checksum": _checksum(tensors, text)}))


def _unpack(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a latents file, its checksum verified."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        stored = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        text, checksum = stored["farm"], stored["checksum"]
        meta = json.loads(text)
        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001 - truncated or garbled bytes fail in many ways
        raise IntegrityError(f"{where} is unreadable ({type(exc).__name__}): the stored "
                             "object is damaged") from None
    if _checksum(tensors, text) != checksum:
        raise IntegrityError(f"{where} fails its checksum: the stored object is corrupt")
    return tensors, meta


def _check(meta: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        k = wrong[0]
        raise IntegrityError(f"{where} was made for other settings: {k} is {meta.get(k)!r}, "
                             f"this job has {expected[k]!r}")


# -- the handoff --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Handoff:
    latents: list[torch.Tensor]
    generator_states: list[torch.Tensor]
    meta: dict[str, Any]

    def generator(self, k: int) -> torch.Generator:
        g = torch.Generator("cpu")
        g.set_state(self.generator_states[k])
        return g


def encode_handoff(job: Job, latents: list[torch.Tensor], generators: list[torch.Generator],
                   base_info: dict[str, Any], scheduler_config: dict[str, Any]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for k, (lat, gen) in enumerate(zip(latents, generators, strict=True)):
        tensors[f"latents.{k}"] = lat.detach().contiguous().cpu()
        tensors[f"generator.{k}"] = gen.get_state().clone()
    first = tensors["latents.0"]
    return _pack(tensors, {
        **_expected(job), "shape": list(first.shape), "dtype": str(first.dtype),
        "images": len(latents),
        # the refiner's scheduler starts from the same config at the switch point
        "start_step": round(job.spec.steps * job.spec.switch),
        "scheduler_config": scheduler_config, "base": base_info})


def decode_handoff(data: bytes, job: Job) -> Handoff:
    """Read and verify a handoff for `job`; IntegrityError on any mismatch or damage."""
    where = f"the latents of job {job.id}"
    tensors, meta = _unpack(data, where)
    _check(meta, _expected(job), where)
    n = int(meta["images"])
    shape = [1, 4, job.spec.height // 8, job.spec.width // 8]
    latents = [tensors[f"latents.{k}"] for k in range(n)]
    if n != job.spec.n or any(list(t.shape) != shape for t in latents):
        raise IntegrityError(f"{where} have shape {[list(t.shape) for t in latents]}, "
                             f"expected {n} x {shape}")
    return Handoff(latents=latents,
                   generator_states=[tensors[f"generator.{k}"] for k in range(n)], meta=meta)


# -- the checkpoint of a handed-back stage --------------------------------------------------------


def resume_point(job: Job, inflight: InFlight) -> ResumePoint:
    """Where the stage continues: the first image not complete, at the step it reached."""
    image = inflight.current
    state = inflight.images.get(image)
    step = state.done if state is not None else 0
    if state is not None and state.complete:
        image, step = image + 1, 0
    return ResumePoint(key=keys.checkpoint_key(job.batch, job.id, job.stage, image, step),
                       image=image, step=step)


def encode_checkpoint(job: Job, inflight: InFlight, model_hash: str, worker: str
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
    meta = {**_expected(job), "format": CHECKPOINT_FORMAT, "stage": job.stage.value,
            "resume": {"image": point.image, "step": point.step}, "images": images,
            "model_hash": model_hash, "worker": worker, "written_at": time.time()}
    return _pack(tensors, meta), point


@dataclass(frozen=True)
class Checkpoint:
    images: dict[int, Continue]
    meta: dict[str, Any]


def decode_checkpoint(data: bytes, job: Job, model_hash: str) -> Checkpoint:
    """Read and verify the checkpoint `job.resume` names; IntegrityError on any mismatch."""
    assert job.resume is not None
    where = f"the checkpoint of job {job.id}"
    tensors, meta = _unpack(data, where)
    _check(meta, {**_expected(job), "format": CHECKPOINT_FORMAT, "stage": job.stage.value,
                  "resume": {"image": job.resume.image, "step": job.resume.step},
                  "model_hash": model_hash}, where)
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

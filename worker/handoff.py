"""The base → refiner handoff object: latents and everything needed to continue exactly.

One safetensors file per job, under the job's intermediate prefix:

    batches/<batch>/intermediate/<job>/latents.safetensors
      tensors   latents.<k>     (1, 4, H/8, W/8), the base's dtype, still scaled
                generator.<k>   the CPU generator's state after the base half (uint8)
      metadata  "farm"          JSON: job, image seeds, steps, switch, scheduler and its config,
                                the step the refiner starts at, prompts' sha256, base model and
                                weights hash, who ran the base and when
                "checksum"      sha256 over every tensor (name, dtype, shape, bytes) and "farm"

The refiner checks the checksum and that the job it was given matches what the base ran; any
difference is an IntegrityError (the stage fails clearly: never a wrong image).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from farm.errors import IntegrityError
from farm.jobs import Job, JobSpec
from farm.records import batch_prefix

FORMAT = "farm-latents/1"


def handoff_key(job: Job) -> str:
    return f"{batch_prefix(job.batch)}/intermediate/{job.id}/latents.safetensors"


def intermediate_prefix(batch: str, job_id: str) -> str:
    return f"{batch_prefix(batch)}/intermediate/{job_id}/"


def _expected(job: Job) -> dict[str, Any]:
    """What the base ran and the refiner must agree with."""
    spec: JobSpec = job.spec
    return {
        "format": FORMAT, "batch": job.batch, "job": job.id, "seeds": spec.image_seeds(),
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


@dataclass(frozen=True)
class Handoff:
    latents: list[torch.Tensor]
    generator_states: list[torch.Tensor]
    meta: dict[str, Any]

    def generator(self, k: int) -> torch.Generator:
        g = torch.Generator("cpu")
        g.set_state(self.generator_states[k])
        return g


def encode(job: Job, latents: list[torch.Tensor], generators: list[torch.Generator],
           base_info: dict[str, Any], scheduler_config: dict[str, Any]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for k, (lat, gen) in enumerate(zip(latents, generators, strict=True)):
        tensors[f"latents.{k}"] = lat.detach().contiguous().cpu()
        tensors[f"generator.{k}"] = gen.get_state().clone()
    first = tensors["latents.0"]
    meta = {**_expected(job), "shape": list(first.shape), "dtype": str(first.dtype),
            "images": len(latents),
            # the refiner's scheduler starts from the same config at the switch point
            "start_step": round(job.spec.steps * job.spec.switch),
            "scheduler_config": scheduler_config, "base": base_info}
    text = json.dumps(meta, sort_keys=True, default=str)
    return bytes(st_save(tensors, metadata={"farm": text,
                                            "checksum": _checksum(tensors, text)}))


def decode(data: bytes, job: Job) -> Handoff:
    """Read and verify a handoff for `job`; IntegrityError on any mismatch or damage."""
    where = f"latents of job {job.id}"
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        stored = header.get("__metadata__", {})
        text, checksum = stored["farm"], stored["checksum"]
        meta = json.loads(text)
        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001 - truncated or garbled bytes fail in many ways
        raise IntegrityError(f"{where} are unreadable ({type(exc).__name__}); the base "
                             "stage's output is damaged") from None
    if _checksum(tensors, text) != checksum:
        raise IntegrityError(f"{where} fail their checksum: the stored object is corrupt")
    expected = _expected(job)
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        k = wrong[0]
        raise IntegrityError(f"{where} were made for other settings: {k} is "
                             f"{meta.get(k)!r}, this job has {expected[k]!r}")
    n = int(meta["images"])
    shape = [1, 4, job.spec.height // 8, job.spec.width // 8]
    latents = [tensors[f"latents.{k}"] for k in range(n)]
    if n != job.spec.n or any(list(t.shape) != shape for t in latents):
        raise IntegrityError(f"{where} have shape {[list(t.shape) for t in latents]}, "
                             f"expected {n} x {shape}")
    return Handoff(latents=latents,
                   generator_states=[tensors[f"generator.{k}"] for k in range(n)], meta=meta)

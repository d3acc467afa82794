"""Rendering jobs with warm pipelines: one image per pipeline call, the job's sampler, its VAE
choice and CFG cut-off; and warming every shape a job can bring, before the first job.

Determinism: each image gets its own CPU `torch.Generator` seeded with its image seed, and images
are rendered one at a time. Same seed, same pixels on the same device type and thread count,
whatever else the job asks for: image k of a job equals that image rendered alone with seed + k.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDXLCFGCutoffCallback

from farm import jobs

if TYPE_CHECKING:
    from worker.pipelines import LoadedModel

# job scheduler name -> class, each built from_config of the model's own scheduler config
SCHEDULERS: dict[str, Any] = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
}
assert set(SCHEDULERS) == set(jobs.SCHEDULERS), "farm.jobs.SCHEDULERS and this map must agree"

# called after every denoising step as callback_on_step_end(pipe, step, timestep, kwargs)
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]

WARM_STEPS = 2


def make_scheduler(model: LoadedModel, name: str) -> Any:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})")
    return SCHEDULERS[name].from_config(model.scheduler_config)


def vae_used(model: Any, spec: jobs.JobSpec) -> str:
    """Which VAE decodes this job on this worker: the tiny one when asked for and present."""
    if spec.vae == "tiny" and getattr(model, "tiny_vae", None) is not None:
        return "tiny"
    return str(getattr(model, "vae_name", "default"))


def _prepare(model: LoadedModel, spec: jobs.JobSpec, callback: StepCallback | None,
             cfg_cutoff: float) -> dict[str, Any]:
    """Set the job's sampler and VAE on the pipeline; the step callbacks as call arguments."""
    pipe = model.pipe
    pipe.scheduler = make_scheduler(model, spec.scheduler)
    if model.profile_vae is not None:
        pipe.vae = model.tiny_vae if vae_used(model, spec) == "tiny" else model.profile_vae
    callbacks: list[Any] = []
    if cfg_cutoff > 0:
        # guidance off for the rest of the steps: the UNet batch drops from 2 to 1
        callbacks.append(SDXLCFGCutoffCallback(cutoff_step_ratio=cfg_cutoff))
    if callback is not None:
        callbacks.append(callback if isinstance(callback, PipelineCallback)
                         else _FunctionCallback(callback))
    if not callbacks:
        return {}
    combined = callbacks[0] if len(callbacks) == 1 else MultiPipelineCallbacks(callbacks)
    inputs = sorted({t for c in callbacks for t in c.tensor_inputs})
    return {"callback_on_step_end": combined, "callback_on_step_end_tensor_inputs": inputs}


class _FunctionCallback(PipelineCallback):  # type: ignore[misc]
    """A plain function as a diffusers PipelineCallback, so it combines with the cut-off."""

    tensor_inputs: list[str] = []

    def __init__(self, fn: StepCallback) -> None:
        super().__init__()
        self.fn = fn

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any,
                    callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.fn(pipeline, step_index, timestep, callback_kwargs)


def render(model: LoadedModel, spec: jobs.JobSpec, *,
           callback: StepCallback | None = None) -> list[PIL.Image.Image]:
    """Render the spec.n images of a job with a base model.

    `callback` runs after each step of image 0, then of image 1, ... (step_index restarts at 0
    for each image). To cancel, raise from it: the exception leaves render().
    """
    if model.spec.role != "base":
        raise ValueError(f"{model.name} is a refiner: it refines latents, it cannot render a job")
    extra = _prepare(model, spec, callback, spec.cfg_cutoff)
    images: list[PIL.Image.Image] = []
    # One call per image rather than a batch: batched kernels may round differently than a
    # batch of one, and image k must not depend on how many images its job had.
    for seed in spec.image_seeds():
        generator = torch.Generator("cpu").manual_seed(seed)
        result = model.pipe(
            prompt=spec.prompt,
            # None, not "": SDXL base then uses zero negative embeddings, as it was tuned with
            negative_prompt=spec.negative_prompt or None,
            width=spec.width, height=spec.height,
            num_inference_steps=spec.steps, guidance_scale=spec.guidance,
            num_images_per_prompt=1, generator=generator, output_type="pil", **extra,
        )
        images.extend(result.images)
    return images


def denoise_base(model: LoadedModel, spec: jobs.JobSpec, seed: int, *,
                 callback: StepCallback | None = None) -> tuple[torch.Tensor, torch.Generator]:
    """The base half of the ensemble for one image: denoise to `spec.switch`, return the
    still-scaled latents (1, 4, H/8, W/8) and the generator as it stands after them."""
    if model.spec.role != "base":
        raise ValueError(f"{model.name} is a refiner; the base half needs a base model")
    extra = _prepare(model, spec, callback, spec.cfg_cutoff)
    generator = torch.Generator("cpu").manual_seed(seed)
    result = model.pipe(
        prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
        width=spec.width, height=spec.height, num_inference_steps=spec.steps,
        guidance_scale=spec.guidance, denoising_end=spec.switch, output_type="latent",
        generator=generator, **extra,
    )
    return result.images, generator


def refine(model: LoadedModel, spec: jobs.JobSpec, latents: torch.Tensor,
           generator: torch.Generator, *,
           callback: StepCallback | None = None) -> PIL.Image.Image:
    """The refiner half for one image: continue `latents` from `spec.switch` to the end with
    the same steps and the base's generator (an ancestral sampler draws from it), decode. The
    CFG cut-off applies to the base's share of the steps only: the refiner's few steps keep
    full guidance."""
    if model.spec.role != "refiner":
        raise ValueError(f"{model.name} is a base model; the refiner half needs a refiner")
    extra = _prepare(model, spec, callback, 0.0)
    result = model.pipe(
        prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
        image=latents.to(device=model.device, dtype=model.dtype),
        num_inference_steps=spec.steps, denoising_start=spec.switch,
        guidance_scale=spec.guidance, generator=generator, output_type="pil", **extra,
    )
    return result.images[0]


def ensemble(base: LoadedModel, refiner: LoadedModel, spec: jobs.JobSpec) -> list[PIL.Image.Image]:
    """Both halves in one process, one generator per image: what a split job must equal."""
    images = []
    for seed in spec.image_seeds():
        latents, generator = denoise_base(base, spec, seed)
        images.append(refine(refiner, spec, latents, generator))
    return images


def warm(model: LoadedModel) -> float:
    """One tiny render at the model's default size, so the first job skips first-call costs
    (allocator growth, kernel selection, lazy imports). Returns the seconds it took."""
    spec = model.spec
    return warm_buckets(model, ((spec.default_width, spec.default_height),))


def warm_buckets(model: LoadedModel, buckets: tuple[tuple[int, int], ...]) -> float:
    """Run every UNet shape a job can bring at each bucket: with CFG (batch 2) and without
    (batch 1: a CFG cut-off, or guidance <= 1). With a compiled UNet this is where it compiles;
    afterwards no job of these buckets compiles again. Returns the seconds it took."""
    start = time.perf_counter()
    pipe = model.pipe
    pipe.scheduler = make_scheduler(model, "euler")
    for width, height in buckets:
        generator = torch.Generator("cpu").manual_seed(0)
        if model.spec.role == "refiner":
            latents = torch.zeros(1, 4, height // 8, width // 8, dtype=model.dtype,
                                  device=model.device)
            for guidance in (5.0, 1.0):
                pipe(prompt="warm up", image=latents, num_inference_steps=2 * WARM_STEPS,
                     denoising_start=0.5, guidance_scale=guidance, generator=generator)
        else:
            # two steps, the cut-off at the end of step int(2 * 0.25) = 0: step 0 runs with CFG
            # (UNet batch 2), step 1 without (batch 1)
            cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=0.25)
            pipe(prompt="warm up", width=width, height=height, num_inference_steps=WARM_STEPS,
                 generator=generator, callback_on_step_end=cutoff,
                 callback_on_step_end_tensor_inputs=cutoff.tensor_inputs)
    return time.perf_counter() - start

"""Rendering jobs with warm pipelines: one image per pipeline call, the job's sampler, its VAE
choice and CFG cut-off; and warming every shape a job can bring, before the first job.

Determinism: each image gets its own CPU `torch.Generator` seeded with its image seed, and images
are rendered one at a time. Same seed, same pixels on the same device type and thread count,
whatever else the job asks for: image k of a job equals that image rendered alone with its
image seed, (seed + k) mod 2**32 (JobSpec.image_seeds).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
from farm.worker.deepcache import FeatureCache
from farm.worker.model import LoadedModel

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
    _set_sampler_and_vae(model, spec)
    # guidance off for the rest of the steps: the UNet batch drops from 2 to 1
    cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=cfg_cutoff) if cfg_cutoff > 0 else None
    return _callbacks(callback, cutoff)


def _set_sampler_and_vae(model: LoadedModel, spec: jobs.JobSpec) -> None:
    pipe = model.pipe
    pipe.scheduler = make_scheduler(model, spec.scheduler)
    if model.profile_vae is not None:
        pipe.vae = model.tiny_vae if vae_used(model, spec) == "tiny" else model.profile_vae


def _callbacks(callback: StepCallback | None, cutoff: PipelineCallback | None
               ) -> dict[str, Any]:
    callbacks: list[Any] = [cutoff] if cutoff is not None else []
    if callback is not None:
        callbacks.append(callback if isinstance(callback, PipelineCallback)
                         else _FunctionCallback(callback))
    if not callbacks:
        return {}
    combined = callbacks[0] if len(callbacks) == 1 else MultiPipelineCallbacks(callbacks)
    inputs = sorted({t for c in callbacks for t in c.tensor_inputs})
    return {"callback_on_step_end": combined, "callback_on_step_end_tensor_inputs": inputs}


class _FunctionCallback(PipelineCallback):  # type: ignore[misc]
    """A plain function as a diffusers PipelineCallback, so it combines with the cut-off. It
    sees the latents after each step: a worker that is stopping checkpoints them
    (worker/drain.py)."""

    tensor_inputs: list[str] = ["latents"]

    def __init__(self, fn: StepCallback) -> None:
        super().__init__()
        self.fn = fn

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any,
                    callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.fn(pipeline, step_index, timestep, callback_kwargs)


# called before each image's denoising: (image index, its generator, the step it starts at)
ImageTracker = Callable[[int, torch.Generator, int], None]


@dataclass(frozen=True)
class Continue:
    """Where image k of a handed-back stage stands (worker/latents.py): `latents` after
    `step` of its steps, and its generator's state then; `done`: all its steps are done."""

    latents: torch.Tensor
    step: int
    generator_state: torch.Tensor
    done: bool = False

    def generator(self) -> torch.Generator:
        g = torch.Generator("cpu")
        g.set_state(self.generator_state)
        return g


def render(model: LoadedModel, spec: jobs.JobSpec, *,
           callback: StepCallback | None = None, resume: dict[int, Continue] | None = None,
           track: ImageTracker | None = None) -> list[PIL.Image.Image]:
    """Render the spec.n images of a job with a base model.

    `callback` runs after each step of image 0, then of image 1, ... (step_index restarts at 0
    for each image). To cancel, raise from it: the exception leaves render(). `resume` holds
    the images a handed-back stage had started: each continues from its step (one that was done
    is only decoded), the rest render from the start. `track` hears of each image's start.
    """
    if model.spec.role != "base":
        raise ValueError(f"{model.name} is a refiner: it refines latents, it cannot render a job")
    extra = _prepare(model, spec, callback, spec.cfg_cutoff)
    images: list[PIL.Image.Image] = []
    # One call per image rather than a batch: batched kernels may round differently than a
    # batch of one, and image k must not depend on how many images its job had.
    for k, seed in enumerate(spec.image_seeds()):
        point = (resume or {}).get(k)
        if point is not None and point.done:
            images.append(decode(model, point.latents))
            continue
        if point is not None and point.step > 0:
            generator = point.generator()
            if track is not None:
                track(k, generator, point.step)
            images.append(_continue(model, spec, point, generator, callback, end=None,
                                    output_type="pil"))
            continue
        generator = torch.Generator("cpu").manual_seed(seed)
        if track is not None:
            track(k, generator, 0)
        with feature_cache(model, spec):
            result = model.pipe(
                prompt=spec.prompt,
                # None, not "": SDXL base then uses zero negative embeddings, as it was tuned
                negative_prompt=spec.negative_prompt or None,
                width=spec.width, height=spec.height,
                num_inference_steps=spec.steps, guidance_scale=spec.guidance,
                num_images_per_prompt=1, generator=generator, output_type="pil", **extra,
            )
        images.extend(result.images)
    return images


def render_batch(model: LoadedModel, specs: list[jobs.JobSpec], *,
                 callback: StepCallback | None = None) -> list[list[PIL.Image.Image]]:
    """Render several jobs in one pipeline call (the worker's throughput mode,
    worker/batching.py): their prompts as one list, one generator per image seeded with its
    image seed. The jobs share everything else the call takes (worker/batching.py batch_key):
    the model, size, steps, sampler, guidance, CFG cut-off and VAE; negative prompts are all
    given or all empty; none has the deep feature cache (those render alone). Returns each job's spec.n images, in the order of `specs`.

    Batched kernels round differently than a batch of one, so on CPU an image rendered here is
    close to, not bit-identical with, the same image rendered alone (benchmarks/bench_recipe.py:
    about 89 dB PSNR). `callback` runs once per step of the whole call."""
    if model.spec.role != "base":
        raise ValueError(f"{model.name} is a refiner: it refines latents, it cannot render a job")
    first = specs[0]
    _set_sampler_and_vae(model, first)
    cutoff = _BatchCFGCutoff(cutoff_step_ratio=first.cfg_cutoff) if first.cfg_cutoff > 0 \
        else None
    extra = _callbacks(callback, cutoff)
    prompts, negatives, generators = [], [], []
    for spec in specs:
        for seed in spec.image_seeds():
            prompts.append(spec.prompt)
            negatives.append(spec.negative_prompt)
            generators.append(torch.Generator("cpu").manual_seed(seed))
    result = model.pipe(
        prompt=prompts,
        # None, not empty strings: SDXL base then uses zero negative embeddings
        negative_prompt=negatives if all(negatives) else None,
        width=first.width, height=first.height,
        num_inference_steps=first.steps, guidance_scale=first.guidance,
        num_images_per_prompt=1, generator=generators, output_type="pil", **extra,
    )
    images = list(result.images)
    out, at = [], 0
    for spec in specs:
        out.append(images[at:at + spec.n])
        at += spec.n
    return out


class _BatchCFGCutoff(SDXLCFGCutoffCallback):  # type: ignore[misc]
    """diffusers' CFG cut-off keeps the last row of each conditioning tensor, right for a batch
    of one only; with guidance on the rows are [negatives, prompts], so this keeps the second
    half: every image's own prompt."""

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any,
                    callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        cutoff_step = int(pipeline.num_timesteps * self.config["cutoff_step_ratio"])
        if step_index != cutoff_step or not pipeline.do_classifier_free_guidance:
            return callback_kwargs
        for name in self.tensor_inputs:
            rows = callback_kwargs[name]
            callback_kwargs[name] = rows[rows.shape[0] // 2:]
        pipeline._guidance_scale = 0.0
        return callback_kwargs


def denoise_base(model: LoadedModel, spec: jobs.JobSpec, seed: int, *,
                 callback: StepCallback | None = None, resume: Continue | None = None,
                 track: Callable[[torch.Generator, int], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Generator]:
    """The base half of the ensemble for one image: denoise to `spec.switch`, return the
    still-scaled latents (1, 4, H/8, W/8) and the generator as it stands after them. `resume`:
    continue a handed-back image from its step instead."""
    if model.spec.role != "base":
        raise ValueError(f"{model.name} is a refiner; the base half needs a base model")
    if resume is not None and resume.done:
        return resume.latents, resume.generator()
    if resume is not None and resume.step > 0:
        generator = resume.generator()
        if track is not None:
            track(generator, resume.step)
        _set_sampler_and_vae(model, spec)
        latents = _continue(model, spec, resume, generator, callback, end=spec.switch,
                            output_type="latent")
        return latents, generator
    extra = _prepare(model, spec, callback, spec.cfg_cutoff)
    generator = torch.Generator("cpu").manual_seed(seed)
    if track is not None:
        track(generator, 0)
    with feature_cache(model, spec):
        result = model.pipe(
            prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
            width=spec.width, height=spec.height, num_inference_steps=spec.steps,
            guidance_scale=spec.guidance, denoising_end=spec.switch, output_type="latent",
            generator=generator, **extra,
        )
    return result.images, generator


def feature_cache(model: LoadedModel, spec: jobs.JobSpec,
                  start_step: int = 0) -> contextlib.AbstractContextManager[Any]:
    """The job's deep feature cache (`deep_cache`, the turbo preset) on the model's UNet for
    one image's denoising loop, or nothing. A resumed image starts at `start_step` with a full
    step (there is no cached feature to reuse yet); stages are handed back only where the
    uninterrupted run computes in full too (worker/context.py at_full_step)."""
    if not spec.deep_cache:
        return contextlib.nullcontext()
    return FeatureCache(model.pipe.unet, spec.deep_cache, start_step)


def _schedule(model: LoadedModel, spec: jobs.JobSpec) -> tuple[torch.Tensor, int]:
    """The job's timesteps, and the scheduler's number of training timesteps."""
    scheduler = make_scheduler(model, spec.scheduler)
    scheduler.set_timesteps(spec.steps)
    return scheduler.timesteps, int(scheduler.config.num_train_timesteps)


def start_fraction(timesteps: torch.Tensor, train: int, step: int, spec: jobs.JobSpec) -> float:
    """The `denoising_start` at which an img2img pipeline runs exactly the steps from `step` on.
    diffusers keeps the timesteps below round(T - start * T); the cut goes just above timestep
    `step`, so steps 0..step-1 are not run again."""
    cut = int(torch.floor(timesteps[step]).item()) + 1
    start = (train - cut) / train
    kept = int((timesteps < int(round(train - start * train))).sum().item())
    if not 0 < start < 1 or kept != len(timesteps) - step:
        raise ValueError(f"cannot resume {spec.scheduler} at step {step} of {spec.steps}")
    return start


def _loop_steps(timesteps: torch.Tensor, train: int, end: float | None) -> int:
    """How many steps the uninterrupted pipeline call runs (to `end`, as diffusers cuts it)."""
    if end is None:
        return len(timesteps)
    cut = int(round(train - end * train))
    return int((timesteps >= cut).sum().item())


def _continue(model: LoadedModel, spec: jobs.JobSpec, point: Continue,
              generator: torch.Generator, callback: StepCallback | None, *, end: float | None,
              output_type: str) -> Any:
    """Continue one image from `point.step` with the base model's own components in an img2img
    pipeline (the latents as its image, `denoising_start` at that step): the same mechanism
    the refiner continues the base with. The CFG cut-off keeps its place in the whole run."""
    pipe = _img2img(model)
    timesteps, train = _schedule(model, spec)
    guidance, cutoff = spec.guidance, None
    if spec.cfg_cutoff > 0:
        at = int(_loop_steps(timesteps, train, end) * spec.cfg_cutoff)
        if at >= point.step:
            cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=None,
                                           cutoff_step_index=at - point.step)
        else:
            guidance = 0.0  # the uninterrupted run had turned guidance off already
    extra = _callbacks(callback, cutoff)
    try:
        with feature_cache(model, spec, point.step):
            result = pipe(
                prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
                image=point.latents.to(device=model.device, dtype=model.dtype),
                num_inference_steps=spec.steps,
                denoising_start=start_fraction(timesteps, train, point.step, spec),
                denoising_end=end, guidance_scale=guidance, generator=generator,
                output_type=output_type, **extra,
            )
    finally:
        # Under model offload the shared modules carry the worker pipeline's hooks, and only
        # that pipeline puts them all back on the CPU when a call ends (a no-op otherwise).
        model.pipe.maybe_free_model_hooks()
    return result.images if output_type == "latent" else result.images[0]


def _img2img(model: LoadedModel) -> Any:
    """The worker pipeline's own modules as they stand (the job's sampler, the VAE its profile
    or the job chose, the profile's fp8 storage and offload hooks) in an img2img pipeline.

    Built directly, not with diffusers' `from_pipe`: that drops a module whose class is not
    the new pipeline's type hint (the tiny VAE, AutoencoderTiny, of the lean profiles and of
    `vae: tiny` jobs, so the pipeline cannot be built), and casts every shared module to its
    `dtype` argument (float32 by default), which would undo the worker's fp16 weights and fp8
    storage for every later job."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = model.pipe
    pipe: Any = StableDiffusionXLImg2ImgPipeline(
        **base.components,
        force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt,
        add_watermarker=getattr(base, "watermark", None) is not None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def decode(model: LoadedModel, latents: torch.Tensor) -> PIL.Image.Image:
    """Decode finished latents to the image the pipeline itself would have returned (its own
    steps, diffusers' StableDiffusionXLPipeline: upcast, unscale, decode, watermark, convert)."""
    pipe = model.pipe
    latents = latents.to(device=model.device, dtype=model.dtype)
    needs_upcasting = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
    if needs_upcasting:
        pipe.upcast_vae()
        latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
    config = pipe.vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    if needs_upcasting:
        pipe.vae.to(dtype=torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


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

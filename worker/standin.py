"""A stand-in backend for load tests: no diffusion; for load tests only.

It has the interface the worker uses from `worker/pipelines.py` (`load_model`, `warm`, `render`,
`render_batch` for the throughput mode, and `ensemble` for a base + refiner pair on one worker), so `Worker(...,
backend=farm.worker.standin)` runs the real control plane - queue, message checks, job records, step
callbacks, PNG encoding, create-once image writes - while the "render" costs next to nothing.
That isolates what the farm itself spends per job from what the GPU spends.

Output is deterministic: image k of a job is a flat image of the job's size whose colour comes
from its seed (seed + k), so a duplicate delivery writes the same bytes as the first. It never
imports torch or diffusers, so it has no latents: the split stages that hand latents between
workers (`denoise_base`, `refine`) need farm.worker.pipelines and raise NotImplementedError here.

    Worker(settings, ["tiny-sdxl"], device="cpu", backend=farm.worker.standin)         # instant
    Worker(settings, ["tiny-sdxl"], device="cpu", backend=StandIn(render_seconds=2.0))

The fault tests inject faults through a subclass of it that lives with them (tests/faults.py:
crashes, hangs, CUDA errors, out of memory); nothing here can fail on purpose.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import PIL.Image

from farm.jobs import JobSpec
from farm.models import ModelSpec
from farm.settings import Settings

# the per-step callback of farm.worker.pipelines: callback(pipe, step_index, timestep, kwargs)
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


@dataclass
class StandInModel:
    """What a loaded model looks like to the worker; there are no weights behind it."""

    name: str
    spec: ModelSpec
    device: str
    dtype: str
    weights_hash: str
    load_seconds: float
    profile: str = "standin"


def seed_colour(seed: int) -> tuple[int, int, int]:
    """A flat RGB colour from a seed (Knuth's multiplicative hash spreads nearby seeds)."""
    mixed = (seed * 2654435761) & 0xFFFFFFFF
    return (mixed >> 24) & 0xFF, (mixed >> 16) & 0xFF, (mixed >> 8) & 0xFF


class StandIn:
    """The stand-in backend; `render_seconds` makes each image take that long (a sleep)."""

    def __init__(self, render_seconds: float = 0.0) -> None:
        if render_seconds < 0:
            raise ValueError(f"render_seconds must be 0 or more, got {render_seconds}")
        self.render_seconds = render_seconds

    def load_model(self, spec: ModelSpec, settings: Settings, device: str,
                   profile: Any = None) -> StandInModel:
        """`profile` (a farm.vram profile) is accepted and ignored: nothing is loaded."""
        start = time.perf_counter()
        # a stable identity that can never be mistaken for real weights
        digest = hashlib.sha256(f"farm-standin:{spec.name}".encode()).hexdigest()
        return StandInModel(name=spec.name, spec=spec, device=device, dtype="standin",
                            weights_hash=digest, load_seconds=time.perf_counter() - start)

    def warm(self, model: StandInModel) -> float:
        start = time.perf_counter()
        PIL.Image.new("RGB", (8, 8), seed_colour(0))
        return time.perf_counter() - start

    def render(self, model: StandInModel, spec: JobSpec, *,
               callback: StepCallback | None = None, resume: Any = None,
               track: Any = None) -> list[PIL.Image.Image]:
        """spec.n flat images of spec.width x spec.height; image k's colour comes from seed+k.

        `callback` is called once per image and step, as the real pipeline would, so a
        canceling callback raises out of here the same way. There are no latents: `resume` is
        ignored (every image renders from the start, to the same colour) and `track` hears of
        each image with no generator. `on_step(spec, step)` runs after each step's callback:
        where a test's subclass injects its faults.
        """
        images = []
        for k, seed in enumerate(spec.image_seeds()):
            if track is not None:
                track(k, None, 0)
            if self.render_seconds:
                time.sleep(self.render_seconds)
            for step in range(spec.steps):
                if callback is not None:
                    callback(None, step, None, {})
                self.on_step(spec, step)
            images.append(PIL.Image.new("RGB", (spec.width, spec.height), seed_colour(seed)))
        return images

    def render_batch(self, model: StandInModel, specs: list[JobSpec], *,
                     callback: StepCallback | None = None) -> list[list[PIL.Image.Image]]:
        """Several jobs in one "call" (the worker's throughput mode): each job's images as
        render() makes them; `render_seconds` is spent once per image, as in render().
        `callback` runs once per step of the whole call, then `on_step` for every job."""
        steps = specs[0].steps
        if self.render_seconds:
            time.sleep(self.render_seconds * sum(spec.n for spec in specs))
        for step in range(steps):
            if callback is not None:
                callback(None, step, None, {})
            for spec in specs:
                self.on_step(spec, step)
        return [[PIL.Image.new("RGB", (spec.width, spec.height), seed_colour(seed))
                 for seed in spec.image_seeds()] for spec in specs]

    def on_step(self, spec: JobSpec, step: int) -> None:
        """Nothing: a render step of the stand-in costs nothing."""

    def ensemble(self, base: StandInModel, refiner: StandInModel,
                 spec: JobSpec) -> list[PIL.Image.Image]:
        """Both halves on one worker: the same flat images as render()."""
        return self.render(base, spec)

    def denoise_base(self, model: StandInModel, spec: JobSpec, seed: int, *,
                     callback: StepCallback | None = None, resume: Any = None,
                     track: Any = None) -> Any:
        raise NotImplementedError(NO_LATENTS)

    def refine(self, model: StandInModel, spec: JobSpec, latents: Any, generator: Any, *,
               callback: StepCallback | None = None) -> Any:
        raise NotImplementedError(NO_LATENTS)


NO_LATENTS = ("the stand-in backend has no latents: split base/refiner stages need "
              "farm.worker.pipelines (run split jobs with split=never, or a real worker)")


# `backend=worker.standin` works as well as a StandIn instance: the module-level functions are
# an instant stand-in.
_default = StandIn()


def load_model(spec: ModelSpec, settings: Settings, device: str,
               profile: Any = None) -> StandInModel:
    return _default.load_model(spec, settings, device, profile)


def warm(model: StandInModel) -> float:
    return _default.warm(model)


def render(model: StandInModel, spec: JobSpec, *, callback: StepCallback | None = None,
           resume: Any = None, track: Any = None) -> list[PIL.Image.Image]:
    return _default.render(model, spec, callback=callback, resume=resume, track=track)


def render_batch(model: StandInModel, specs: list[JobSpec], *,
                 callback: StepCallback | None = None) -> list[list[PIL.Image.Image]]:
    return _default.render_batch(model, specs, callback=callback)


def ensemble(base: StandInModel, refiner: StandInModel, spec: JobSpec) -> list[PIL.Image.Image]:
    return _default.ensemble(base, refiner, spec)


def denoise_base(model: StandInModel, spec: JobSpec, seed: int, *,
                 callback: StepCallback | None = None, resume: Any = None,
                 track: Any = None) -> Any:
    return _default.denoise_base(model, spec, seed, callback=callback, resume=resume,
                                 track=track)


def refine(model: StandInModel, spec: JobSpec, latents: Any, generator: Any, *,
           callback: StepCallback | None = None) -> Any:
    return _default.refine(model, spec, latents, generator, callback=callback)


__all__ = ["StandIn", "StandInModel", "denoise_base", "ensemble", "load_model", "refine",
           "render", "render_batch", "seed_colour", "warm"]

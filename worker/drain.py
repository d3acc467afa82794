"""Stopping inside a stage (spot reclaim, scale-in): finish it when the grace period allows,
else hand it back at the next denoising step with its latents, for another worker to resume.

The platform sends SIGTERM and, `FARM_STOP_GRACE` seconds later, SIGKILL. From SIGTERM on, at
every step boundary of a running "full", "base" or "refiner" stage the worker estimates what the stage
still needs (the steps left times this stage's measured seconds per step, plus FINISH_SECONDS
for decoding and writing) and compares it with what the grace period has left, less
HANDBACK_SECONDS kept back for writing a checkpoint and leaving. While it fits, the stage goes
on; as soon as it does not, the step callback raises HandBack with everything a checkpoint
needs (worker/latents.py), and the stage writes it and queues the job's resume message. (A
refiner needs no checkpoint of its own: it runs again from the base's stored latents.)
The estimate is made again at every step, so a stage that runs slower than it looked is still
handed back in time.

Nothing here imports torch: the latents and generators are held, never computed with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# decoding, image writes, the record and the ack, after the last step
FINISH_SECONDS = 5.0
# kept back from the grace period to write a checkpoint, queue the resume message and exit
HANDBACK_SECONDS = 5.0


@dataclass
class ImageState:
    """One image of the stage, as its last step left it."""

    generator: Any = None       # the torch.Generator the image denoises with
    first_step: int = 0         # the step it started at (above 0 when resumed)
    done: int = 0               # steps done, counted from the image's step 0
    total: int | None = None    # steps its denoising runs to (the base stops at its switch)
    latents: Any = None         # after step `done`
    finished: bool = False      # all its steps were done (in an earlier run of the stage)

    @property
    def complete(self) -> bool:
        return self.finished or (self.total is not None and self.done >= self.total)


@dataclass
class InFlight:
    """What the running stage has done so far, fed by the render functions and the step
    callback; a HandBack snapshots it."""

    stage: str = ""
    started: float = field(default_factory=time.monotonic)
    steps: int = 0              # steps run by this worker in this stage
    current: int = -1           # the image denoising now
    images: dict[int, ImageState] = field(default_factory=dict)
    per_image: int | None = None    # loop steps of an image (from the first callback)

    def begin_image(self, index: int, generator: Any, first_step: int = 0) -> None:
        """An image's denoising starts (called by worker/render.py before each pipeline)."""
        self.current = index
        self.images[index] = ImageState(generator=generator, first_step=first_step,
                                         done=first_step)

    def note_step(self, pipe: Any, step_index: int, kwargs: dict[str, Any]) -> None:
        self.steps += 1
        image = self.images.get(self.current)
        if image is None:
            return
        image.done = image.first_step + step_index + 1
        image.latents = kwargs.get("latents")
        loop = getattr(pipe, "num_timesteps", None)
        if isinstance(loop, int):
            image.total = image.first_step + loop
            if self.per_image is None and image.first_step == 0:
                self.per_image = loop

    def steps_left(self, n_images: int) -> int | None:
        """Steps this stage still has to run; None when the pipeline does not say."""
        image = self.images.get(self.current)
        if image is None or image.total is None:
            return None
        per_image = self.per_image or image.total
        return (image.total - image.done) + per_image * max(0, n_images - self.current - 1)

    def seconds_per_step(self) -> float | None:
        if self.steps == 0:
            return None
        return (time.monotonic() - self.started) / self.steps


class Drain:
    """The worker's stop request: when SIGTERM came, and how long the platform waits."""

    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self.clock = clock
        self.since: float | None = None

    def request(self) -> None:
        if self.since is None:
            self.since = self.clock()

    @property
    def requested(self) -> bool:
        return self.since is not None

    def must_hand_back(self, steps_left: int | None, seconds_per_step: float | None) -> bool:
        """True when the stage will not finish within the grace period (with the margins)."""
        if self.since is None or steps_left is None or seconds_per_step is None:
            return False
        if steps_left <= 0:
            return False  # only decoding and writing are left: finish
        elapsed = self.clock() - self.since
        needed = steps_left * seconds_per_step + FINISH_SECONDS
        return elapsed + needed > self.grace - HANDBACK_SECONDS


class HandBack(Exception):  # noqa: N818 - not an error: the stage stops on purpose
    """Raised from the step callback: stop this stage now and hand it back from `inflight`."""

    def __init__(self, inflight: InFlight) -> None:
        super().__init__(f"handing back at image {inflight.current}")
        self.inflight = inflight

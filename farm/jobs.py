"""Jobs: what a user asks for (JobSpec), its identity (Job), and its lifecycle (JobState).

The lifecycle, written down once (the README draws the same picture):

    queued ──► running ──────────────────────────────► succeeded
      │          │  └──► latents_ready ──► refining ──┘
      │          │              (split base → refiner)
      └──────────┴──────────────┴───────────┴────────► failed | canceled

A running stage may go back to queued, and a refining one to latents_ready (retried on another
worker; a running one may also be handed back by a worker that is stopping: worker/drain.py).
succeeded, failed and canceled are final.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from farm import buckets, models
from farm.errors import ValidationError
from farm.presets import DEFAULT_PRESET, PRESETS, VAES
from farm.rules import check_int as _int
from farm.rules import check_number as _number
from farm.rules import check_text as _text
from farm.rules import unknown_key as _unknown_key
from farm.settings import Settings


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    LATENTS_READY = "latents_ready"
    REFINING = "refining"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    def can_become(self, new: JobState) -> bool:
        return new in TRANSITIONS[self]


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.LATENTS_READY, JobState.QUEUED,
                                 JobState.FAILED, JobState.CANCELED}),
    JobState.LATENTS_READY: frozenset({JobState.REFINING, JobState.FAILED, JobState.CANCELED}),
    JobState.REFINING: frozenset({JobState.SUCCEEDED, JobState.LATENTS_READY, JobState.FAILED,
                                  JobState.CANCELED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELED: frozenset(),
}

# sampler names a job may use → what the worker builds (worker/pipelines.py maps them)
SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "ddim")
PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 9, 5
SEED_MAX = 2**32 - 1
# Where the refiner takes over. diffusers documents 0.8; the SDXL optimisation guide found that
# 0.8 lets the refiner change the base's composition, while 0.9 keeps it and still sharpens.
DEFAULT_SWITCH = 0.9
SPLIT_POLICIES = ("auto", "always", "never")
GUIDANCE_MAX = 30.0
MIN_SIDE = 64
MAX_VRAM_GB = 1024

# accepted in a request but not kept: `snap` moves a size that is not a bucket to the nearest
INPUT_ONLY = ("snap",)

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,80}$")


@dataclass(frozen=True)
class JobSpec:
    """One line of a batch, fully resolved: every field has its final value."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    n: int
    model: str
    scheduler: str
    priority: int
    min_vram: int
    # the ensemble of expert denoisers: the base denoises up to `switch`, the refiner the rest
    refiner: str | None = None
    switch: float = DEFAULT_SWITCH
    split: str = "auto"         # "auto", "always" (two workers via the store), "never" (one)
    preset: str = DEFAULT_PRESET    # farm/presets.py: its values fill what the job leaves out
    cfg_cutoff: float = 0.0     # turn classifier-free guidance off after this share of steps
    vae: str = "default"        # "tiny": decode with TAESD-XL where the worker has it
    snapped_from: str | None = None  # "WxH" the job asked for before --snap moved it to a bucket

    _FIELDS: ClassVar[tuple[str, ...]] = ()  # set below: asked for once per field of a job

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        if not cls._FIELDS:
            cls._FIELDS = tuple(f.name for f in fields(cls))
        return cls._FIELDS

    @classmethod
    def from_dict(cls, data: Any, settings: Settings) -> JobSpec:
        """Check every field against its rule; fill what is absent from the job's preset, then
        the model's defaults. Raises ValidationError naming the first field that breaks one."""
        if not isinstance(data, dict):
            raise ValidationError("job", "must be an object with a prompt", data)
        unknown = [k for k in data if k not in cls.field_names() and k not in INPUT_ONLY]
        if unknown:
            allowed = ", ".join((*cls.field_names(), *INPUT_ONLY))
            raise _unknown_key(data, unknown, f"is not a known field (known: {allowed})")
        if "prompt" not in data or data["prompt"] is None:
            raise ValidationError("prompt", "is required", show_value=False)
        preset = data.get("preset") or DEFAULT_PRESET
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValidationError("preset", f"must be one of {', '.join(PRESETS)}", preset)
        # 1. the preset's values where the job gives none
        data = {**PRESETS[preset], **{k: v for k, v in data.items() if v is not None}}
        model = models.resolve(data.get("model", models.DEFAULT_MODEL), role="base")
        steps = _int(data, "steps", 1, settings.max_steps, model.default_steps)
        width, height, snapped_from = _size(data, settings, model)
        refiner = data.get("refiner")
        if refiner is not None:
            refiner = models.resolve(refiner, role="refiner", field="refiner").name
        switch = _number(data, "switch", 0.0, 1.0, DEFAULT_SWITCH)
        if not 0.0 < switch < 1.0:
            raise ValidationError("switch", "must be between 0 and 1 (exclusive)", switch)
        if refiner is not None and (round(steps * switch) < 1 or round(steps * switch) >= steps):
            raise ValidationError("switch", f"must leave at least one of the {steps} steps to "
                                  "the base and one to the refiner", switch)
        cfg_cutoff = _number(data, "cfg_cutoff", 0.0, 1.0, 0.0)
        if cfg_cutoff >= 1.0:
            raise ValidationError("cfg_cutoff", "must be below 1 (0 keeps CFG on every step)",
                                  cfg_cutoff)
        seed = data.get("seed")
        return cls(
            prompt=_text(data, "prompt", settings.max_prompt_chars, required=True),
            negative_prompt=_text(data, "negative_prompt", settings.max_prompt_chars),
            seed=secrets.randbelow(SEED_MAX + 1) if seed is None else _int(data, "seed", 0,
                                                                          SEED_MAX, 0),
            steps=steps, guidance=_number(data, "guidance", 0.0, GUIDANCE_MAX, 5.0),
            width=width, height=height, n=_int(data, "n", 1, settings.max_images_per_job, 1),
            model=model.name, scheduler=_choice(data, "scheduler", SCHEDULERS, "euler"),
            priority=_int(data, "priority", PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT),
            min_vram=_int(data, "min_vram", 0, MAX_VRAM_GB, 0), refiner=refiner, switch=switch,
            split=_choice(data, "split", SPLIT_POLICIES, "auto"), preset=preset,
            cfg_cutoff=cfg_cutoff, vae=_choice(data, "vae", VAES, "default"),
            snapped_from=snapped_from or data.get("snapped_from"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def image_seeds(self) -> list[int]:
        """Image k of a job uses seed + k, so any one image can be re-rendered alone."""
        return [self.seed + k for k in range(self.n)]


def _choice(data: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = data.get(name, default)
    if value not in allowed:
        raise ValidationError(name, f"must be one of {', '.join(allowed)}", value)
    return str(value)


def _size(data: dict[str, Any], settings: Settings, model: models.ModelSpec
          ) -> tuple[int, int, str | None]:
    """Width and height: multiples of 8, within the caps, and one of the farm's buckets (or
    snapped to the nearest one when the job says `snap`)."""
    width = _int(data, "width", MIN_SIDE, settings.max_side, model.default_width)
    height = _int(data, "height", MIN_SIDE, settings.max_side, model.default_height)
    for name, side in (("width", width), ("height", height)):
        if side % 8:
            raise ValidationError(name, "must be a multiple of 8", side)
    if width * height > settings.max_pixels:
        raise ValidationError("width", f"x height must be at most {settings.max_pixels} pixels",
                              f"{width}x{height}")
    allowed = settings.bucket_list(model)
    if (width, height) in allowed:
        return width, height, None
    snap = data.get("snap", False)
    if isinstance(snap, str) and snap.lower() in ("true", "false", "yes", "no", "1", "0"):
        snap = snap.lower() in ("true", "yes", "1")
    if not isinstance(snap, bool):
        raise ValidationError("snap", "must be true or false", snap)
    if not snap:
        raise ValidationError("width", f"x height must be one of the buckets "
                              f"{buckets.describe(allowed)} (or pass --snap)",
                              f"{width}x{height}")
    w, h = buckets.nearest(width, height, allowed)
    return w, h, f"{width}x{height}"


# The stages a message can ask for (the README's "Split base → refiner" explains them):
#   full     no refiner: render the images
#   base     denoise to `switch`, then hand the latents to a refiner (through the store, or
#            in memory when this worker also serves the refiner: split policy "auto")
#   refiner  finish from the stored latents
#   pair     base and refiner on this one worker, no store round-trip (split policy "never")
STAGES = ("full", "base", "refiner", "pair")
# the stages a worker that is stopping can hand back mid-way, to be resumed from a checkpoint
RESUMABLE_STAGES = ("full", "base")


def checkpoint_key(batch: str, job: str, stage: str, image: int, step: int) -> str:
    """Where a stage handed back on a worker's shutdown keeps its in-flight latents: under the
    job's own intermediate prefix (worker/checkpoint.py writes it)."""
    from farm.records import batch_prefix  # records imports this module

    return f"{batch_prefix(batch)}/intermediate/{job}/resume-{stage}-{image}-{step:04d}.safetensors"


@dataclass(frozen=True)
class ResumePoint:
    """A stage handed back at `step` of image `image`: continue from the checkpoint at `key`."""

    key: str
    image: int
    step: int

    def encode(self) -> dict[str, Any]:
        return {"key": self.key, "image": self.image, "step": self.step}


@dataclass(frozen=True)
class Job:
    """A JobSpec with its place in a batch and the stage to run: what travels on the queue."""

    id: str
    batch: str
    index: int
    spec: JobSpec
    vram_class: int     # the smallest class that can run its first stage (farm/vram.py)
    stage: str = "full"
    refiner_vram_class: int | None = None   # the class of its refiner stage, when split
    # set on a stage handed back by a worker that was stopping (worker/drain.py)
    resume: ResumePoint | None = None

    VERSION = 1
    FIELDS = ("v", "id", "batch", "index", "spec", "vram", "stage", "refiner_vram", "resume")

    @property
    def stage_class(self) -> int:
        """The VRAM class the stage in this message needs."""
        if self.stage == "refiner" and self.refiner_vram_class is not None:
            return self.refiner_vram_class
        return self.vram_class

    @property
    def stage_model(self) -> str:
        """The model (or base+refiner pair) whose queues carry this stage."""
        if self.stage == "refiner" and self.spec.refiner:
            return self.spec.refiner
        if self.stage == "pair" and self.spec.refiner:
            return models.pair_name(self.spec.model, self.spec.refiner)
        return self.spec.model

    def encode(self) -> dict[str, Any]:
        data = {"v": self.VERSION, "id": self.id, "batch": self.batch, "index": self.index,
                "spec": self.spec.to_dict(), "vram": self.vram_class, "stage": self.stage,
                "refiner_vram": self.refiner_vram_class}
        if self.resume is not None:
            data["resume"] = self.resume.encode()
        return data

    @classmethod
    def decode(cls, data: Any, settings: Settings) -> Job:
        """A message from the queue, checked again: anyone who reaches Redis can push one."""
        if not isinstance(data, dict):
            raise ValidationError("message", "must be a JSON object", data)
        version = data.get("v")
        if type(version) is not int or version != cls.VERSION:
            raise ValidationError("message.v", f"must be {cls.VERSION}", version)
        extra = [k for k in data if k not in cls.FIELDS]
        if extra:
            raise _unknown_key(data, extra, "is not a known field of a message",
                               prefix="message.")
        batch = data.get("batch")
        ident = data.get("id")
        if not isinstance(batch, str) or not _ID.match(batch):
            raise ValidationError("message.batch", "must be a batch id ([a-z0-9-])", batch)
        index = data.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValidationError("message.index", "must be a non-negative integer", index)
        if not isinstance(ident, str) or ident != job_id(batch, index):
            raise ValidationError("message.id", "must be the job id of its batch and index",
                                  ident)
        vram = data.get("vram")
        if type(vram) is not int or not 0 < vram <= MAX_VRAM_GB:
            raise ValidationError("message.vram", f"must be a VRAM class in GB (1 to "
                                  f"{MAX_VRAM_GB})", vram)
        spec_data = data.get("spec")
        if isinstance(spec_data, dict) and spec_data.get("seed") is None:
            raise ValidationError("spec.seed", "must be set in a queued job", None)
        spec = JobSpec.from_dict(spec_data, settings)
        stage = data.get("stage", "full")
        allowed = ("full",) if spec.refiner is None else ("base", "refiner", "pair")
        if stage not in allowed:
            raise ValidationError("message.stage", f"must be one of {', '.join(allowed)} for "
                                  "this job", stage)
        refiner_vram = data.get("refiner_vram")
        if refiner_vram is not None and (type(refiner_vram) is not int
                                         or not 0 < refiner_vram <= MAX_VRAM_GB):
            raise ValidationError("message.refiner_vram", "must be a VRAM class in GB",
                                  refiner_vram)
        resume = _resume_point(data.get("resume"), batch, ident, stage, spec)
        return cls(id=ident, batch=batch, index=index, spec=spec, vram_class=vram, stage=stage,
                   refiner_vram_class=refiner_vram, resume=resume)


def _resume_point(data: Any, batch: str, job: str, stage: str, spec: JobSpec
                  ) -> ResumePoint | None:
    """A message's `resume`: the image and step a handed-back stage continues from, and its
    checkpoint, which must be exactly the key this job, stage, image and step give (so no
    message can point a worker at another object)."""
    if data is None:
        return None
    if stage not in RESUMABLE_STAGES:
        raise ValidationError("message.resume", f"is only allowed on the "
                              f"{' and '.join(RESUMABLE_STAGES)} stages, not {stage}", data)
    if not isinstance(data, dict) or set(data) != {"key", "image", "step"}:
        raise ValidationError("message.resume", "must be an object with key, image and step",
                              data)
    image, step = data["image"], data["step"]
    if type(image) is not int or not 0 <= image < spec.n:
        raise ValidationError("message.resume.image", f"must be an image of the job (0 to "
                              f"{spec.n - 1})", image)
    if type(step) is not int or not 0 <= step < spec.steps:
        raise ValidationError("message.resume.step", f"must be a step inside the job (0 to "
                              f"{spec.steps - 1})", step)
    key = checkpoint_key(batch, job, stage, image, step)
    if data["key"] != key:
        raise ValidationError("message.resume.key", f"must be this job's checkpoint {key}",
                              data["key"])
    return ResumePoint(key=key, image=image, step=step)


def new_batch_id(now: float) -> str:
    """Sortable by time (newest last), unique enough for a farm: 20261129-151200-3fa9c1."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}-{secrets.token_hex(3)}"


def job_id(batch: str, index: int) -> str:
    return f"{batch}-{index:04d}"


def is_id(text: str) -> bool:
    return bool(_ID.match(text))

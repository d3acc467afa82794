"""Jobs: what a user asks for (JobSpec), a job of a batch (Job), and what a queue carries
(Message: it names a job of a manifest, nothing more). The lifecycle is farm/lifecycle.py."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from farm import buckets, keys, models
from farm.errors import ValidationError
from farm.lifecycle import Stage
from farm.presets import DEFAULT_PRESET, MODELS_REFINER, PRESETS, VAES
from farm.rules import check_int as _int
from farm.rules import check_number as _number
from farm.rules import check_text as _text
from farm.rules import unknown_key as _unknown_key
from farm.settings import Settings

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
# the longest feature-cache interval (worker/deepcache.py): past a few steps the reused deep
# features are too stale to be worth the time saved
DEEP_CACHE_MAX = 8

# accepted in a request but not kept: `snap` moves a size that is not a bucket to the nearest
INPUT_ONLY = ("snap",)

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,80}$")
WEIGHTS = re.compile(r"[0-9a-f]{10,64}")


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
    # the feature cache of the turbo preset: the full UNet every `deep_cache`-th step, its
    # shallow blocks on the rest with the deep features reused (worker/deepcache.py); 0: off
    deep_cache: int = 0
    # the weights the job must be rendered with: the sha256 over the model's (and the
    # refiner's) weight files as sidecars record it, or its first 10+ hex digits (`farm replay`
    # sets them); a worker whose weights differ fails the job before rendering. None: any
    weights: str | None = None
    refiner_weights: str | None = None
    snapped_from: str | None = None  # "WxH" the job asked for before --snap moved it to a bucket

    _FIELDS: ClassVar[tuple[str, ...]] = ()  # set below: asked for once per field of a job

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        if not cls._FIELDS:
            cls._FIELDS = tuple(f.name for f in fields(cls))
        return cls._FIELDS

    @classmethod
    def from_dict(cls, data: Any, settings: Settings, *, stored: bool = False) -> JobSpec:
        """Check every field against its rule; fill what is absent from the job's preset, then
        the model's defaults. Raises ValidationError naming the first field that breaks one.

        `data` is a user's job line unless `stored`: a spec the farm wrote itself (a batch's
        manifest), which may also carry what only the farm sets: `snapped_from`, the size
        `--snap` moved. A user's line that names it is refused, so no job can claim a size it
        never asked for."""
        if not isinstance(data, dict):
            raise ValidationError("job", "must be an object with a prompt", data)
        farm_only = () if stored else ("snapped_from",)
        inputs = [f for f in cls.field_names() if f not in farm_only]
        unknown = [k for k in data if k not in inputs and k not in INPUT_ONLY]
        if "snapped_from" in unknown:
            raise ValidationError("snapped_from", "is not an input field: the farm records it "
                                  "when --snap moves a size to a bucket", data["snapped_from"])
        if unknown:
            allowed = ", ".join((*inputs, *INPUT_ONLY))
            raise _unknown_key(data, unknown, f"is not a known field (known: {allowed})")
        if "prompt" not in data or data["prompt"] is None:
            raise ValidationError("prompt", "is required", show_value=False)
        preset = data.get("preset") or DEFAULT_PRESET
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValidationError("preset", f"must be one of {', '.join(PRESETS)}", preset)
        # 1. the preset's values where the job gives none; a stored spec has every value its
        # preset gave it, a refiner too, so a spec stored without one keeps none
        filled = {k: v for k, v in PRESETS[preset].items() if not (stored and k == "refiner")}
        data = {**filled, **{k: v for k, v in data.items() if v is not None}}
        model = models.resolve(data.get("model", models.DEFAULT_MODEL), role="base")
        steps = _int(data, "steps", 1, settings.max_steps, model.default_steps)
        width, height, snapped_from = _size(data, settings, model)
        if snapped_from is None and data.get("snapped_from") is not None:  # a stored spec's
            snapped_from = data["snapped_from"]
            if not isinstance(snapped_from, str) or not re.fullmatch(r"[0-9]{2,5}x[0-9]{2,5}",
                                                                     snapped_from):
                raise ValidationError("snapped_from", "must be the WIDTHxHEIGHT a job asked "
                                      "for before --snap moved it", snapped_from)
        refiner = data.get("refiner")
        if refiner is MODELS_REFINER:
            refiner = models.REFINER_OF.get(model.name)
            if refiner is None:
                raise ValidationError("refiner", f"is required with the {preset} preset on a "
                                      "model with no known refiner (the known pairs: "
                                      + ", ".join(f"{b} with {r}" for b, r
                                                  in models.REFINER_OF.items()) + ")",
                                      model.name)
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
        deep_cache = _int(data, "deep_cache", 0, DEEP_CACHE_MAX, 0)
        if deep_cache == 1:
            raise ValidationError("deep_cache", f"must be 0 (off) or an interval from 2 to "
                                  f"{DEEP_CACHE_MAX} (the full UNet every that many steps)",
                                  deep_cache)
        weights = _weights(data, "weights")
        refiner_weights = _weights(data, "refiner_weights")
        if refiner_weights is not None and refiner is None:
            raise ValidationError("refiner_weights", "needs a refiner", refiner_weights)
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
            deep_cache=deep_cache, weights=weights, refiner_weights=refiner_weights,
            snapped_from=snapped_from)

    def to_dict(self) -> dict[str, Any]:
        # every field is a str, a number or None: a flat copy is what asdict's deep one gives
        return {name: getattr(self, name) for name in self.field_names()}

    def image_seeds(self) -> list[int]:
        """Image k of a job uses (seed + k) mod 2**32, so any one image can be re-rendered alone
        as a job of its own: the seeds wrap past SEED_MAX to 0 and every image seed is one a
        job may ask for (seed 4294967295 with n = 2 gives 4294967295, then 0)."""
        return [(self.seed + k) % (SEED_MAX + 1) for k in range(self.n)]


def _weights(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not WEIGHTS.fullmatch(value):
        raise ValidationError(name, "must be the sha256 of the weights (64 hex digits) or its "
                              "first 10 or more", value)
    return value


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


# the stages a worker that is stopping can hand back mid-way, to be resumed from a checkpoint
RESUMABLE_STAGES = (Stage.FULL, Stage.BASE)


@dataclass(frozen=True)
class ResumePoint:
    """A stage handed back at `step` of image `image`: continue from the checkpoint at `key`."""

    key: str
    image: int
    step: int

    def encode(self) -> dict[str, Any]:
        return {"key": self.key, "image": self.image, "step": self.step}


@dataclass(frozen=True)
class Message:
    """What travels on a queue: the job of a batch's manifest and the stage to run (and, for a
    handed-back stage, where to resume). No spec: the worker takes that from the manifest, so
    whoever can push to Redis cannot create or change work."""

    batch: str
    job: str
    stage: Stage
    resume: Any = None   # unchecked until the job is known (Job.for_message)

    VERSION = 2
    FIELDS = ("v", "batch", "id", "stage", "resume")

    def encode(self) -> dict[str, Any]:
        data: dict[str, Any] = {"v": self.VERSION, "batch": self.batch, "id": self.job,
                                "stage": self.stage.value}
        if self.resume is not None:
            data["resume"] = self.resume
        return data

    @classmethod
    def decode(cls, data: Any) -> Message:
        """A message from the queue, checked: anyone who reaches Redis can push one."""
        if not isinstance(data, dict):
            raise ValidationError("message", "must be a JSON object", data)
        version = data.get("v")
        if type(version) is not int or version != cls.VERSION:
            raise ValidationError("message.v", f"must be {cls.VERSION}", version)
        extra = [k for k in data if k not in cls.FIELDS]
        if extra:
            raise _unknown_key(data, extra, "is not a known field of a message (a message "
                               "names a job of a manifest, nothing more)", prefix="message.")
        batch, ident = data.get("batch"), data.get("id")
        if not isinstance(batch, str) or not _ID.match(batch):
            raise ValidationError("message.batch", "must be a batch id ([a-z0-9-])", batch)
        if not isinstance(ident, str) or not ident.startswith(batch + "-") \
                or not ident[len(batch) + 1:].isdigit():
            raise ValidationError("message.id", "must be a job id of its batch", ident)
        stage = data.get("stage")
        if stage not in tuple(Stage):
            raise ValidationError("message.stage", f"must be one of "
                                  f"{', '.join(s.value for s in Stage)}", stage)
        return cls(batch=batch, job=ident, stage=Stage(stage), resume=data.get("resume"))


@dataclass(frozen=True)
class Job:
    """A job of a batch, as its manifest has it, and the stage a message asks for."""

    id: str
    batch: str
    index: int
    spec: JobSpec
    vram_class: int     # the smallest class that can run its first stage (farm/vram.py)
    stage: Stage = Stage.FULL
    refiner_vram_class: int | None = None   # the class of its refiner stage, when split
    # set on a stage handed back by a worker that was stopping (worker/drain.py)
    resume: ResumePoint | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stage, Stage):  # a stage name from a plan or a manifest
            object.__setattr__(self, "stage", Stage(self.stage))

    @property
    def first_stage(self) -> Stage:
        return self.stage if self.stage is not Stage.REFINER else Stage.BASE

    @property
    def stage_class(self) -> int:
        """The VRAM class the stage in this message needs."""
        if self.stage is Stage.REFINER and self.refiner_vram_class is not None:
            return self.refiner_vram_class
        return self.vram_class

    @property
    def stage_model(self) -> str:
        """The model (or base+refiner pair) whose queues carry this stage."""
        if self.stage is Stage.REFINER and self.spec.refiner:
            return self.spec.refiner
        if self.stage is Stage.PAIR and self.spec.refiner:
            return models.pair_name(self.spec.model, self.spec.refiner)
        return self.spec.model

    def stages(self) -> tuple[Stage, ...]:
        """The stages messages of this job may ask for."""
        if self.spec.refiner is None:
            return (Stage.FULL,)
        first = self.first_stage
        return (first, Stage.REFINER) if first is Stage.BASE else (first,)

    def message(self) -> Message:
        return Message(batch=self.batch, job=self.id, stage=self.stage,
                       resume=self.resume.encode() if self.resume is not None else None)

    def encode(self) -> dict[str, Any]:
        """The message that runs this job's stage."""
        return self.message().encode()

    def replanned(self, classes: dict[str, int]) -> Job:
        """This job with its stage at the class a record re-planned it to (out of memory)."""
        larger = classes.get(self.stage.value)
        if larger is None:
            return self
        if self.stage is Stage.REFINER:
            return replace(self, refiner_vram_class=larger)
        return replace(self, vram_class=larger)

    def for_message(self, message: Message) -> Job:
        """This job (as its manifest has it) at the stage `message` asks for; ValidationError
        when the message asks for a stage or a resume point the job does not have."""
        if message.stage not in self.stages():
            raise ValidationError("message.stage", f"must be one of "
                                  f"{', '.join(s.value for s in self.stages())} for this job",
                                  message.stage.value)
        resume = _resume_point(message.resume, self, message.stage)
        return replace(self, stage=message.stage, resume=resume)


def _resume_point(data: Any, job: Job, stage: Stage) -> ResumePoint | None:
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
    spec = job.spec
    if type(image) is not int or not 0 <= image < spec.n:
        raise ValidationError("message.resume.image", f"must be an image of the job (0 to "
                              f"{spec.n - 1})", image)
    if type(step) is not int or not 0 <= step < spec.steps:
        raise ValidationError("message.resume.step", f"must be a step inside the job (0 to "
                              f"{spec.steps - 1})", step)
    key = keys.checkpoint_key(job.batch, job.id, stage, image, step)
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

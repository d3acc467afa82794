"""`farm replay IMAGE.png|SIDECAR.json`: the job that made one image, to submit again.

An image of a job is a job of its own: image k of a job with seed s uses seed s + k
(JobSpec.image_seeds), so one image replays as a job of one image with that seed. Its fields
come from the sidecar (every field of the job), or from the PNG's `parameters` chunk, which
holds every setting that is not its default (farm/images.py). A chunk is taken only when
writing the job read from it gives back exactly the same text, so an image the farm did not
make (AUTOMATIC1111's, or one edited since) is refused, never half-read.

The job names the weights the image was made with (`weights`, `refiner_weights`: the sidecar's
sha256, or the PNG's first 10 digits of it); a worker whose weights differ fails it before
rendering (worker/split.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import UsageError, ValidationError
from farm.images import A1111_SAMPLERS, a1111_parameters, read_parameters
from farm.jobs import DEFAULT_SWITCH, WEIGHTS, JobSpec
from farm.presets import DEFAULT_PRESET
from farm.settings import Settings

# what a sidecar has beside the job's fields: the farm wrote it
SIDECAR_KEYS = ("job", "image_index", "model_hash")
SAMPLERS = {name: ours for ours, name in A1111_SAMPLERS.items()}
# A1111's settings line: `Name: value` pairs, a value quoted when it holds a comma
_SETTING = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt: "


@dataclass(frozen=True)
class Replay:
    """One image's job, and the weights it was made with."""

    path: Path
    spec: JobSpec
    model_hash: str                  # the sidecar's sha256, or the PNG's first 10 characters
    refiner_hash: str | None = None  # a split job's refiner weights (sidecars only)

    def same_weights(self, sidecar: dict[str, Any]) -> bool:
        """Whether the sidecar of a render of this job had the weights this image had."""
        theirs = str(sidecar.get("model_hash", ""))
        if not theirs.startswith(self.model_hash) and not self.model_hash.startswith(theirs):
            return False
        return self.refiner_hash is None or sidecar.get("refiner_hash") == self.refiner_hash


def read_job(path: str | Path, settings: Settings) -> Replay:
    """The job that made the image at `path` (a farm PNG or its JSON sidecar); UsageError, in
    one line naming the file and what is wrong, for anything else."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if data.startswith(b"\x89PNG"):
            return _from_png(path, data, settings)
        return _from_sidecar(path, data, settings)
    except ValidationError as err:
        raise UsageError(f"{path}: {err}") from None


def _from_sidecar(path: Path, data: bytes, settings: Settings) -> Replay:
    try:
        side = json.loads(data)
    except (ValueError, RecursionError):
        raise UsageError(f"{path} is neither a PNG nor a JSON sidecar") from None
    if not isinstance(side, dict):
        raise UsageError(f"{path} is not a farm sidecar: it must be a JSON object")
    missing = [k for k in SIDECAR_KEYS if k not in side]
    if missing:
        raise UsageError(f"{path} is not a farm sidecar: it has no {missing[0]!r}")
    fields = {k: side.get(k) for k in JobSpec.field_names() if k != "snapped_from"}
    model_hash = side["model_hash"]
    if not isinstance(model_hash, str) or not WEIGHTS.fullmatch(model_hash):
        raise ValidationError("model_hash", "must be the sha256 of the model's weights",
                              model_hash)
    refiner_hash = side.get("refiner_hash")
    if fields.get("refiner") is None or not isinstance(refiner_hash, str):
        refiner_hash = None
    # the job runs on these weights or fails (worker/split.py)
    spec = _spec({**fields, "n": 1, "weights": model_hash, "refiner_weights": refiner_hash},
                 settings)
    return Replay(path=path, spec=spec, model_hash=model_hash, refiner_hash=refiner_hash)


def _from_png(path: Path, data: bytes, settings: Settings) -> Replay:
    try:
        text = read_parameters(data)
    except Exception:  # Pillow raises many kinds on a broken file
        raise UsageError(f"{path} is not a readable PNG") from None
    if not text:
        raise UsageError(f"{path} has no farm metadata (no `parameters` chunk): not an image "
                         "the farm made")
    lines = text.split("\n")
    found = {m.group(1): m.group(2) for m in _SETTING.finditer(lines[-1]) if m.group(1)}
    if len(lines) < 2 or not {"Steps", "Seed", "Size", "Model", "Model hash"} <= set(found):
        raise UsageError(f"{path}'s `parameters` are not the farm's (no Steps, Seed, Size, "
                         "Model and Model hash)")
    prompt = lines[:-1]
    cut = next((i for i, line in enumerate(prompt) if line.startswith(_NEGATIVE)), len(prompt))
    negative = "\n".join(prompt[cut:])[len(_NEGATIVE):]
    width, _, height = found["Size"].partition("x")
    fields: dict[str, Any] = {
        "prompt": "\n".join(prompt[:cut]), "negative_prompt": negative,
        "steps": _int(found["Steps"]), "scheduler": SAMPLERS.get(found.get("Sampler", "")),
        "guidance": _float(found.get("CFG scale", "")), "seed": _int(found["Seed"]),
        "width": _int(width), "height": _int(height), "n": 1, "model": found["Model"],
        "refiner": found.get("Refiner"),
        "switch": _float(found.get("Refiner switch at", str(DEFAULT_SWITCH))),
        "cfg_cutoff": _float(found.get("CFG cutoff", "0")), "vae": found.get("VAE", "default"),
        "deep_cache": _int(found.get("Deep cache", "0")),
        "preset": found.get("Preset", DEFAULT_PRESET), "split": found.get("Split", "auto"),
        "min_vram": _int(found.get("Min VRAM", "0")),
        # the job runs on weights whose sha256 starts so, or fails (worker/split.py)
        "weights": found["Model hash"].lower()}
    try:
        spec = _spec(fields, settings)
    except ValidationError as err:
        raise UsageError(f"{path}'s `parameters` are not the farm's: {err}") from None
    model_hash = found["Model hash"]
    if a1111_parameters(spec, spec.seed, model_hash) != text:
        raise UsageError(f"{path}'s `parameters` are not the farm's: they do not read back "
                         "as a job (edited, or written by another tool); its sidecar, if you "
                         "have it, replays exactly")
    return Replay(path=path, spec=spec, model_hash=model_hash)


def _spec(fields: dict[str, Any], settings: Settings) -> JobSpec:
    """A job as the farm recorded it: every field given, none filled from its preset; a model
    of the store's catalog must still be in it."""
    from farm.scheduler.parse import check_catalog_names

    check_catalog_names([(None, "model", fields.get("model")),
                         (None, "refiner", fields.get("refiner"))], settings)
    return JobSpec.from_dict(fields, settings, stored=True)


def _int(text: str) -> int | str:
    """An integer where the text is one; else the text, for the job's rule to refuse."""
    return int(text) if re.fullmatch(r"[0-9]{1,12}", text.strip()) else text


def _float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text

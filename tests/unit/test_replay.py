"""Reading back the job that made an image (scheduler/replay.py), and the Python client's checks
before it reaches a broker (scheduler/client.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from farm.errors import NotFound, UsageError, ValidationError
from farm.images import a1111_parameters, encode_png
from farm.jobs import JobSpec
from farm.scheduler.client import Farm
from farm.scheduler.replay import read_job
from farm.settings import Settings

SETTINGS = Settings.load(env={})
HASH = "abcdef0123456789" * 4

JOBS = [
    {"prompt": "a cat"},
    {"prompt": "a cat, \"quoted\"\nover two lines", "negative_prompt": "blurry, dark",
     "scheduler": "dpmpp_2m", "guidance": 7.123456789, "width": 152, "height": 104, "n": 3,
     "seed": 4294967295},
    {"prompt": "a harbour", "preset": "quality", "seed": 5},
    {"prompt": "a fox", "preset": "fast", "cfg_cutoff": 0.0, "split": "always",
     "refiner": "tiny-sdxl-refiner", "switch": 0.75, "min_vram": 8, "steps": 12},
    {"prompt": "a lamp", "vae": "tiny", "model": "sdxl-base", "width": 1024, "height": 1024},
]


def _png(path: Path, spec: JobSpec, k: int) -> Path:
    text = a1111_parameters(spec, spec.image_seeds()[k], HASH)
    path.write_bytes(encode_png(Image.new("RGB", (8, 8)), text))
    return path


def _sidecar(path: Path, spec: JobSpec, k: int, **extra: object) -> Path:
    data = {**spec.to_dict(), "seed": spec.image_seeds()[k], "job_seed": spec.seed,
            "image_index": k, "job": "b-0000", "batch": "b", "model_hash": HASH,
            "worker": "w", **extra}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("fields", JOBS)
def test_an_image_and_its_sidecar_give_back_its_job_as_a_job_of_one_image(
        fields: dict[str, object], tmp_path: Path) -> None:
    spec = JobSpec.from_dict({**fields}, SETTINGS)
    k = spec.n - 1
    expected = replace(spec, n=1, seed=spec.image_seeds()[k])
    from_png = read_job(_png(tmp_path / "x.png", spec, k), SETTINGS)
    # the replayed job names the weights the image was made with (the PNG: their first 10)
    assert from_png.spec == replace(expected, weights=HASH[:10])
    assert from_png.model_hash == HASH[:10]
    from_json = read_job(_sidecar(tmp_path / "x.json", spec, k), SETTINGS)
    assert from_json.spec == replace(expected, weights=HASH) and from_json.model_hash == HASH


def test_a_stored_quality_job_without_a_refiner_replays_without_one(tmp_path: Path) -> None:
    spec = replace(JobSpec.from_dict({"prompt": "a", "preset": "quality"}, SETTINGS),
                   refiner=None)
    assert read_job(_sidecar(tmp_path / "x.json", spec, 0), SETTINGS).spec.refiner is None
    assert read_job(_png(tmp_path / "x.png", spec, 0), SETTINGS).spec.refiner is None


def test_weights_are_compared_by_the_digest_the_image_recorded(tmp_path: Path) -> None:
    spec = JobSpec.from_dict({"prompt": "a"}, SETTINGS)
    png = read_job(_png(tmp_path / "x.png", spec, 0), SETTINGS)
    assert png.same_weights({"model_hash": HASH}) and not png.same_weights({"model_hash": "0f"})
    refined = JobSpec.from_dict({"prompt": "a", "preset": "quality"}, SETTINGS)
    r1, r2 = "1" * 64, "2" * 64
    side = read_job(_sidecar(tmp_path / "x.json", refined, 0, refiner_hash=r1), SETTINGS)
    assert side.spec.weights == HASH and side.spec.refiner_weights == r1
    assert side.same_weights({"model_hash": HASH, "refiner_hash": r1})
    assert not side.same_weights({"model_hash": HASH, "refiner_hash": r2})
    # a job without a refiner keeps no refiner weights, whatever its sidecar says
    plain = read_job(_sidecar(tmp_path / "y.json", spec, 0, refiner_hash=r1), SETTINGS)
    assert plain.spec.refiner_weights is None


@pytest.mark.parametrize(("field", "value", "rule"), [
    ("weights", "abc", "must be the sha256 of the weights (64 hex digits) or its first 10 or "
                       "more"),
    ("weights", "ABCDEF0123", "must be the sha256 of the weights (64 hex digits) or its first "
                              "10 or more"),
    ("refiner_weights", "abcdef0123", "needs a refiner"),
])
def test_named_weights_follow_their_rule(field: str, value: str, rule: str) -> None:
    with pytest.raises(ValidationError) as err:
        JobSpec.from_dict({"prompt": "a", field: value}, SETTINGS)
    assert err.value.field == field and rule in str(err.value)


def _plain_png(path: Path, parameters: str | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_what_is_not_a_farm_image_or_sidecar_is_refused_in_one_line(tmp_path: Path) -> None:
    spec = JobSpec.from_dict({"prompt": "a cat"}, SETTINGS)
    good = a1111_parameters(spec, 7, HASH)
    a1111 = ("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 7, Size: 512x512, "
             "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.10.1")
    cases = {
        _plain_png(tmp_path / "plain.png"): "has no farm metadata (no `parameters` chunk): not "
                                            "an image the farm made",
        _plain_png(tmp_path / "a1111.png", a1111): "`parameters` are not the farm's: model must "
                                                   "be one of",
        _plain_png(tmp_path / "edited.png", good.replace("Steps: 20", "Steps: 500")):
            "`parameters` are not the farm's: steps must be an integer from 1 to 150, got 500",
        _plain_png(tmp_path / "extra.png", good + ", Hires upscale: 2"):
            "`parameters` are not the farm's: they do not read back as a job",
        _plain_png(tmp_path / "short.png", "just a prompt"): "`parameters` are not the farm's "
                                                             "(no Steps, Seed, Size",
        tmp_path / "missing.png": "does not exist",
    }
    broken = tmp_path / "broken.json"
    broken.write_text('{"prompt": "a cat", "seed": ')
    cases[broken] = "is neither a PNG nor a JSON sidecar"
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    cases[listed] = "is not a farm sidecar: it must be a JSON object"
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"prompt": "a cat", "seed": 1}))
    cases[foreign] = "is not a farm sidecar: it has no 'job'"
    cases[_sidecar(tmp_path / "steps.json", spec, 0, steps=500)] = (
        "steps must be an integer from 1 to 150, got 500")
    cases[_sidecar(tmp_path / "nohash.json", spec, 0, model_hash=7)] = (
        "model_hash must be the sha256 of the model's weights, got 7")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(encode_png(Image.new("RGB", (8, 8)), good)[:40])
    cases[truncated] = "is not a readable PNG"
    for path, message in cases.items():
        with pytest.raises(UsageError) as err:
            read_job(path, SETTINGS)
        text = str(err.value)
        assert text.startswith(str(path)) and message in text, text
        assert "\n" not in text


def test_the_client_checks_jobs_as_the_cli_does_before_any_broker(tmp_path: Path) -> None:
    farm = Farm(Settings.load(env={"FARM_HOME": str(tmp_path)}))
    cases: list[tuple[list[object], dict[str, object], str]] = [
        ([{"prompt": "a"}, {"prompt": "b", "steps": 500}], {},
         "jobs[1].steps must be an integer from 1 to 150, got 500"),
        (["a"], {"size": "1024x1024"}, "jobs[0].width x height must be one of the buckets"),
        (["a"], {"size": "big"}, "size must be WIDTHxHEIGHT, e.g. 1024x1024, got 'big'"),
        (["a"], {"stepz": 3}, "stepz is not a job field (known: prompt, negative_prompt"),
        ([{"prompt": "a", "colour": "red"}], {}, "jobs[0].colour is not a known field"),
        ([{"steps": 4}], {}, "jobs[0].prompt is required"),
        ([5], {}, "jobs[0] must be a prompt, a dict of job fields or a JobSpec, got 5"),
        ([], {}, "batch must contain at least one prompt"),
    ]
    for jobs, defaults, message in cases:
        with pytest.raises(UsageError) as err:
            farm.submit(jobs, **defaults)  # type: ignore[arg-type]
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(ValidationError):
        farm.submit([{"prompt": "a", "preset": "quality", "model": "/models/mine"}])
    assert not (tmp_path / "store").exists()  # nothing was written
    with pytest.raises(NotFound):
        farm.batch("Not An Id")
    with pytest.raises(NotFound):
        farm.batch("20260101-000000-abcdef")


def test_import_farm_stays_light_and_the_client_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, farm\n"
            "assert not [m for m in sys.modules if m.startswith(('farm.scheduler', 'celery'))]\n"
            "from farm import Batch, Farm, Result\n"
            "from farm.cli.replay import replay\n"
            "assert Farm.__module__ == 'farm.scheduler.client'\n"
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr

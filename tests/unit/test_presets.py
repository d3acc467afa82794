"""Presets and shape buckets, as a job sees them at submit."""

from __future__ import annotations

import pytest

from farm import buckets
from farm.errors import ConfigError, ValidationError
from farm.jobs import JobSpec
from farm.presets import PRESETS
from farm.scheduler.parse import parse_batch
from farm.scheduler.plan import plan
from farm.settings import Settings

SETTINGS = Settings.load(env={})


def spec(**fields: object) -> JobSpec:
    return JobSpec.from_dict({"prompt": "a cat", **fields}, SETTINGS)


def test_fast_preset_fills_steps_cfg_cutoff_and_vae() -> None:
    s = spec(preset="fast")
    assert (s.steps, s.cfg_cutoff, s.vae, s.preset) == (30, 0.75, "tiny", "fast")


def test_a_jobs_own_fields_win_over_its_preset() -> None:
    s = spec(preset="fast", steps=12, vae="default")
    assert (s.steps, s.cfg_cutoff, s.vae) == (12, 0.75, "default")


def test_quality_preset_and_the_balanced_default() -> None:
    q = spec(preset="quality")
    assert (q.steps, q.switch, q.cfg_cutoff, q.refiner) == (50, 0.9, 0.0, "tiny-sdxl-refiner")
    assert plan(q, SETTINGS).refiner_vram_class is not None  # two stages: base, then refiner
    assert spec(preset="quality", model="sdxl-base").refiner == "sdxl-refiner"
    assert spec(preset="quality", refiner="tiny-sdxl-refiner", switch=0.8).switch == 0.8
    b = spec()
    assert (b.preset, b.steps, b.cfg_cutoff, b.vae) == ("balanced", 20, 0.0, "default")
    assert set(PRESETS) == {"balanced", "fast", "quality", "turbo"}


def test_turbo_preset_is_balanced_with_the_deep_feature_cache() -> None:
    t, b = spec(preset="turbo"), spec()
    assert (t.deep_cache, b.deep_cache) == (2, 0)
    assert (t.steps, t.cfg_cutoff, t.vae, t.refiner) == (b.steps, b.cfg_cutoff, b.vae, b.refiner)
    assert spec(preset="turbo", deep_cache=4).deep_cache == 4
    assert spec(preset="turbo", deep_cache=0).deep_cache == 0  # the job's own field wins
    assert spec(deep_cache=3).preset == "balanced"
    # a manifest's stored spec reads back as it was written
    assert JobSpec.from_dict(t.to_dict(), SETTINGS, stored=True) == t


def test_quality_preset_on_a_model_with_no_known_refiner_is_refused_not_dropped() -> None:
    with pytest.raises(ValidationError) as err:
        spec(preset="quality", model="/models/my-sdxl")
    assert str(err.value).startswith("refiner is required with the quality preset on a model "
                                     "with no known refiner")
    assert spec(preset="quality", model="/models/my-sdxl",
                refiner="/models/my-refiner").refiner == "/models/my-refiner"


def test_a_stored_quality_spec_without_a_refiner_keeps_none() -> None:
    """A manifest's spec has its final values: the preset fills nothing in it."""
    data = {**spec(preset="quality").to_dict(), "refiner": None}
    assert JobSpec.from_dict(data, SETTINGS, stored=True).refiner is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"preset": "warp"}, "preset must be one of balanced, fast, quality, turbo, got 'warp'"),
    ({"preset": ["fast"]}, "preset must be one of balanced, fast, quality, turbo, got ['fast']"),
    ({"deep_cache": 1}, "deep_cache must be 0 (off) or an interval from 2 to 8 (the full UNet "
                        "every that many steps), got 1"),
    ({"deep_cache": 9}, "deep_cache must be an integer from 0 to 8, got 9"),
    ({"deep_cache": "2"}, "deep_cache must be an integer from 0 to 8, got '2'"),
    ({"cfg_cutoff": 1.0}, "cfg_cutoff must be below 1 (0 keeps CFG on every step), got 1.0"),
    ({"cfg_cutoff": -0.1}, "cfg_cutoff must be a number from 0 to 1, got -0.1"),
    ({"vae": "big"}, "vae must be one of default, tiny, got 'big'"),
    ({"snap": "maybe", "width": 200, "height": 200}, "snap must be true or false, got 'maybe'"),
])
def test_bad_preset_fields_name_field_rule_and_value(fields: dict[str, object],
                                                     message: str) -> None:
    with pytest.raises(ValidationError) as err:
        spec(**fields)
    assert str(err.value) == message


def test_a_size_that_is_not_a_bucket_is_refused_with_the_list() -> None:
    with pytest.raises(ValidationError) as err:
        parse_batch('{"prompt": "a", "width": 200, "height": 200}\n', "jsonl", {}, SETTINGS)
    assert str(err.value) == (
        "line 1: width x height must be one of the buckets 128x128, 144x112, 112x144, 152x104, "
        "104x152, 168x96, 96x168, 192x80, 80x192, 64x64 (or pass --snap), got '200x200'")


def test_snap_moves_to_the_nearest_bucket_and_records_where_from() -> None:
    s = spec(width=200, height=120, snap=True)
    assert (s.width, s.height, s.snapped_from) == (168, 96, "200x120")
    sdxl = spec(model="sdxl-base", width=1000, height=1000, snap="true")
    assert (sdxl.width, sdxl.height, sdxl.snapped_from) == (1024, 1024, "1000x1000")
    wide = spec(model="sdxl-base", width=2048, height=768, snap=True)
    assert (wide.width, wide.height) == (1536, 640)
    exact = spec(width=144, height=112, snap=True)
    assert exact.snapped_from is None
    # the farm decodes the specs it stored (a manifest) as stored: a snapped one keeps its origin
    assert JobSpec.from_dict(sdxl.to_dict(), SETTINGS, stored=True) == sdxl


def test_a_job_line_cannot_claim_where_it_was_snapped_from() -> None:
    """Only --snap sets snapped_from; a user's line that names it is refused, in any format."""
    rule = ("snapped_from is not an input field: the farm records it when --snap moves a size "
            "to a bucket")
    for text, fmt, line in (('{"prompt": "a", "snapped_from": "999x999"}\n', "jsonl", 1),
                            ("prompt,snapped_from\na,999x999\n", "csv", 2)):
        with pytest.raises(ValidationError) as err:
            parse_batch(text, fmt, {}, SETTINGS)
        assert str(err.value) == f"line {line}: {rule}, got '999x999'", fmt
    with pytest.raises(ValidationError, match=f"^{rule}, got None$"):
        JobSpec.from_dict({"prompt": "a", "snapped_from": None}, SETTINGS)
    with pytest.raises(ValidationError) as err:
        spec(typo=1)
    assert "known: " in str(err.value) and "snapped_from" not in str(err.value)


def test_a_stored_spec_keeps_a_well_formed_snapped_from_only() -> None:
    stored = {**spec(width=128, height=128).to_dict(), "snapped_from": "130x126"}
    assert JobSpec.from_dict(stored, SETTINGS, stored=True).snapped_from == "130x126"
    for bad in (5, "", "999x999; rm -rf /", "１２８x128", ["1", "2"]):
        with pytest.raises(ValidationError, match="^snapped_from must be the WIDTHxHEIGHT"):
            JobSpec.from_dict({**stored, "snapped_from": bad}, SETTINGS, stored=True)


def test_buckets_are_configurable_and_checked() -> None:
    s = Settings.load(env={"FARM_BUCKETS": "64x64, 96x64"})
    assert JobSpec.from_dict({"prompt": "a", "width": 96, "height": 64}, s).width == 96
    with pytest.raises(ValidationError, match="buckets 64x64, 96x64"):
        JobSpec.from_dict({"prompt": "a", "width": 128, "height": 128}, s)
    for bad in ("64x", "65x64", "", "abc"):
        with pytest.raises(ConfigError, match="FARM_BUCKETS"):
            Settings.load(env={"FARM_BUCKETS": bad}) if bad else buckets.parse(bad)


def test_nearest_prefers_aspect_ratio_then_area() -> None:
    assert buckets.nearest(1920, 1080, buckets.SDXL_BUCKETS) == (1344, 768)
    assert buckets.nearest(512, 512, buckets.SDXL_BUCKETS) == (1024, 1024)
    assert buckets.nearest(600, 1400, buckets.SDXL_BUCKETS) == (640, 1536)

"""VRAM classes: detection, profiles, planning and the order a worker consumes its queues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm import queues, vram
from farm.errors import ConfigError, ValidationError
from farm.jobs import JobSpec
from farm.scheduler.parse import parse_batch
from farm.scheduler.plan import placement
from farm.settings import Settings

CLASSES = vram.DEFAULT_CLASSES
TABLE = vram.load_table(None)
GiB = 1024**3


@pytest.mark.parametrize(("total_bytes", "expected"), [
    (4 * GiB, 4),                 # a 4 GB card
    (6 * GiB, 6),
    (8_589_934_592, 8),           # RTX 4060 8 GB
    (12_884_901_888, 12),         # RTX 3060 12 GB
    (15_843_721_216, 16),         # Tesla T4 reports 15.8 GB
    (23_034_724_352, 24),         # NVIDIA L4 reports 23 GB
    (25_757_220_864, 24),         # RTX 4090
    (42_505_273_344, 24),         # A100 40 GB is below the 48 class
    (51_527_024_640, 48),         # A40 / L40S
    (85_174_583_296, 80),         # A100 80 GB
    (150_000_000_000, 80),        # H200: above the largest class takes the largest
])
def test_detect_class_takes_the_largest_class_the_card_holds(total_bytes: int,
                                                             expected: int) -> None:
    assert vram.detect_class(total_bytes, CLASSES) == expected


def test_a_card_below_every_class_is_refused() -> None:
    with pytest.raises(ConfigError, match="below the smallest VRAM class"):
        vram.detect_class(2 * GiB, CLASSES)


def test_every_class_has_a_profile_and_bigger_cards_never_load_leaner() -> None:
    # leaner = less VRAM: each class's profile needs at least what the one below it needs
    peaks = [TABLE.peak("sdxl-base", "base", vram.profile_for(c).name, "1mp") for c in CLASSES]
    assert all(p is not None for p in peaks) and peaks == sorted(peaks), peaks  # type: ignore
    assert vram.profile_for(4).offload == "sequential" and vram.profile_for(4).vae == "tiny"
    assert vram.profile_for(24).resident_pair
    assert vram.profile_for(10).name == vram.profile_for(8).name  # off-list: nearest below


def test_the_6gb_class_stores_fp8_weights_where_fp16_needs_offload() -> None:
    """fp8 is the default where it is what fits a resident pipeline: 6 GB (lean-fp8, 4.65 GB
    at 1 MP and 5.42 at 2 MP, within 6 GB with headroom; fp16 lean needs 7.07). 8 GB keeps
    fp16 (lean fits every standard bucket), 4 GB keeps sequential offload (no resident
    pipeline fits, even in fp8)."""
    six = vram.profile_for(6)
    assert (six.name, six.fp8_weights, six.offload, six.vae) == ("lean-fp8", True, "none", "tiny")
    assert vram.catalog_variant(six) == "fp8"  # a bare catalog name: its fp8 variant
    for c in (4, 8, 12, 24):
        assert not vram.profile_for(c).fp8_weights and vram.catalog_variant(
            vram.profile_for(c)) == "fp16"
    for bucket, w, h in (("1mp", 1024, 1024), ("2mp", 1536, 1536)):
        peak = TABLE.peak("sdxl-base", "base", "lean-fp8", bucket)
        assert peak is not None and peak <= 6 * vram.HEADROOM
        assert vram.place("sdxl-base", "base", w, h, 0, (6, 8, 12, 24), TABLE).vram_class == 6
    lean = TABLE.peak("sdxl-base", "base", "lean", "1mp")
    assert lean is not None and 6 * vram.HEADROOM < lean <= 8 * vram.HEADROOM
    # the refiner fits too (4.08 GB)
    assert vram.place("sdxl-refiner", "refiner", 1024, 1024, 0, (6, 8, 24), TABLE).vram_class \
        == 6


def test_smallest_class_whose_profile_fits() -> None:
    # the shipped (H200-measured) table: SDXL base at 1 MP fits a 4 GB card with sequential
    # offload (0.66 GB)
    p = vram.place("sdxl-base", "base", 1024, 1024, 0, CLASSES, TABLE)
    assert (p.vram_class, p.profile) == (4, "sequential-offload")
    # without the offload classes, the next that fits is 8 GB (lean, 7.07 GB)
    p = vram.place("sdxl-base", "base", 1024, 1024, 0, (8, 12, 24), TABLE)
    assert (p.vram_class, p.profile, p.peak_gb) == (8, "lean", 7.07)
    # a bigger image needs more: 2 MP fits neither lean on 8 GB (7.86) nor resident on 12 (11.95)
    assert vram.place("sdxl-base", "base", 1536, 1536, 0, (8, 12, 24), TABLE).vram_class == 24


def test_min_vram_raises_the_class_to_the_next_one_up() -> None:
    assert vram.place("tiny-sdxl", "base", 128, 128, 0, CLASSES, TABLE).vram_class == 4
    assert vram.place("tiny-sdxl", "base", 128, 128, 8, CLASSES, TABLE).vram_class == 8
    assert vram.place("tiny-sdxl", "base", 128, 128, 10, CLASSES, TABLE).vram_class == 12
    with pytest.raises(ValidationError, match=r"min_vram must be at most the largest class "
                                              r"\(80 GB\), got 96"):
        vram.place("tiny-sdxl", "base", 128, 128, 96, CLASSES, TABLE)


def test_a_stage_no_class_can_run_is_refused_at_submit_with_its_line() -> None:
    settings = Settings.load(env={"FARM_VRAM_CLASSES": "8,12",
                                  "FARM_BUCKETS": "1024x1024,2048x2048"})
    text = '{"prompt": "ok", "model": "sdxl-base"}\n' \
           '{"prompt": "huge", "model": "sdxl-base", "width": 2048, "height": 2048}\n'
    with pytest.raises(ValidationError) as err:
        parse_batch(text, "jsonl", {}, settings)
    message = str(err.value)
    # resident (the 12 GB class's profile) needs 16.11 GB at 4 MP: 16.6 GB with the headroom
    assert message.startswith("line 2: width x height needs 17 GB for sdxl-base (base); "
                              "the largest class is 12 GB"), message


def test_measured_table_replaces_seeded_rows(tmp_path: Path) -> None:
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"rows": [
        {"model": "sdxl-base", "stage": "base", "profile": "sequential-offload",
         "bucket": "1mp", "peak_gb": 3.9, "source": "measured: H200"}]}))
    settings = Settings.load(env={"FARM_VRAM_TABLE": str(measured)})
    spec = JobSpec.from_dict({"prompt": "a", "model": "sdxl-base"}, settings)
    # 3.9 GB does not fit a 4 GB card with headroom: the 6 GB class (lean-fp8) does
    assert placement(spec, settings).vram_class == 6
    table = vram.load_table(measured)
    assert table.sources[("sdxl-base", "base", "sequential-offload", "1mp")] == "measured: H200"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"model": "sdxl-base"}]}))
    with pytest.raises(ConfigError, match="row 0 needs model, stage, profile, bucket"):
        vram.load_table(bad)


def test_worker_queue_order_is_own_class_first_then_each_smaller_class() -> None:
    order = queues.worker_queues(["tiny-sdxl"], 8, (4, 8, 24))
    classes = [q.split(".")[2] for q in order]
    priorities = [int(q.split(".")[3][1:]) for q in order]
    # own class (all priorities, most urgent first), then the smaller one; never a bigger one
    assert classes == ["8gb"] * 10 + ["4gb"] * 10
    assert priorities == list(range(9, -1, -1)) * 2


def test_every_routable_queue_has_a_consumer_in_its_own_class_and_every_bigger_one() -> None:
    """No starvation by construction: whatever the scheduler routes to, the workers of that
    class consume, and so does every bigger class once its own queues are empty."""
    classes = (4, 8, 24)
    consumed = {c: queues.worker_queues(["tiny-sdxl", "sdxl-base"], c, classes) for c in classes}
    for model in ("tiny-sdxl", "sdxl-base"):
        for c in classes:
            for p in range(10):
                q = queues.queue_name(model, c, p)
                assert [w for w in classes if q in consumed[w]] == [w for w in classes if w >= c]
    # a 24 GB worker lists every 24 GB queue before any smaller class's queue
    order = consumed[24]
    last_own = max(i for i, q in enumerate(order) if ".24gb." in q)
    first_small = min(i for i, q in enumerate(order) if ".24gb." not in q)
    assert last_own < first_small


def test_buckets() -> None:
    assert vram.bucket_of(1024, 1024) == vram.bucket_of(1344, 768) == "1mp"
    assert vram.bucket_of(1536, 640) == "1mp"
    assert vram.bucket_of(1536, 1536) == "2mp"
    assert vram.bucket_of(2048, 2048) == "4mp"

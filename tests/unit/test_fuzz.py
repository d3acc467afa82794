"""Property-based fuzzing: whatever comes in, the answer is a JobSpec or one ValidationError
with a field and a one-line message, never another exception."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

from farm import models
from farm.errors import ValidationError
from farm.jobs import SCHEDULERS, SEED_MAX, JobSpec
from farm.scheduler.parse import detect_format, parse_batch, parse_size
from farm.settings import Settings

SETTINGS = Settings(max_jobs_per_batch=50)
FIELDS = JobSpec.field_names()
FUZZ = fuzz_settings(max_examples=200, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])

# ints stay inside int()'s 4300-digit repr limit (test_validation.py covers that bug)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-10, 5000),
    st.sampled_from([0, 1, 8, 64, 128, 4096, 2**32, 1024, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(list(SCHEDULERS) + list(models.REGISTRY) + ["/m/x.safetensors",
                                                                 "http://x", "/a/../b"]),
)
# the keys a user may type: real fields and typos; `keys` adds names with odd characters,
# which JobSpec.from_dict names as field "key" instead of putting them in its message
plausible_keys = st.one_of(st.sampled_from(FIELDS), st.from_regex(r"[a-z_]{1,12}",
                                                                  fullmatch=True))
keys = plausible_keys | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(plausible_keys, inner, max_size=3), max_leaves=6)


def dicts(key_strategy: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    prompt = st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=40) | values})
    extra = st.dictionaries(key_strategy, values, max_size=6)
    return st.builds(lambda p, e: {**p, **e}, prompt, extra)


def check(call: Callable[[], Any]) -> Any:
    """The call's result, or None after checking the ValidationError it raised."""
    try:
        return call()
    except ValidationError as err:
        assert isinstance(err.field, str) and err.field
        assert isinstance(err.rule, str) and err.rule
        message = str(err)
        assert message and "\n" not in message and "\r" not in message
        assert len(message) < 400
        return None


def check_spec(spec: JobSpec) -> None:
    """What every accepted job promises the worker."""
    assert spec.prompt.strip() and "\x00" not in spec.prompt
    assert 1 <= spec.steps <= SETTINGS.max_steps
    assert spec.width % 8 == 0 and spec.height % 8 == 0
    assert spec.width * spec.height <= SETTINGS.max_pixels
    assert 1 <= spec.n <= SETTINGS.max_images_per_job
    assert 0 <= spec.seed <= SEED_MAX
    assert 0.0 <= spec.guidance <= 30.0
    assert spec.scheduler in SCHEDULERS
    assert type(spec.steps) is int and type(spec.guidance) is float


@FUZZ
@given(dicts(plausible_keys))
def test_from_dict_any_dict(data: dict[str, Any]) -> None:
    spec = check(lambda: JobSpec.from_dict(data, SETTINGS))
    if spec is not None:
        check_spec(spec)


@FUZZ
@given(values)
def test_from_dict_any_value(data: Any) -> None:
    check(lambda: JobSpec.from_dict(data, SETTINGS))


lines = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
texts = st.lists(lines, max_size=8).map("\n".join) | st.text(max_size=200)


@FUZZ
@given(texts, st.sampled_from(["txt", "jsonl", "csv", "auto"]))
def test_any_text_in_any_format(text: str, fmt: str) -> None:
    specs = check(lambda: parse_batch(text, fmt, {}, SETTINGS))
    for spec in specs or []:
        check_spec(spec)


json_lines = st.one_of(dicts(keys).map(json.dumps), values.map(json.dumps), lines)


@FUZZ
@given(st.lists(json_lines, min_size=1, max_size=6),
       st.fixed_dictionaries({}, optional={"steps": st.integers(1, 150),
                                           "width": st.sampled_from([64, 256])}))
def test_jsonl_lines(rows: list[str], defaults: dict[str, Any]) -> None:
    specs = check(lambda: parse_batch("\n".join(rows), "jsonl", defaults, SETTINGS))
    for spec in specs or []:
        check_spec(spec)


cells = st.one_of(st.text(max_size=12), st.integers(-5, 5000).map(str),
                  st.sampled_from(["", " ", "2.5", "1e3", "nan", "euler", "tiny-sdxl", "1_0"]))


@FUZZ
@given(st.lists(keys, min_size=1, max_size=5),
       st.lists(st.lists(cells, max_size=6), min_size=0, max_size=5))
def test_csv_tables(header: list[str], rows: list[list[str]]) -> None:
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    specs = check(lambda: parse_batch(out.getvalue(), "csv", {}, SETTINGS))
    for spec in specs or []:
        check_spec(spec)


@FUZZ
@given(st.text(max_size=30))
def test_parse_size_any_text(text: str) -> None:
    size = check(lambda: parse_size(text))
    if size is not None:
        assert all(isinstance(side, int) and side >= 0 for side in size)


@FUZZ
@given(st.text(max_size=30))
def test_detect_format_any_path(path: str) -> None:
    fmt = check(lambda: detect_format(path))
    assert fmt in (None, "txt", "jsonl", "csv", "auto")

"""The rules of one job (JobSpec), its lifecycle (JobState) and its wire form (Job).

Each bad input goes in through one of the three file formats, and the error must name the
line, the field, the rule and the value, on one line.
"""

from __future__ import annotations

import json

import pytest

from farm import models
from farm.errors import UsageError, ValidationError
from farm.jobs import SEED_MAX, Job, JobSpec, Message, job_id
from farm.lifecycle import JobState
from farm.scheduler.parse import parse_batch
from farm.settings import Settings
from tests.unit.expect import expect

SETTINGS = Settings()
GOOD_JSONL = '{"prompt": "a lighthouse at dawn"}\n'
CSV_HEAD = "prompt,steps,width,height,n,guidance,seed,scheduler,priority\n"


def jsonl(fields: dict[str, object]) -> str:
    return GOOD_JSONL + json.dumps({"prompt": "a cat", **fields}) + "\n"


# (format, text, line, field, rule, value as shown)
BAD = {
    # txt: only the prompt comes from the line
    "txt-prompt-too-long": ("txt", "# cats\n" + "a" * 2001, 2, "prompt",
                            "must be at most 2000 characters", "2001"),
    "txt-prompt-nul": ("txt", "ok\na\x00b\n", 2, "prompt", "must not contain NUL characters",
                       "'a\\x00b'"),
    # jsonl: every field
    "missing-prompt": ("jsonl", GOOD_JSONL + '{"steps": 10}\n', 2, "prompt", "is required",
                       None),
    "empty-prompt": ("jsonl", jsonl({"prompt": "   "}), 2, "prompt", "must not be empty",
                     "'   '"),
    "prompt-not-text": ("jsonl", jsonl({"prompt": 5}), 2, "prompt", "must be text", "5"),
    "negative-not-text": ("jsonl", jsonl({"negative_prompt": ["blur"]}), 2, "negative_prompt",
                          "must be text", "['blur']"),
    "unknown-field": ("jsonl", jsonl({"stpes": 10}), 2, "stpes",
                      "is not a known field (known: prompt, negative_prompt, seed,", "10"),
    "steps-zero": ("jsonl", jsonl({"steps": 0}), 2, "steps",
                   "must be an integer from 1 to 150", "0"),
    "steps-float": ("jsonl", jsonl({"steps": 2.5}), 2, "steps",
                    "must be an integer from 1 to 150", "2.5"),
    "steps-string": ("jsonl", jsonl({"steps": "ten"}), 2, "steps",
                     "must be an integer from 1 to 150", "'ten'"),
    "steps-bool": ("jsonl", jsonl({"steps": True}), 2, "steps",
                   "must be an integer from 1 to 150", "True"),
    "width-not-multiple-of-8": ("jsonl", jsonl({"width": 100}), 2, "width",
                                "must be a multiple of 8", "100"),
    "too-many-pixels": ("jsonl", jsonl({"width": 4096, "height": 4096}), 2, "width",
                        "x height must be at most 4194304 pixels", "'4096x4096'"),
    "side-too-small": ("jsonl", jsonl({"width": 32}), 2, "width",
                       "must be an integer from 64 to 4096", "32"),
    "side-too-big": ("jsonl", jsonl({"height": 4104}), 2, "height",
                     "must be an integer from 64 to 4096", "4104"),
    "n-too-large": ("jsonl", jsonl({"n": 9}), 2, "n", "must be an integer from 1 to 8", "9"),
    "guidance-negative": ("jsonl", jsonl({"guidance": -1}), 2, "guidance",
                          "must be a number from 0 to 30", "-1"),
    "guidance-nan": ("jsonl", GOOD_JSONL + '{"prompt": "a cat", "guidance": NaN}', 2,
                     "guidance", "must be a number from 0 to 30", "nan"),
    "guidance-string": ("jsonl", jsonl({"guidance": "high"}), 2, "guidance",
                        "must be a number from 0 to 30", "'high'"),
    "seed-negative": ("jsonl", jsonl({"seed": -1}), 2, "seed",
                      "must be an integer from 0 to 4294967295", "-1"),
    "seed-too-big": ("jsonl", jsonl({"seed": 2**32}), 2, "seed",
                     "must be an integer from 0 to 4294967295", "4294967296"),
    "scheduler-unknown": ("jsonl", jsonl({"scheduler": "karras"}), 2, "scheduler",
                          "must be one of euler, euler_a, dpmpp_2m, ddim", "'karras'"),
    "priority-too-high": ("jsonl", jsonl({"priority": 10}), 2, "priority",
                          "must be an integer from 0 to 9", "10"),
    "model-url": ("jsonl", jsonl({"model": "https://evil.example/m.safetensors"}), 2, "model",
                  "must be a known model name or a local path, not a URL",
                  "'https://evil.example/m.safetensors'"),
    "model-dotdot": ("jsonl", jsonl({"model": "/models/../etc/passwd"}), 2, "model",
                     "must be an absolute path without '..'", "'/models/../etc/passwd'"),
    "model-unknown-name": ("jsonl", jsonl({"model": "sd15"}), 2, "model",
                           f"must be one of {', '.join(sorted(models.REGISTRY))} or an "
                           "absolute local path", "'sd15'"),
    "model-relative-path": ("jsonl", jsonl({"model": "models/x.safetensors"}), 2, "model",
                            "or an absolute local path", "'models/x.safetensors'"),
    "min-vram-negative": ("jsonl", jsonl({"min_vram": -1}), 2, "min_vram",
                          "must be an integer from 0 to 1024", "-1"),
    # csv: cells are typed first, then the same rules apply
    "csv-steps-too-many": ("csv", CSV_HEAD + "a cat,500,,,,,,,\n", 2, "steps",
                           "must be an integer from 1 to 150", "500"),
    "csv-height-not-multiple-of-8": ("csv", CSV_HEAD + "a cat,,,100,,,,,\n", 2, "height",
                                     "must be a multiple of 8", "100"),
    "csv-empty-prompt-cell": ("csv", CSV_HEAD + ",20,,,,,,,\n", 2, "prompt", "is required",
                              None),
    "csv-n-zero": ("csv", CSV_HEAD + "a cat,,,,0,,,,\n", 2, "n",
                   "must be an integer from 1 to 8", "0"),
    "csv-guidance-too-high": ("csv", CSV_HEAD + "a cat,,,,,31,,,\n", 2, "guidance",
                              "must be a number from 0 to 30", "31.0"),
    "csv-seed-too-big": ("csv", CSV_HEAD + "a cat,,,,,,99999999999,,\n", 2, "seed",
                         "must be an integer from 0 to 4294967295", "99999999999"),
    "csv-scheduler-case": ("csv", CSV_HEAD + "a cat,,,,,,,Euler,\n", 2, "scheduler",
                           "must be one of", "'Euler'"),
    "csv-priority-negative": ("csv", CSV_HEAD + "a cat,,,,,,,,-1\n", 2, "priority",
                              "must be an integer from 0 to 9", "-1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_field_names_line_field_rule_and_value(case: str) -> None:
    fmt, text, line, field, rule, value = BAD[case]
    with pytest.raises(ValidationError) as info:
        parse_batch(text, fmt, {}, SETTINGS)
    expect(info.value, line, field, rule, value)


def test_validation_error_is_a_usage_error_with_exit_code_2() -> None:
    with pytest.raises(UsageError) as info:
        parse_batch(jsonl({"steps": 0}), "jsonl", {}, SETTINGS)
    assert info.value.exit_code == 2


def test_line_field_beats_a_bad_default_only_where_given() -> None:
    # a bad CLI default is reported on the first line that does not override it
    text = '{"prompt": "a", "steps": 10}\n{"prompt": "b"}\n'
    with pytest.raises(ValidationError) as info:
        parse_batch(text, "jsonl", {"steps": 0}, SETTINGS)
    expect(info.value, 2, "steps", "must be an integer from 1 to 150", "0")


def test_tighter_settings_tighten_the_rules() -> None:
    tight = Settings(max_steps=10, max_prompt_chars=5)
    with pytest.raises(ValidationError) as info:
        parse_batch("short\ntoo long a prompt\n", "txt", {}, tight)
    expect(info.value, 2, "prompt", "must be at most 5 characters", "17")
    with pytest.raises(ValidationError) as info:
        parse_batch("cat\n", "txt", {"steps": 11}, tight)
    expect(info.value, 1, "steps", "must be an integer from 1 to 10", "11")


# -- JobState ---------------------------------------------------------------------------

Q, R, L, F = JobState.QUEUED, JobState.RUNNING, JobState.LATENTS_READY, JobState.REFINING
OK, FAIL, CANCEL = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED
# the lifecycle in farm/lifecycle.py's docstring, written out edge by edge
ALLOWED = {
    (Q, R), (Q, FAIL), (Q, CANCEL),
    (R, R), (R, OK), (R, L), (R, Q), (R, FAIL), (R, CANCEL),
    (L, F), (L, R), (L, FAIL), (L, CANCEL),
    (F, F), (F, OK), (F, L), (F, R), (F, FAIL), (F, CANCEL),
}


@pytest.mark.parametrize("old", list(JobState))
@pytest.mark.parametrize("new", list(JobState))
def test_transitions_allowed_and_refused(old: JobState, new: JobState) -> None:
    assert old.can_become(new) == ((old, new) in ALLOWED)


@pytest.mark.parametrize("state", [OK, FAIL, CANCEL])
def test_final_states_have_no_way_out(state: JobState) -> None:
    assert state.final
    assert not any(state.can_become(new) for new in JobState)


@pytest.mark.parametrize("state", [Q, R, L, F])
def test_live_states_are_not_final_and_can_fail_or_be_canceled(state: JobState) -> None:
    assert not state.final
    assert state.can_become(FAIL) and state.can_become(CANCEL)
    # only a running stage "moves" to itself: another worker takes over a dead one's
    assert state.can_become(state) == state.active


def test_states_are_their_wire_strings() -> None:
    assert [s.value for s in JobState] == ["queued", "running", "latents_ready", "refining",
                                          "succeeded", "failed", "canceled"]
    assert JobState("queued") is Q


# -- Message on the wire: it names a job of a manifest, nothing more ---------------------------

BATCH = "20260101-000000-abc123"


def a_job() -> Job:
    spec = JobSpec.from_dict({"prompt": "a red fox", "seed": 7, "steps": 4}, SETTINGS)
    return Job(id=job_id(BATCH, 3), batch=BATCH, index=3, spec=spec, vram_class=8)


def test_a_message_round_trips_through_json_and_carries_no_spec() -> None:
    job = a_job()
    message = json.loads(json.dumps(job.encode()))
    assert message == {"v": Message.VERSION, "batch": BATCH, "id": job.id, "stage": "full"}
    decoded = Message.decode(message)
    assert job.for_message(decoded) == job


def hostile(**changes: object) -> dict[str, object]:
    message = a_job().encode()
    message.update(changes)
    return message


HOSTILE = {
    "not-a-dict": (["v", 1], "message", "must be a JSON object"),
    "none": (None, "message", "must be a JSON object"),
    "wrong-version": (hostile(v=1), "message.v", "must be 2"),
    "version-true": (hostile(v=True), "message.v", "must be 2"),
    "no-version": ({k: v for k, v in hostile().items() if k != "v"}, "message.v", "must be 2"),
    "extra-field": (hostile(callback="http://x"), "message.callback", "is not a known field"),
    # a message cannot bring its own spec: the worker takes it from the manifest
    "a-spec": (hostile(spec={"prompt": "another prompt", "seed": 1}), "message.spec",
               "is not a known field"),
    "batch-bad-chars": (hostile(batch="../etc", id="../etc-0003"), "message.batch",
                        "must be a batch id"),
    "id-not-under-batch": (hostile(id="other-batch-0003"), "message.id",
                           "must be a job id of its batch"),
    "id-not-a-number": (hostile(id=BATCH + "-x"), "message.id", "must be a job id of its batch"),
    "unknown-stage": (hostile(stage="shell"), "message.stage", "must be one of"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_decode_refuses_hostile_messages(case: str) -> None:
    message, field, rule = HOSTILE[case]
    with pytest.raises(ValidationError) as info:
        Message.decode(message)
    assert info.value.field == field
    assert rule in str(info.value) and "\n" not in str(info.value)


def test_a_message_may_only_ask_for_a_stage_its_job_has() -> None:
    job = a_job()  # no refiner: only the full stage
    with pytest.raises(ValidationError) as info:
        job.for_message(Message.decode(hostile(stage="refiner")))
    assert info.value.field == "message.stage" and "full" in str(info.value)


# -- edge cases that once slipped through farm/jobs.py and farm/errors.py ------------------


def test_from_dict_unknown_key_with_newline_stays_one_line() -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.from_dict({"prompt": "a", "x\ny": 1}, SETTINGS)
    assert "\n" not in str(info.value)


def test_from_dict_mixed_type_keys_are_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        JobSpec.from_dict({"prompt": "a", 1: 2, "x": 3}, SETTINGS)


def test_from_dict_huge_integer_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        JobSpec.from_dict({"prompt": "a", "steps": 10**5000}, SETTINGS)


def test_prompt_with_lone_surrogate_is_refused() -> None:
    with pytest.raises(ValidationError):
        parse_batch('{"prompt": "a \\ud800 b"}', "jsonl", {}, SETTINGS)


def test_seed_is_drawn_in_range_when_absent() -> None:
    seeds = {JobSpec.from_dict({"prompt": "a"}, SETTINGS).seed for _ in range(50)}
    assert all(0 <= s <= SEED_MAX for s in seeds)
    assert len(seeds) > 1


def test_image_seeds_wrap_past_the_largest_seed_so_every_image_can_be_replayed() -> None:
    top = JobSpec.from_dict({"prompt": "a", "seed": SEED_MAX, "n": 3}, SETTINGS)
    assert top.image_seeds() == [SEED_MAX, 0, 1]
    assert JobSpec.from_dict({"prompt": "a", "seed": 7, "n": 3}, SETTINGS).image_seeds() == [
        7, 8, 9]
    # each image's seed is one a job may ask for: image k alone, as a job of its own
    for seed in top.image_seeds():
        assert JobSpec.from_dict({"prompt": "a", "seed": seed}, SETTINGS).image_seeds() == [seed]


def test_model_defaults_fill_absent_fields() -> None:
    spec = JobSpec.from_dict({"prompt": "a", "model": models.SDXL_BASE.ref}, SETTINGS)
    assert spec.model == models.SDXL_BASE.name
    assert (spec.width, spec.height, spec.steps) == (
        models.SDXL_BASE.default_width, models.SDXL_BASE.default_height,
        models.SDXL_BASE.default_steps)


def test_a_specs_dict_is_its_fields_each_a_plain_json_value() -> None:
    """to_dict is a flat copy: it holds only while every field is a str, a number or None."""
    import dataclasses

    settings = Settings.load(env={})
    spec = JobSpec.from_dict({"prompt": "a cat", "refiner": "tiny-sdxl-refiner",
                              "preset": "turbo", "seed": 7}, settings)
    data = spec.to_dict()
    assert data == dataclasses.asdict(spec)
    assert list(data) == [f.name for f in dataclasses.fields(JobSpec)]
    assert all(v is None or isinstance(v, str | int | float) for v in data.values())
    assert json.loads(json.dumps(data)) == data

"""Reading a batch: the three formats, their syntax errors, all-or-nothing, and --size."""

from __future__ import annotations

import pytest

from farm import models
from farm.errors import ValidationError
from farm.jobs import SEED_MAX, JobSpec
from farm.scheduler.parse import detect_format, parse_batch, parse_size
from farm.settings import Settings
from tests.unit.expect import expect

SETTINGS = Settings()
TINY = models.TINY_BASE
KNOWN = "is not a known column (known: prompt, negative_prompt, seed, steps,"


def cut(value: object) -> str:
    """A long value as messages show it: its repr, cut to 60 characters."""
    return repr(value)[:57] + "..."


def parse(text: str, fmt: str, settings: Settings = SETTINGS, **defaults: object
          ) -> list[JobSpec]:
    return parse_batch(text, fmt, defaults, settings)


# (format, text, line, field, rule, value as shown)
BAD = {
    "jsonl-bad-json": ("jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', 2, "line",
                       "must be a JSON object", "'{\"prompt\": \"b\",}'"),
    "jsonl-array-line": ("jsonl", '["a cat"]\n', 1, "line", "must be a JSON object",
                         "'[\"a cat\"]'"),
    "jsonl-string-line": ("jsonl", '{"prompt": "a"}\n\n"a cat"\n', 3, "line",
                          "must be a JSON object", "'\"a cat\"'"),
    "jsonl-number-line": ("jsonl", "42\n", 1, "line", "must be a JSON object", "'42'"),
    "jsonl-repeated-key": ("jsonl", '{"prompt": "a", "steps": 1, "steps": 500}\n', 1, "steps",
                           "must be given once per line", "500"),
    "jsonl-key-with-newline": ("jsonl", '{"prompt": "a", "x\\ny": 1}\n', 1, "key",
                               "is not a known field", "'x\\ny'"),
    "jsonl-huge-key": ("jsonl", '{"prompt": "a", "' + "k" * 5000 + '": 1}\n', 1, "key",
                       "is not a known field", cut("k" * 5000)),
    "jsonl-huge-integer": ("jsonl", '{"prompt": "a", "steps": ' + "9" * 5000 + "}\n", 1,
                           "line", "must be a JSON object",
                           cut('{"prompt": "a", "steps": ' + "9" * 5000 + "}")),
    "jsonl-deep-nesting": ("jsonl", "[" * 100_000, 1, "line", "must be a JSON object",
                           cut("[" * 100_000)),
    "csv-unknown-column": ("csv", "prompt,stpes\na cat,10\n", 1, "stpes", KNOWN, "'stpes'"),
    "csv-odd-column-name": ("csv", 'prompt,"st\neps"\na cat,10\n', 1, "column 2", KNOWN,
                            "'st\\neps'"),
    "csv-empty-column-name": ("csv", "prompt,,steps\na,,1\n", 1, "column 2", KNOWN, "''"),
    "csv-non-integer-cell": ("csv", "prompt,steps\na cat,10\na dog,ten\n", 3, "steps",
                             "must be an integer", "'ten'"),
    "csv-float-in-int-cell": ("csv", "prompt,steps\na cat,2.5\n", 2, "steps",
                              "must be an integer", "'2.5'"),
    "csv-underscore-integer": ("csv", "prompt,seed\na cat,1_000\n", 2, "seed",
                               "must be an integer", "'1_000'"),
    "csv-non-number-guidance": ("csv", "prompt,guidance\na cat,nan\n", 2, "guidance",
                                "must be a number", "'nan'"),
    "csv-extra-cells": ("csv", "prompt,steps\na cat,10\na dog,10,x\n", 3, "row",
                        "must have at most 2 cells", "3"),
    "csv-duplicate-header": ("csv", "prompt,steps,steps\na,1,2\n", 1, "steps",
                             "must appear once in the header", "'columns 2 and 3'"),
    "csv-no-prompt-column": ("csv", "steps,seed\n10,1\n", 1, "prompt",
                             "column is required in the header", "['steps', 'seed']"),
    "csv-unclosed-quote": ("csv", 'prompt\na cat\n"a dog\n', 3, "line", "must be valid CSV",
                           "'unexpected end of data'"),
    "csv-stray-quote": ("csv", 'prompt,steps\n"a" cat,10\n', 2, "line", "must be valid CSV",
                        repr("',' expected after '\"'")),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_syntax_names_line_field_rule_and_value(case: str) -> None:
    fmt, text, line, field, rule, value = BAD[case]
    with pytest.raises(ValidationError) as info:
        parse(text, fmt)
    expect(info.value, line, field, rule, value)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "auto"])
@pytest.mark.parametrize("text", ["", "\n\n  \n", "\ufeff"])
def test_empty_file_is_an_error(fmt: str, text: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(text, fmt)
    expect(info.value, None, "batch", "must contain at least one prompt", None)


@pytest.mark.parametrize("fmt,text", [("txt", "# one\n  # two\n\n"),
                                      ("jsonl", "# header\n\n"),
                                      ("csv", "prompt,steps\n\n,\n")])
def test_only_comments_or_a_header_is_empty(fmt: str, text: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(text, fmt)
    expect(info.value, None, "batch", "must contain at least one prompt", None)


@pytest.mark.parametrize("fmt,text", [("txt", "a\nb\n# c\nd\ne\n"),
                                      ("jsonl", '{"prompt":"a"}\n' * 4),
                                      ("csv", "prompt\na\nb\nc\nd\n")])
def test_batch_too_large(fmt: str, text: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(text, fmt, Settings(max_jobs_per_batch=3))
    expect(info.value, None, "batch", "must have at most 3 jobs", "4")
    assert len(parse(text, fmt, Settings(max_jobs_per_batch=4))) == 4


@pytest.mark.parametrize("fmt,text,line", [
    ("txt", "a cat\n\n# dogs\na dog\n" + "x" * 2001 + "\na bird\n", 5),
    ("jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n\n{"prompt": "c", "n": 99}\n', 4),
    ("csv", 'prompt,n\n"a\nmulti-line cat",1\nb,2\nc,99\n', 5),
])
def test_bad_line_after_good_lines_returns_nothing(fmt: str, text: str, line: int) -> None:
    with pytest.raises(ValidationError) as info:
        parse(text, fmt)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}: ")


def test_line_numbers_count_crlf_and_cr_as_one_break() -> None:
    with pytest.raises(ValidationError) as info:
        parse("a\r\nb\r\n\r\n" + "x" * 2001, "txt")
    assert info.value.line == 4
    with pytest.raises(ValidationError) as info:
        parse("prompt,steps\r\na,1\rb,x\r\n", "csv")
    assert info.value.line == 3


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        parse("a cat", "yaml")
    expect(info.value, None, "format", "must be one of txt, jsonl, csv or auto", "'yaml'")


def test_defaults_with_unknown_keys_are_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        parse("a cat", "txt", stpes=10)


# -- good input ------------------------------------------------------------------------


def test_txt_skips_comments_and_blank_lines_and_strips() -> None:
    specs = parse("# my batch\n\n  a red fox  \n   # not a prompt\n\ta blue whale\n", "txt")
    assert [s.prompt for s in specs] == ["a red fox", "a blue whale"]


def test_txt_keeps_a_hash_inside_a_prompt() -> None:
    assert parse("issue #5 cover art\n", "txt")[0].prompt == "issue #5 cover art"


def test_defaults_come_from_the_model() -> None:
    spec = parse("a cat\n", "txt")[0]
    assert spec.model == models.DEFAULT_MODEL == TINY.name
    assert (spec.width, spec.height, spec.steps) == (TINY.default_width, TINY.default_height,
                                                     TINY.default_steps)
    assert (spec.n, spec.scheduler, spec.negative_prompt) == (1, "euler", "")


def test_cli_defaults_apply_to_every_line() -> None:
    specs = parse("a\nb\n", "txt", steps=10, width=144, height=112, seed=0)
    assert {(s.steps, s.width, s.height, s.seed) for s in specs} == {(10, 144, 112, 0)}


def test_jsonl_fields_override_defaults_and_null_means_absent() -> None:
    text = ('{"prompt": "a", "steps": 30, "seed": 1}\n\n'
            '{"prompt": "b", "steps": null, "negative_prompt": "blur", "guidance": 7}\n')
    first, second = parse(text, "jsonl", steps=10, width=64, height=64)
    assert (first.steps, first.width, first.seed) == (30, 64, 1)
    assert (second.steps, second.width, second.negative_prompt) == (10, 64, "blur")
    assert second.guidance == 7.0 and isinstance(second.guidance, float)


def test_jsonl_accepts_integral_floats() -> None:
    assert parse('{"prompt": "a", "steps": 12.0}', "jsonl")[0].steps == 12


def test_csv_cells_are_typed_and_empty_cells_are_absent() -> None:
    text = ("prompt, steps ,guidance,seed,model,scheduler,n\n"
            "a cat,12,7.5,0,tiny-sdxl,ddim,2\n"
            "\n"
            '"a dog, sitting",,,,,, 3 \n'
            "a bird\n")
    cat, dog, bird = parse(text, "csv", steps=4)
    assert (cat.steps, cat.guidance, cat.seed, cat.scheduler, cat.n) == (12, 7.5, 0, "ddim", 2)
    assert (dog.prompt, dog.steps, dog.scheduler, dog.n) == ("a dog, sitting", 4, "euler", 3)
    assert (bird.prompt, bird.steps, bird.n) == ("a bird", 4, 1)


def test_csv_keeps_text_cells_as_written() -> None:
    (spec,) = parse('prompt,negative_prompt\n" a cat ","lines\nand ""quotes"""\n', "csv")
    assert (spec.prompt, spec.negative_prompt) == (" a cat ", 'lines\nand "quotes"')


@pytest.mark.parametrize("text,prompts,steps", [
    ('{"prompt": "a", "steps": 3}\n', ["a"], 3),
    ('\n# comment\n  {"prompt": "a", "steps": 3}', ["a"], 3),
    ('a\n{"prompt": "b", "steps": 3}\n', ["a", '{"prompt": "b", "steps": 3}'], 7),
    ("# only\n[a] cat\n", ["[a] cat"], 7),
])
def test_stdin_is_sniffed_by_its_first_line(text: str, prompts: list[str], steps: int) -> None:
    assert detect_format("-") == "auto"
    specs = parse(text, "auto", steps=7)
    assert [s.prompt for s in specs] == prompts
    assert specs[0].steps == steps


@pytest.mark.parametrize("fmt,text", [("txt", "\ufeffa cat\n"),
                                      ("jsonl", '\ufeff{"prompt": "a cat"}\n'),
                                      ("csv", "\ufeffprompt\na cat\n"),
                                      ("auto", '\ufeff{"prompt": "a cat"}\n')])
def test_byte_order_mark_is_dropped(fmt: str, text: str) -> None:
    assert [s.prompt for s in parse(text, fmt)] == ["a cat"]


def test_unicode_prompts() -> None:
    prompts = ["富士山の夜明け", "café au lait, 🌅", "Ελληνικά \u2028 separator"]
    assert [s.prompt for s in parse("\n".join(prompts), "txt")] == prompts
    (spec,) = parse('{"prompt": "\\u00e9t\\u00e9 \\ud83c\\udf05"}', "jsonl")
    assert spec.prompt == "été 🌅"


def test_seed_chosen_when_absent_explicit_seed_kept() -> None:
    specs = parse("a\n" * 20 + '{"prompt": "b", "seed": 0}', "txt")
    assert all(0 <= s.seed <= SEED_MAX for s in specs)
    assert len({s.seed for s in specs[:20]}) > 1
    kept = parse('{"prompt": "a", "seed": 0}\n{"prompt": "b", "seed": 4294967295}', "jsonl")
    assert [s.seed for s in kept] == [0, SEED_MAX]


def test_batch_at_the_cap_is_fine() -> None:
    assert len(parse("a\nb\nc\n", "txt", Settings(max_jobs_per_batch=3))) == 3


# -- detect_format and parse_size -----------------------------------------------------


@pytest.mark.parametrize("path,fmt", [("prompts.txt", "txt"), ("a/B.TXT", "txt"),
                                      ("x.jsonl", "jsonl"), ("x.ndjson", "jsonl"),
                                      ("x.csv", "csv"), ("-", "auto"), ("prompts", "auto"),
                                      ("/dev/fd/63", "auto"), ("dir.d/prompts", "auto")])
def test_detect_format(path: str, fmt: str) -> None:
    assert detect_format(path) == fmt


@pytest.mark.parametrize("path", ["batch.json", "batch.yaml", "x.txt.gz", "notes.md"])
def test_detect_format_refuses_other_extensions(path: str) -> None:
    with pytest.raises(ValidationError) as info:
        detect_format(path)
    expect(info.value, None, "file", "must be .txt, .jsonl or .csv (or - for standard input)",
           repr(path))


@pytest.mark.parametrize("text,size", [("1024x768", (1024, 768)), ("512X512", (512, 512)),
                                       (" 64 x 128 ", (64, 128)), ("0x0", (0, 0))])
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1024", "1024x", "x768", "a x b", "1024*768", "", "-64x64",
                                  "64x64x64", "1e3x64", "１０２４x768", "1024x768\n64x64",
                                  "9999999999x64"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_size(text)
    expect(info.value, None, "size", "must be WIDTHxHEIGHT, e.g. 1024x1024", repr(text))


def test_the_demo_batch_is_installed_with_the_package_and_parses() -> None:
    from farm.cli.demo import demo_batch

    specs = parse_batch(demo_batch(), "jsonl", {"model": "tiny-sdxl"}, Settings.load(env={}))
    assert len(specs) == 9

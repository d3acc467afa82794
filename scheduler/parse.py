"""Reading a batch of prompts: plain text, JSON Lines or CSV, all or nothing.

    txt    one prompt per line; blank lines and `#` comment lines are skipped
    jsonl  one JSON object per line, its fields over the defaults; blank and `#` lines skipped
    csv    a header row of JobSpec field names, then one job per row; empty cells are absent

Every job is checked by `JobSpec.from_dict` before anything is enqueued; the first error
aborts the whole batch and names its line, e.g. "line 3: steps must be an integer from 1 to
150, got 500". Line numbers are physical lines of the file, 1-based.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from farm import models
from farm.errors import ValidationError
from farm.jobs import INPUT_ONLY, JobSpec
from farm.scheduler.plan import plan
from farm.settings import Settings

FORMATS = ("txt", "jsonl", "csv")
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}

INT_FIELDS = frozenset({"seed", "steps", "width", "height", "n", "priority", "min_vram",
                        "deep_cache"})
NUMBER_FIELDS = frozenset({"guidance", "switch", "cfg_cutoff"})

# ASCII digits only: int() and \d also take "1_000" and other scripts' digits, which no one
# means in a prompt file. 4000 digits keeps clear of int()'s 4300-digit limit.
_INTEGER = re.compile(r"[+-]?[0-9]{1,4000}", re.ASCII)
_NUMBER = re.compile(r"[+-]?(?:[0-9]{1,400}(?:\.[0-9]*)?|\.[0-9]{1,400})(?:[eE][+-]?[0-9]{1,4})?",
                     re.ASCII)
_SIZE = re.compile(r"\s*([0-9]{1,9})\s*[xX]\s*([0-9]{1,9})\s*", re.ASCII)
# a field name that can go into a message as it is; anything else is shown quoted
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}", re.ASCII)
# the same line breaks as the csv module and universal-newline files
_NEWLINE = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


def detect_format(path: str) -> str:
    """The format a file name implies: txt, jsonl, csv, or auto (stdin, no extension)."""
    if path == "-":
        return "auto"
    ext = os.path.splitext(os.path.basename(path))[1].lower()
    if not ext:
        return "auto"
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    raise ValidationError("file", "must be .txt, .jsonl or .csv (or - for standard input)", path)


def parse_size(text: str) -> tuple[int, int]:
    """`--size WIDTHxHEIGHT` as (width, height); the ranges are JobSpec's to check."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValidationError("size", "must be WIDTHxHEIGHT, e.g. 1024x1024", text)
    return int(match.group(1)), int(match.group(2))


def parse_batch(text: str, fmt: str, defaults: Mapping[str, Any],
                settings: Settings) -> list[JobSpec]:
    """Every job of a batch, checked; ValidationError (with its line) at the first bad one.

    `defaults` are the CLI flags that were given, by JobSpec field name; a line's own fields
    win over them, and what neither gives comes from the model's defaults.
    """
    names = set(JobSpec.field_names())
    unknown = sorted(set(defaults) - names - set(INPUT_ONLY))
    if unknown:
        raise ValueError(f"defaults has keys that are not JobSpec fields: {unknown}")
    base = {k: v for k, v in defaults.items() if v is not None}
    if text.startswith(_BOM):
        text = text[1:]
    if fmt == "auto":
        fmt = _sniff(text)
    if fmt not in FORMATS:
        raise ValidationError("format", f"must be one of {', '.join(FORMATS)} or auto", fmt)
    reader = {"txt": _txt_records, "jsonl": _jsonl_records, "csv": _csv_records}[fmt]

    # 1. read every record (syntax errors stop here), 2. check the size, 3. check each job
    return check_jobs(list(reader(text)), base, settings)


def check_jobs(records: list[tuple[int, dict[str, Any]]], defaults: Mapping[str, Any],
               settings: Settings) -> list[JobSpec]:
    """Every job of a batch checked, each record (its line, its fields) over `defaults`;
    ValidationError with its line at the first bad one. What `farm submit` and the Python
    client (scheduler/client.py) both run."""
    base = {k: v for k, v in defaults.items() if v is not None}
    if not records:
        raise ValidationError("batch", "must contain at least one prompt", show_value=False)
    if len(records) > settings.max_jobs_per_batch:
        raise ValidationError("batch", f"must have at most {settings.max_jobs_per_batch} jobs",
                              len(records))
    specs = []
    for line, fields in records:
        try:
            spec = JobSpec.from_dict({**base, **fields}, settings)
            plan(spec, settings)  # a stage no configured class can run is refused here
            specs.append(spec)
        except ValidationError as err:
            raise _at(err, line) from None
    check_catalog(records, specs, settings)
    return specs


def check_catalog(records: list[tuple[int, dict[str, Any]]], specs: list[JobSpec],
                  settings: Settings) -> None:
    """Every model a job names that is neither a known name nor a path must be in the store's
    catalog (farm/catalog.py); the store is read only when a job names one."""
    check_catalog_names([(line, field, name)
                         for (line, _), spec in zip(records, specs, strict=True)
                         for field, name in (("model", spec.model), ("refiner", spec.refiner))
                         if name is not None], settings)


# the role a catalog model must have in each field that names one (its manifest's role, read
# from the model's own config when it was pushed: worker/push.py)
FIELD_ROLES = {"model": "base", "refiner": "refiner"}


def check_catalog_names(named: list[tuple[int | None, str, Any]], settings: Settings) -> None:
    """(line, field, model name): ValidationError at the first catalog name the store's catalog
    does not hold, naming what it holds (with no catalog: the allow-list's rule), or whose
    role is not the field's (a refiner as `model`, a VAE anywhere)."""
    wanted = []
    for line, field, name in named:
        try:
            if isinstance(name, str) and models.resolve(name).source == "store":
                wanted.append((line, field, name))
        except ValidationError:
            continue  # not a model name at all: the job's own check says so
    if not wanted:
        return
    from farm import catalog
    from farm.store import open_store

    store = open_store(settings)
    held = catalog.refs(store)
    known: set[str] = {n for n, _ in held} | {f"{n}@{v}" for n, v in held}
    digests = [m.digest for m in catalog.manifests(store)] if any(
        name.startswith("sha256:") for _, _, name in wanted) else []
    for line, field, name in wanted:
        hex_ = name.removeprefix("sha256:")
        if name in known or (name.startswith("sha256:")
                             and sum(d.startswith(hex_) for d in digests) == 1):
            continue
        rule = models.unknown_rule(catalog.summary(store) if held else None)
        raise ValidationError(field, rule, name, line=line)
    roles: dict[str, str] = {}
    for line, field, name in wanted:
        want = FIELD_ROLES.get(field)
        if want is None:
            continue
        if name not in roles:
            roles[name] = catalog.find(store, name).role
        if roles[name] != want:
            raise ValidationError(field, f"must be a {want} model; the catalog's {name} is a "
                                  f"{roles[name]}", name, line=line)


def _sniff(text: str) -> str:
    """jsonl when the first line that is not blank or a comment opens an object, else txt."""
    for _, line in _lines(text):
        return "jsonl" if line.startswith("{") else "txt"
    return "txt"


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line that is neither blank nor a `#` comment."""
    for number, line in enumerate(_NEWLINE.split(text), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, stripped


def _txt_records(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in _lines(text):
        yield number, {"prompt": line}


def _jsonl_records(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # A line starting with "#" can never be JSON, so comments may sit above JSON Lines too
    # (as `auto` already allows when it sniffs the format).
    for number, line in _lines(text):
        try:
            value = json.loads(line, object_pairs_hook=_no_repeats)
        except ValidationError as err:
            raise _at(err, number) from None
        # ValueError also covers integers past int()'s digit limit; RecursionError, nesting
        except (ValueError, RecursionError):
            raise ValidationError("line", "must be a JSON object", line, line=number) from None
        if not isinstance(value, dict):
            raise ValidationError("line", "must be a JSON object", line, line=number)
        # null means "not given", so a default from the command line still applies
        yield number, {k: v for k, v in value.items() if v is not None}


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: json.loads would silently keep the last one."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValidationError(key, "must be given once per line", value)
        result[key] = value
    return result


def _csv_records(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    while True:
        start = rows.line_num + 1  # the physical line this row starts on
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as err:
            raise ValidationError("line", "must be valid CSV", str(err), line=start) from None
        if not any(cell.strip() for cell in row):
            continue  # a blank line, or a spreadsheet's row of empty cells
        if header is None:
            header, header_line = _header(row, start), start
            continue
        if len(row) > len(header):
            raise ValidationError("row", f"must have at most {len(header)} cells, one per "
                                  f"column of line {header_line}", len(row), line=start)
        fields = {}
        for name, cell in zip(header, row, strict=False):
            value = _cell(name, cell, start)
            if value is not None:
                fields[name] = value
        yield start, fields


def _header(row: list[str], line: int) -> list[str]:
    known = (*JobSpec.field_names(), *INPUT_ONLY)
    names = [cell.strip() for cell in row]
    seen: dict[str, int] = {}
    for column, name in enumerate(names, start=1):
        if name not in known:
            raise ValidationError(_safe_name(name, f"column {column}"),
                                  f"is not a known column (known: {', '.join(known)})",
                                  name, line=line)
        if name in seen:
            raise ValidationError(name, "must appear once in the header",
                                  f"columns {seen[name]} and {column}", line=line)
        seen[name] = column
    if "prompt" not in seen:
        raise ValidationError("prompt", "column is required in the header", row, line=line)
    return names


def _cell(name: str, cell: str, line: int) -> Any:
    """A CSV cell as its field's type; None for an empty cell (the default applies)."""
    if name in INT_FIELDS or name in NUMBER_FIELDS:
        written = cell.strip()
        if not written:
            return None
        if name in INT_FIELDS:
            if not _INTEGER.fullmatch(written):
                raise ValidationError(name, "must be an integer", cell, line=line)
            return int(written)
        if not _NUMBER.fullmatch(written):
            raise ValidationError(name, "must be a number", cell, line=line)
        return float(written)
    return cell if cell != "" else None


def _safe_name(name: Any, fallback: str) -> str:
    return name if isinstance(name, str) and _PLAIN_NAME.fullmatch(name) else fallback


def _at(err: ValidationError, line: int) -> ValidationError:
    """The error with its line, and a field name that keeps the message on one line.

    The field of an unknown key is the key itself, which a JSON line may fill with line
    breaks or a megabyte of text; such a key is named "key" and shown (cut) as the value.
    """
    if isinstance(err.field, str) and _PLAIN_NAME.fullmatch(err.field):
        return err.at_line(line)
    return ValidationError("key", err.rule, err.field, line=line)

"""The rules one field of a request must follow; each names the field, the rule and the value."""

from __future__ import annotations

import math
import re
from typing import Any

from farm.errors import ValidationError


def check_text(data: dict[str, Any], name: str, limit: int, required: bool = False) -> str:
    value = data.get(name, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValidationError(name, "must be text", value)
    if required and not value.strip():
        raise ValidationError(name, "must not be empty", value)
    if len(value) > limit:
        # the length, not the text: a 5,000-character prompt does not belong in an error line
        raise ValidationError(name, f"must be at most {limit} characters", len(value))
    if "\x00" in value:
        raise ValidationError(name, "must not contain NUL characters", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: JSON allows them, UTF-8 does not
        raise ValidationError(name, "must be valid Unicode text", value) from None
    return value


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


def unknown_key(data: dict[Any, Any], keys: list[Any], rule: str,
                 prefix: str = "") -> ValidationError:
    """Name the unknown key when it is printable; an odd key becomes the value instead."""
    key = min(keys, key=repr)
    if isinstance(key, str) and _PLAIN_KEY.match(key):
        return ValidationError(prefix + key, rule, data[key])
    return ValidationError(prefix + "key", rule, key)


def check_int(data: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(name, f"must be an integer from {low} to {high}", value)
    if not low <= value <= high:
        raise ValidationError(name, f"must be an integer from {low} to {high}", value)
    return value


def check_number(data: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValidationError(name, f"must be a number from {low:g} to {high:g}", value)
    if not low <= value <= high:
        raise ValidationError(name, f"must be a number from {low:g} to {high:g}", value)
    return float(value)

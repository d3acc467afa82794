"""Links to a batch's results that work without store credentials until they expire: presigned
S3 GET URLs (SigV4 query-string signatures). A file store cannot make them (farm/store.py
`presign` says so, exit 2)."""

from __future__ import annotations

import re

from farm.errors import ValidationError
from farm.store import Store, presign

# SigV4 presigned URLs live at most 7 days (S3 refuses a longer X-Amz-Expires)
MAX_EXPIRES_S = 7 * 24 * 3600
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+)([smhd]?)")
EXPIRES_RULE = "must be a duration from 1s to 7d (a number with s, m, h or d, e.g. 30m, 12h, 1d)"


def parse_expires(text: str, flag: str = "--expires") -> int:
    """Seconds from "90", "30m", "12h" or "7d"; the rule and the value when it breaks it."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValidationError(flag, EXPIRES_RULE, text)
    seconds = int(match.group(1)) * UNITS[match.group(2) or "s"]
    if not 1 <= seconds <= MAX_EXPIRES_S:
        raise ValidationError(flag, EXPIRES_RULE, text)
    return seconds


def check_shareable(store: Store) -> None:
    """UsageError (exit 2) unless `store` can make links that work without credentials."""
    if getattr(store, "presign", None) is None:
        presign(store, "", 1)  # raises: says a file store cannot, and which store this is


def urls(store: Store, keys: list[str], seconds: int) -> list[str]:
    """A presigned GET URL for each key, in order (signed here: no requests)."""
    check_shareable(store)
    return [presign(store, key, seconds) for key in keys]

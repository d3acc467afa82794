"""The shape every validation error must have: one line naming the line, field, rule and value."""

from __future__ import annotations

from farm.errors import ValidationError


def expect(err: ValidationError, line: int | None, field: str, rule: str,
           value: str | None) -> None:
    """`value` is how the message shows it (repr, cut), or None when it shows none."""
    msg = str(err)
    assert "\n" not in msg
    assert err.field == field
    assert err.line == line
    where = f"line {line}: " if line is not None else ""
    assert msg.startswith(f"{where}{field} "), msg
    assert rule in msg, msg
    if value is None:
        assert ", got " not in msg, msg
    else:
        assert msg.endswith(f", got {value}"), msg

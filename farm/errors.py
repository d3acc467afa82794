"""Every error the farm raises on purpose, and the exit code the CLI gives each.

    FarmError                       exit 1   anything the farm says no to
    ├── UsageError                  exit 2   the user's input or configuration is wrong
    │   ├── ValidationError                  one field of one job breaks one rule
    │   ├── ConfigError                      a setting or environment variable is wrong
    │   └── NotFound                         a batch, job or model that does not exist
    ├── RetryableError              exit 3   the world is briefly unwell; trying again may work
    │   ├── BrokerUnavailable                Redis cannot be reached
    │   └── StoreUnavailable                 the object store cannot be reached
    └── PermanentError              exit 4   the work itself cannot be done; retrying will not help
        ├── ModelUnavailable                 a model that cannot be loaded or fetched
        ├── IntegrityError                   a stored object is corrupt or does not match
        ├── AlreadyExists                    a create-once object is already there
        └── Conflict                         a compare-and-set write found the object changed

The CLI prints `error: <message>` on one line and exits with the code above; no traceback.
"""

from __future__ import annotations

from typing import Any


class FarmError(Exception):
    exit_code = 1


class UsageError(FarmError):
    exit_code = 2


class ValidationError(UsageError):
    """One field of one job breaks one rule.

    The message names where (line), what (field), the rule and the value, e.g.
    "line 3: steps must be an integer from 1 to 150, got 500".
    """

    def __init__(self, field: str, rule: str, value: Any = None, *, line: int | None = None,
                 show_value: bool = True) -> None:
        self.field = field
        self.rule = rule
        self.value = value
        self.line = line
        self.show_value = show_value
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        got = f", got {_short(self.value)}" if self.show_value else ""
        return f"{where}{self.field} {self.rule}{got}"

    def at_line(self, line: int) -> ValidationError:
        return ValidationError(self.field, self.rule, self.value, line=line,
                               show_value=self.show_value)


class ConfigError(UsageError):
    pass


class NotFound(UsageError):
    pass


class RetryableError(FarmError):
    exit_code = 3


class BrokerUnavailable(RetryableError):
    pass


class StoreUnavailable(RetryableError):
    pass


class PermanentError(FarmError):
    exit_code = 4


class ModelUnavailable(PermanentError):
    pass


class IntegrityError(PermanentError):
    pass


class AlreadyExists(PermanentError):
    pass


class Conflict(PermanentError):
    """A compare-and-set write lost: someone else wrote the object since it was read."""


def _short(value: Any, limit: int = 60) -> str:
    """The value as the user wrote it, cut so one error stays one line."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long for repr (Python's 4300-digit limit)
        text = f"<integer of {value.bit_length()} bits>"
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."

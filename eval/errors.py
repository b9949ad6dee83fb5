"""The one exception type for bad input anywhere in the suite, and the one positive-count check.

Every check on user input (a missing file, a wrong format, an unknown name, a value out of
range) raises `UserInputError` with a message that says what was wrong and what was expected.
It subclasses `ValueError`, so callers that catch `ValueError` keep working, and the
`slimtune` command prints it as one line (no traceback) and exits with status 2.

Library code names settings by their Python names (`block_size`), never by a command's flags;
an error about one setting records it in `field`, so that a command can name its flag instead
(`naming_flags`).
"""

from __future__ import annotations

import math
import numbers


class UserInputError(ValueError):
    """Bad input: the message says what was given and what was expected.

    `field`: the setting the message is about (named first in the message), when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


def require_positive(name: str, value, minimum: int = 1) -> int:
    """`value` if it is an integer >= `minimum` (a count: steps, sizes, ranks), else `UserInputError`.

    Booleans are refused (True is not a count). `minimum=0` accepts zero ("none").
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UserInputError(f"{name} must be {wanted}, got {value!r}", field=name)
    return int(value)


def require_positive_number(name: str, value) -> float:
    """`value` if it is a finite number > 0 (a rate, a time, a size in MB), else `UserInputError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise UserInputError(f"{name} must be a positive finite number, got {value!r}", field=name)
    return float(value)


def naming_flags(error: UserInputError, settings, renames: dict[str, str] | None = None) -> UserInputError:
    """`error` naming the command-line flag that sets its setting: `block_size` -> `--block-size`,
    or `renames[field]` (`eval_text` -> `--eval`). `settings`: the names the command sets (its
    argparse dests); an error about another setting, or about none, comes back unchanged."""
    renames = renames or {}
    if error.field in renames:
        flag = renames[error.field]
    elif error.field is not None and error.field in settings:
        flag = "--" + error.field.replace("_", "-")
    else:
        return error
    return UserInputError(str(error).replace(error.field, flag, 1), field=error.field)

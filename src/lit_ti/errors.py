"""The one exception type for user mistakes, how command-line entry points report it, and the helpers that
word such messages: user text quoted safely, numbers checked against their bounds.

`train.py` prints a `UserError` as a single line (no traceback) and exits with status 2; anything else is
a bug and keeps its traceback.
"""

import math
import sys
from collections.abc import Callable

QUOTE_LIMIT = 80  # characters of user text shown in a message


class UserError(Exception):
    """Bad input the user can fix: the message names the file or config key and says how."""


def report_user_errors(fn: Callable, *args):
    """`fn(*args)`, with a UserError anywhere in the exception chain printed as one `error:` line (exit 2), and
    Ctrl-C as one line (exit 130): every file is written whole or not at all, so what was written stays."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        print("stopped (Ctrl-C); the files written before it are complete", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """User text for a one-line message: quoted, control and invisible characters escaped (`repr` does: a
    newline, an ANSI escape or a right-to-left override cannot break the line or fake output), and at most
    `limit` characters of it, with the full length said when cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_number(
    key: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    optional: bool = False,
    low_open: bool = False,
    hint: str = "",
):
    """`value` as an int (`integer`) or float within [low, high] (`low_open`: low itself excluded); None
    passes when `optional`. Anything else (a string, a bool, NaN, infinity, out of range) is one UserError
    naming `key`, with `hint` appended."""
    if value is None and optional:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and integer and isinstance(value, float):
        ok = value.is_integer()
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if ok:
        ok = (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if ok:
        return int(value) if integer else float(value)
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        bounds = f" in {'(' if low_open else '['}{_num(low)}, {_num(high)}]"
    elif low is not None:
        bounds = f" {'>' if low_open else '>='} {_num(low)}"
    else:
        bounds = f" <= {_num(high)}" if high is not None else ""
    shown = quote(value) if isinstance(value, str) else value
    none = " or null" if optional else ""
    raise UserError(f"{key}={shown}: must be {kind}{bounds}{none}" + (f"; {hint}" if hint else ""))


def check_choice(key: str, value, choices) -> str:
    """`value` if it is one of `choices`, else one UserError naming `key` and the choices."""
    if isinstance(value, str) and value in choices:
        return value
    raise UserError(f"{key}={quote(value)}: use one of {', '.join(choices)}")


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


MAX_SEED = 2**32 - 1  # what numpy (and so Lightning's seed_everything) accepts
MAX_PERIOD = 10**7  # steps: periods, counts of steps


def check_seed(key: str, seed) -> int:
    return check_number(key, seed, 0, MAX_SEED, integer=True)


def check_period(key: str, every, low: int = 0, optional: bool = False) -> int | None:
    """A period in optimizer steps (`low` = 0: 0 switches it off)."""
    hint = "0 = off" if low == 0 else ""
    return check_number(key, every, low, MAX_PERIOD, integer=True, optional=optional, hint=hint)


def check_flag(key: str, value) -> bool:
    """A true/false switch; `yes`, `1` or other text is refused rather than read as true."""
    if isinstance(value, bool):
        return value
    raise UserError(f"{key}={quote(value)}: write true or false")

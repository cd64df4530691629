"""The one exception type for user mistakes, and how command-line entry points report it.

`train.py` prints a `UserError` as a single line (no traceback) and exits with status 2; anything else is
a bug and keeps its traceback.
"""

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input the user can fix: the message names the file or config key and says how."""


def report_user_errors(fn: Callable, *args):
    """`fn(*args)`, with a UserError anywhere in the exception chain printed as one `error:` line (exit 2)."""
    try:
        return fn(*args)
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)

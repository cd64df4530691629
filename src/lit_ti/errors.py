"""The one exception type for user mistakes.

`train.py` prints a `UserError` as a single line (no traceback) and exits with status 2; anything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input the user can fix: the message names the file or config key and says how."""

"""The one error type a user can cause.

Everything the command line turns into "one clear line and exit status 2" is a :class:`UserError`.
It subclasses :class:`ValueError`, so library callers can catch either.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input a user can fix (unknown model, missing file, bad column, too few samples, ...).

    The message is a single line that names the problem; the command line prints it and exits with 2.
    """

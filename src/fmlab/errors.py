"""The error every layer raises for bad input: its message names the option, field or file at fault and says what
to do. The entry points print it as one line (`error: ...`) instead of a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (an option, a file, incompatible choices), as opposed to a bug in fmlab."""

"""The error every layer raises for bad input: its message names the option, field or file at fault and says what
to do. The entry points print it as one line (`error: ...`) instead of a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (an option, a file, incompatible choices), as opposed to a bug in fmlab."""


def check_count(option: str, value: object) -> None:
    """`option` is a whole number of at least 1 (layers, heads, widths)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{option}={value}: must be a whole number of at least 1")


def check_rate(option: str, value: object) -> None:
    """`option` is a probability in [0, 1) (dropout, drop-path)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise UserError(f"{option}={value}: must be a number in [0, 1)")


def check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{option}={value}: choose one of {'|'.join(choices)}")

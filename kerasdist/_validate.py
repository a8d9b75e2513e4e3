"""Argument checks shared by every module, with Keras-style messages."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["check_int"]


def check_int(
    name: str, value: Any, minimum: int = 1, *, hint: str = ""
) -> int:
    """Returns `value` as an `int` if it is an integer >= `minimum`.

    Any `numbers.Integral` is accepted (NumPy integers included) except
    `bool`, which is an `int` in Python but never meant as a count.

    Args:
        name: str. The argument's name, as the user wrote it.
        value: the value received.
        minimum: int. The smallest allowed value. Defaults to 1.
        hint: str. Extra words for the message (e.g. the fix). Defaults to "".

    Returns:
        int. `value` as a Python `int`.

    Raises:
        ValueError: naming the argument, the value and what is expected.

    Example:

    >>> check_int("keep", 2)
    2
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
        value < minimum
    ):
        expected = (
            "a positive integer" if minimum == 1
            else f"an integer >= {minimum}"
        )
        raise ValueError(
            f"Invalid value for argument `{name}`. Received: {name}="
            f"{value!r}. Expected {expected}.{' ' + hint if hint else ''}"
        )
    return int(value)

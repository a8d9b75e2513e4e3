"""Argument checks shared by every module, with Keras-style messages."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

from kerasdist.errors import ConfigError

__all__ = ["check_int", "check_seconds", "env_int"]


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
        raise ConfigError(
            f"Invalid value for argument `{name}`. Received: {name}="
            f"{value!r}. Expected {expected}.{' ' + hint if hint else ''}"
        )
    return int(value)


def check_seconds(
    name: str, value: Any, *, zero: bool = True, none: bool = False
) -> float | None:
    """Returns `value` as a `float` if it is a valid number of seconds.

    Args:
        name: str. The argument's name, as the user wrote it.
        value: the value received.
        zero: bool. Whether 0 is allowed. Defaults to True.
        none: bool. Whether None (no limit) is allowed. Defaults to False.

    Returns:
        float, or None when `value` is None and `none` is True.

    Raises:
        ValueError: naming the argument, the value and what is expected.

    Example:

    >>> check_seconds("grace_period", 10)
    10.0
    """
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
        value < 0 or (value == 0 and not zero) or value != value
    ):
        expected = (
            "a number of seconds >= 0" if zero
            else "a positive number of seconds"
        )
        raise ConfigError(
            f"Invalid value for argument `{name}`. Received: {name}="
            f"{value!r}. Expected {expected}{' or None' if none else ''}."
        )
    return float(value)


def env_int(
    name: str, *, minimum: int = 0, environ: Mapping[str, str] | None = None,
    error: type[Exception] = ValueError, expected: str = "",
) -> int | None:
    """Reads an integer environment variable, with a message naming it.

    Every `KERASDIST_*`, `SLURM_*` and Kubernetes count the package reads
    goes through here, so that they are parsed (digits only, surrounding
    spaces allowed) and refused alike.

    Args:
        name: str. The variable, e.g. `"KERASDIST_NUM_WORKERS"`.
        minimum: int. The smallest allowed value. Defaults to 0.
        environ: mapping or None. Defaults to `os.environ`.
        error: exception class raised for a bad value. Defaults to
            `ValueError`.
        expected: str. What the value means, for the message, e.g.
            `"a number of workers"`. Defaults to "".

    Returns:
        int, or None when the variable is unset or blank.

    Raises:
        error: naming the variable, its value and what is expected.

    Example:

    >>> env_int("KERASDIST_SURELY_UNSET") is None
    True
    """
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < minimum:
        what = f" ({expected})" if expected else ""
        raise error(
            f"Invalid value for environment variable {name}. Received: "
            f"{name}={raw!r}. Expected an integer >= {minimum}{what}."
        )
    return int(raw)

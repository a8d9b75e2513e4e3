"""The state of other callbacks, saved and restored with each backup.

A callback takes part if it has `get_state() -> dict` and
`set_state(dict)` (the dict JSON-able, NumPy scalars allowed), or if it is
one of Keras's stateful built-ins, whose counters are read here:
`EarlyStopping` (`wait`, `best`, `stopped_epoch`, `best_epoch`, and
`best_weights` when `restore_best_weights=True`), `ReduceLROnPlateau`
(`wait`, `best`, `cooldown_counter`; the learning rate itself is optimizer
state) and `ModelCheckpoint` (`best`). `kd.callbacks.ChiefOnly` passes the
state of the callback it wraps. Callbacks are matched by position and class
among the stateful ones of the `fit` call.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

_BUILTIN_FIELDS: list[tuple[type, tuple[str, ...]]] = [
    (keras.callbacks.EarlyStopping,
     ("wait", "best", "stopped_epoch", "best_epoch")),
    (keras.callbacks.ReduceLROnPlateau, ("wait", "best", "cooldown_counter")),
    (keras.callbacks.ModelCheckpoint, ("best",)),
]
_WEIGHTS = "best_weights"


def _inner(callback: Any) -> Any:
    # kd.callbacks.ChiefOnly wraps the callback that holds the state.
    from kerasdist.callbacks.chief_only import ChiefOnly

    while isinstance(callback, ChiefOnly):
        callback = callback.callback
    return callback


def _fields(callback: Any) -> tuple[str, ...] | None:
    for cls, fields in _BUILTIN_FIELDS:
        if isinstance(callback, cls):
            return fields
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def stateful(callbacks: list) -> list[tuple[str, Any]]:
    """`(key, callback)` for each callback that has state to keep."""
    found = []
    for callback in callbacks:
        inner = _inner(callback)
        if _fields(inner) is not None or (
            callable(getattr(inner, "get_state", None))
            and callable(getattr(inner, "set_state", None))
        ):
            found.append((f"{len(found)}:{type(inner).__name__}", inner))
    return found


def collect(callbacks: list) -> tuple[dict, list[np.ndarray]]:
    """The state of `callbacks` as (JSON-able dict, arrays).

    Arrays (EarlyStopping's `best_weights`) are returned apart, in order;
    the dict records how many each callback has.
    """
    states: dict[str, dict] = {}
    arrays: list[np.ndarray] = []
    for key, callback in stateful(callbacks):
        fields = _fields(callback)
        if fields is None:
            state = {k: _plain(v) for k, v in callback.get_state().items()}
        else:
            state = {f: _plain(getattr(callback, f, None)) for f in fields}
            weights = getattr(callback, _WEIGHTS, None)
            if weights is not None:
                state[_WEIGHTS] = [len(arrays), len(weights)]
                arrays.extend(np.asarray(w) for w in weights)
        states[key] = state
    return states, arrays


def restore(callbacks: list, states: dict, arrays: list[np.ndarray]) -> None:
    """Sets the state saved by `collect` on matching callbacks."""
    for key, callback in stateful(callbacks):
        if key not in states:
            continue
        state = dict(states[key])
        if _fields(callback) is None:
            callback.set_state(state)
            continue
        weights = state.pop(_WEIGHTS, None)
        for name, value in state.items():
            setattr(callback, name, value)
        if weights is not None:
            start, n = weights
            setattr(callback, _WEIGHTS, list(arrays[start:start + n]))

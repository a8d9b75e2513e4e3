"""Every use of private Keras / TensorFlow API, one small function each.

kerasdist needs a few things Keras and TensorFlow do not expose publicly.
Each lives here, behind a named function whose docstring cites the upstream
file (and bug, where one explains why), so an upgrade that breaks one breaks
it in one place. `CANARIES` lists, for each private attribute used, how to
reach it; `tests/test_internals.py` checks every entry against the
installed versions and fails naming the attribute when an upgrade removes
one.

Modules import this lazily where TensorFlow must not be imported (the
launcher).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["CANARIES", "Canary", "check_canaries", "missing_attribute"]


class Canary:
    """One private attribute kerasdist relies on.

    Args:
        owner: str. Dotted import path of the module, optionally followed by
            `:` and a dotted attribute path inside it (a class), e.g.
            `"keras.src.backend.tensorflow.trainer:TFEpochIterator"`.
        attribute: str. The private attribute that must exist on `owner`.
        used_by: str. The kerasdist function that needs it.

    Example:

    >>> Canary("os", "getcwd", "example").missing() is None
    True
    """

    def __init__(self, owner: str, attribute: str, used_by: str):
        self.owner = owner
        self.attribute = attribute
        self.used_by = used_by

    def resolve_owner(self) -> Any:
        module_name, _, inner = self.owner.partition(":")
        obj = importlib.import_module(module_name)
        for part in filter(None, inner.split(".")):
            obj = getattr(obj, part)
        return obj

    def missing(self) -> str | None:
        """None if the attribute exists, else a message naming it."""
        try:
            owner = self.resolve_owner()
        except (ImportError, AttributeError) as e:
            return (
                f"{self.owner} is gone ({type(e).__name__}: {e}); needed by "
                f"{self.used_by}"
            )
        return missing_attribute(owner, self.attribute, self.used_by,
                                 self.owner)

    def __repr__(self) -> str:
        return f"Canary({self.owner!r}, {self.attribute!r})"


def missing_attribute(
    owner: Any, attribute: str, used_by: str, owner_name: str | None = None
) -> str | None:
    """None if `owner` has `attribute`, else a message naming both.

    Args:
        owner: the object (module, class or instance) to look on.
        attribute: str. The attribute name.
        used_by: str. Who needs it, for the message.
        owner_name: str or None. How to name `owner` in the message.
            Defaults to its `__name__` or type name.

    Returns:
        str or None.

    Example:

    >>> missing_attribute(object(), "_nope", "demo") is not None
    True
    """
    if hasattr(owner, attribute):
        return None
    name = owner_name or getattr(owner, "__name__", type(owner).__name__)
    return (
        f"{name}.{attribute} no longer exists in the installed version; "
        f"kerasdist's {used_by} depends on it. See kerasdist/_internals.py."
    )


# Filled by the sections below: one entry per private attribute used.
CANARIES: list[Canary] = []


def check_canaries(
    canaries: list[Canary] | None = None,
    extra: list[Callable[[], str | None]] | None = None,
) -> list[str]:
    """Messages for every private attribute that is missing (empty if none).

    Args:
        canaries: list of `Canary` or None. Defaults to `CANARIES`.
        extra: list of callables returning a message or None. Defaults to
            none.

    Returns:
        list of str.

    Example:

    >>> check_canaries([Canary("os", "getcwd", "demo")])
    []
    """
    found = [c.missing() for c in (CANARIES if canaries is None else canaries)]
    found += [f() for f in (extra or [])]
    return [m for m in found if m]


# ---------------------------------------------------------------------------
# Section: Keras trainer / fit loop (epoch iterator, step-exact resume,
# symbolic build). Owner: callbacks.backup_and_restore and its parts.
# ---------------------------------------------------------------------------



# ---------------------------------------------------------------------------
# Section: tf.distribute strategies and collectives (strategies.py,
# compression.py, data.py, devices.py).
# ---------------------------------------------------------------------------

CANARIES.append(Canary("keras.src.backend.tensorflow.trainer",
                       "TFEpochIterator",
                       "_internals.keras_call_site"))


class KerasCallSite:
    """What Keras's `fit`/`evaluate`/`predict` is distributing a dataset for.

    Args:
        adapter: the Keras data adapter (`batch_size`,
            `partial_batch_size`, `num_batches`).
        method: str. `"fit"`, `"evaluate"` or `"predict"`.
        model: the `keras.Model` (or None).
        callbacks: the `callbacks` argument as `fit` holds it (a list, a
            `CallbackList` or None).

    Example:

    >>> KerasCallSite(None, "fit", None, None).method
    'fit'
    """

    def __init__(self, adapter: Any, method: str, model: Any,
                 callbacks: Any):
        self.adapter = adapter
        self.method = method
        self.model = model
        self.callbacks = callbacks


def keras_call_site(max_depth: int = 8) -> KerasCallSite | None:
    """The Keras `fit`/`evaluate`/`predict` call distributing a dataset.

    Keras's `TFEpochIterator.__init__` (`keras/src/backend/tensorflow/
    trainer.py`) calls `strategy.experimental_distribute_dataset` with the
    dataset its `data_adapter` made, from `Trainer.fit`/`evaluate`/
    `predict`, before the first step and before `fit` wraps its callbacks.
    Keras gives the strategy no other handle on the `batch_size` the user
    passed, the partial last batch, the model or the callbacks, which
    kerasdist checks there (uneven batches, issue 16.1; file callbacks,
    14.2; unscaled custom `train_step`, 14.1; XLA on CPU, 16.3).

    Args:
        max_depth: int. How many callers up to look. Defaults to 8.

    Returns:
        A `KerasCallSite`, or None if the caller is not Keras's epoch
        iterator.

    Example:

    >>> keras_call_site() is None
    True
    """
    import inspect

    from keras.src.backend.tensorflow import trainer

    init_code = trainer.TFEpochIterator.__init__.__code__
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            if frame.f_code is not init_code:
                continue
            adapter = getattr(frame.f_locals.get("self"), "data_adapter",
                              None)
            caller = frame.f_back
            if adapter is None or caller is None:
                return None
            local = caller.f_locals
            return KerasCallSite(adapter, caller.f_code.co_name,
                                 local.get("self"), local.get("callbacks"))
        return None
    finally:
        del frame




# ---------------------------------------------------------------------------
# Section: Keras optimizers and variables (accumulation.py, warmup.py,
# metric_average.py, local SGD).
# ---------------------------------------------------------------------------



# ---------------------------------------------------------------------------
# Section: placement and pipeline (placement/).
# ---------------------------------------------------------------------------



# ---------------------------------------------------------------------------
# Section: anything else.
# ---------------------------------------------------------------------------

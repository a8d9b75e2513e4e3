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

_TRAINER = "keras.src.backend.tensorflow.trainer"


def fit_local(model: Any, name: str, frame: Any = None) -> Any:
    """A local variable of the `fit` call of `model` on the stack, or None.

    Keras does not give callbacks the training loop's `TFEpochIterator`
    (`epoch_iterator`) or its `CallbackList` (`callbacks`); both are locals
    of `fit` in `keras/src/backend/tensorflow/trainer.py`, which is on the
    call stack while callbacks run.
    """
    import sys

    frame = frame if frame is not None else sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit" and name in frame.f_code.co_varnames:
            local = frame.f_locals
            if local.get("self") is model and local.get(name) is not None:
                return local[name]
        frame = frame.f_back
    return None


def fit_is_running(model: Any, frame: Any) -> bool:
    """True if a `fit` of `model` is on the stack that `frame` ends."""
    while frame is not None:
        if frame.f_code.co_name == "fit" and (
            frame.f_locals.get("self") is model
        ):
            return True
        frame = frame.f_back
    return False


def find_epoch_iterator(model: Any) -> Any:
    """The `TFEpochIterator` of the running `fit` of `model`, or None.

    See `fit_local`; only an iterator with `_enumerate_iterator`
    (`keras/src/trainers/epoch_iterator.py`) can be resumed mid-epoch.
    """
    import sys

    ei = fit_local(model, "epoch_iterator", sys._getframe(1))
    return ei if hasattr(ei, "_enumerate_iterator") else None


def original_get_iterator(epoch_iterator: Any) -> Callable[[], Any]:
    """`TFEpochIterator._get_iterator`: a new iterable over the dataset.

    `keras/src/backend/tensorflow/trainer.py`; `fit` calls it at each epoch
    start (and once more at the end of an epoch of known size).
    """
    return type(epoch_iterator)._get_iterator.__get__(epoch_iterator)


def patch_get_iterator(epoch_iterator: Any, fn: Callable[[], Any]) -> None:
    """Makes this epoch iterator create its dataset iterators with `fn`."""
    epoch_iterator._get_iterator = fn


def patch_enumerate(epoch_iterator: Any, fn: Callable[[], Any]) -> None:
    """Replaces this iterator's `_enumerate_iterator` (one epoch's steps)."""
    epoch_iterator._enumerate_iterator = fn


def original_enumerate(epoch_iterator: Any) -> Any:
    """A generator of `EpochIterator._enumerate_iterator` (class method,
    `keras/src/trainers/epoch_iterator.py`): `(begin, end, iterator)` per
    execution of the train function."""
    return type(epoch_iterator)._enumerate_iterator(epoch_iterator)


def set_steps_seen(epoch_iterator: Any, steps: int) -> None:
    """Sets `EpochIterator._steps_seen`: batches read from the current
    iterator (compared with the epoch size to start a new one)."""
    epoch_iterator._steps_seen = steps


def unpatch_epoch_iterator(epoch_iterator: Any) -> None:
    """Removes what `patch_get_iterator` / `patch_enumerate` set."""
    epoch_iterator.__dict__.pop("_get_iterator", None)
    epoch_iterator.__dict__.pop("_enumerate_iterator", None)


def build_metrics_now(model: Any, epoch_iterator: Any) -> None:
    """Builds compiled metrics before the first step (best effort).

    Keras builds them at the first step when there is no strategy; restoring
    their state needs them earlier. Uses `Trainer._symbolic_build`
    (`keras/src/trainers/trainer.py`) on the element spec of the iterator's
    `_distributed_dataset`.
    """
    if epoch_iterator is None or not getattr(model, "_compile_metrics", None):
        return
    spec = getattr(
        getattr(epoch_iterator, "_distributed_dataset", None),
        "element_spec", None,
    )
    if spec is None:
        return
    try:
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=spec)
    except Exception:  # best effort: only the metrics' state is at stake
        pass


def set_initial_epoch(model: Any, epoch: int | None) -> None:
    """Sets `Trainer._initial_epoch`, which `fit` starts counting from (as
    `keras/src/callbacks/backup_and_restore.py` does)."""
    model._initial_epoch = epoch


def eval_epoch_iterator(model: Any) -> Any:
    """The validation `TFEpochIterator` `fit` caches on the model
    (`model._eval_epoch_iterator`, set in `fit` of
    `keras/src/backend/tensorflow/trainer.py`), or None."""
    return getattr(model, "_eval_epoch_iterator", None)


def fit_inputs(model: Any) -> tuple[Any, Any]:
    """`(x, val_x)` of the running `fit` of `model` (its locals, see
    `fit_local`; `val_x` is None without `validation_data`)."""
    import sys

    frame = sys._getframe(1)
    return fit_local(model, "x", frame), fit_local(model, "val_x", frame)


def reads_dataset_as_given(epoch_iterator: Any, dataset: Any) -> bool:
    """True if the `TFEpochIterator` iterates `dataset` itself
    (`_distributed_dataset`), not a wrapper Keras made by distributing it
    (`keras/src/backend/tensorflow/trainer.py`, `TFEpochIterator`)."""
    return getattr(epoch_iterator, "_distributed_dataset", None) is dataset


def in_multi_worker_mode(strategy: Any) -> bool:
    """`strategy.extended._in_multi_worker_mode()` (TF's
    `collective_all_reduce_strategy.py`); False for other strategies."""
    return bool(
        getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)()
    )


CANARIES += [
    Canary(f"{_TRAINER}:TFEpochIterator", "_get_iterator",
           "callbacks._backup_resume.InputTracker"),
    Canary(f"{_TRAINER}:TFEpochIterator", "_enumerate_iterator",
           "callbacks._backup_resume.InputTracker"),
    Canary("keras.src.trainers.trainer:Trainer", "_symbolic_build",
           "callbacks._backup_resume.build_metrics_now"),
    Canary(
        "tensorflow.python.distribute.collective_all_reduce_strategy:"
        "CollectiveAllReduceExtended",
        "_in_multi_worker_mode",
        "callbacks.backup_and_restore (same backup on every worker)",
    ),
]



# ---------------------------------------------------------------------------
# Section: tf.distribute strategies and collectives (strategies.py,
# compression.py, data.py, devices.py).
# ---------------------------------------------------------------------------



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

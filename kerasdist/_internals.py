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



# ---------------------------------------------------------------------------
# Section: Keras optimizers and variables (accumulation.py, warmup.py,
# metric_average.py, local SGD).
# ---------------------------------------------------------------------------

_LOCAL_SGD = "kerasdist.callbacks.local_sgd"
CANARIES += [
    Canary("keras.src.backend.tensorflow.optimizer:TFOptimizer",
           "_all_reduce_sum_gradients", f"{_LOCAL_SGD}.LocalSGD"),
    Canary("keras.src.optimizers.base_optimizer:BaseOptimizer",
           "_track_variable", f"{_LOCAL_SGD}.LocalSGD"),
    Canary("tensorflow.python.distribute.values", "MirroredVariable",
           f"{_LOCAL_SGD}.LocalSGD"),
    Canary("tensorflow.python.distribute.distribute_lib:StrategyExtendedV2",
           "_batch_reduce_to", f"{_LOCAL_SGD}.AllReduceCounter"),
]


def tf_variable(variable: Any) -> Any:
    """The `tf.Variable` (a `MirroredVariable` under a strategy) behind a
    Keras variable; other values are returned unchanged."""
    return getattr(variable, "value", variable) if hasattr(
        variable, "path") else variable


def is_mirrored(variable: Any) -> bool:
    """Whether a (Keras) variable is a tf.distribute `MirroredVariable`:
    one component per replica, written on write (not sync-on-read).

    Uses `tensorflow/python/distribute/values.py` (`MirroredVariable`).
    """
    from tensorflow.python.distribute import values as values_lib

    return isinstance(tf_variable(variable), values_lib.MirroredVariable)


class _ReplicaLocalUpdates:
    """Optimizer mixin: each replica applies its own gradient."""

    _kd_scale_by_replicas = True

    def _all_reduce_sum_gradients(self, grads_and_vars):
        import tensorflow as tf

        if tf.distribute.get_replica_context() is None:
            return list(grads_and_vars)
        n = tf.distribute.get_strategy().num_replicas_in_sync
        if not self._kd_scale_by_replicas or n == 1:
            return list(grads_and_vars)
        # Keras divides each replica's loss by the number of replicas
        # (keras/src/losses/loss.py, scale_loss_for_distribution) so that
        # the all-reduced SUM is the mean gradient; alone, a replica's
        # gradient must be scaled back.
        return [
            (None if g is None else g * tf.cast(n, g.dtype), v)
            for g, v in grads_and_vars
        ]


def make_replica_local(
    optimizer: Any, *, scale_by_replicas: bool = True, enabled: bool = True
) -> None:
    """Makes a Keras TF optimizer skip its gradient all-reduce (or undo it).

    Keras's `TFOptimizer._backend_update_step`
    (`keras/src/backend/tensorflow/optimizer.py`) all-reduces gradients with
    `_all_reduce_sum_gradients` and then updates every replica's component
    of each `MirroredVariable` with the result. Overriding that one method
    to return the replica's own gradient makes each component (and each
    mirrored optimizer slot) follow its own replica: local SGD's
    per-replica training. Only functions traced afterwards are affected.

    Args:
        optimizer: `keras.optimizers.Optimizer`; changed in place.
        scale_by_replicas: bool. Multiply each gradient by the number of
            replicas (undoing Keras's per-replica loss scaling). Defaults to
            True; False for an optimizer fed already-averaged values.
        enabled: bool. False restores the optimizer's own class.
    """
    cls = type(optimizer)
    base = getattr(cls, "_kd_replica_local_base", None)
    if not enabled:
        if base is not None:
            optimizer.__class__ = base
        return
    if base is None:
        optimizer.__class__ = type(
            cls.__name__, (_ReplicaLocalUpdates, cls),
            {"_kd_replica_local_base": cls, "__module__": cls.__module__},
        )
    optimizer._kd_scale_by_replicas = scale_by_replicas  # noqa: SLF001


def track_optimizer_state(optimizer: Any, value: Any) -> None:
    """Adds `value` to `optimizer.variables`, so backups save it.

    Uses `BaseOptimizer._track_variable`
    (`keras/src/optimizers/base_optimizer.py`), which `add_variable` uses
    for the optimizer's own state. `value` needs `path`, `shape`, `dtype`,
    `numpy()` and `assign()`.

    Args:
        optimizer: `keras.optimizers.Optimizer`.
        value: a variable, or an object with a variable's saving interface.
    """
    optimizer._track_variable(value)  # noqa: SLF001


def instrument_batch_reduce(strategy: Any, count: Callable) -> None:
    """Calls `count(pairs)` inside every batch all-reduce of `strategy`.

    `StrategyExtendedV2.batch_reduce_to` (tensorflow/python/distribute/
    distribute_lib.py) hands its `(value, destination)` pairs to the
    strategy's `_batch_reduce_to`, the path of `ReplicaContext.all_reduce`
    (Keras's gradient all-reduce) and of `kerasdist.compression`. The
    instance attribute set here wraps whatever class method is in place.

    Args:
        strategy: `tf.distribute.Strategy`.
        count: callable taking the list of `(value, destination)` pairs;
            runs in cross-replica context, inside traced functions.
    """
    extended = strategy.extended
    original = extended._batch_reduce_to  # noqa: SLF001

    def counted(reduce_op, value_destination_pairs, options):
        pairs = list(value_destination_pairs)
        count(pairs)
        return original(reduce_op, pairs, options)

    extended._batch_reduce_to = counted  # noqa: SLF001



# ---------------------------------------------------------------------------
# Section: placement and pipeline (placement/).
# ---------------------------------------------------------------------------



# ---------------------------------------------------------------------------
# Section: anything else.
# ---------------------------------------------------------------------------

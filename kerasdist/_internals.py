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
import inspect
import re
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
        make: callable or None. Builds the object to look on, for an
            attribute that only instances have and that the owner's source
            does not assign as `self.<attribute> = ...`. Called with the
            resolved owner. Defaults to None (look on the owner itself).

    Example:

    >>> Canary("os", "getcwd", "example").missing() is None
    True
    """

    def __init__(
        self,
        owner: str,
        attribute: str,
        used_by: str,
        make: Callable[[Any], Any] | None = None,
    ):
        self.owner = owner
        self.attribute = attribute
        self.used_by = used_by
        self.make = make

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
            if self.make is not None:
                owner = self.make(owner)
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

    An attribute that instances get in a method (`self.<attribute> = ...`
    in the source of `owner` or a base class) counts as present, so
    instance attributes can be checked on the class.

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
    if hasattr(owner, attribute) or _assigned_in_source(owner, attribute):
        return None
    name = owner_name or getattr(owner, "__name__", type(owner).__name__)
    return (
        f"{name}.{attribute} no longer exists in the installed version; "
        f"kerasdist's {used_by} depends on it. See kerasdist/_internals.py."
    )


def _assigned_in_source(owner: Any, attribute: str) -> bool:
    """Whether a class in `owner`'s MRO assigns `self.<attribute>`."""
    if not inspect.isclass(owner):
        return False
    pattern = re.compile(
        rf"\bself\.{re.escape(attribute)}\s*(:[^=\n]*)?=(?!=)"
    )
    for cls in owner.__mro__:
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if pattern.search(source):
            return True
    return False


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
    except Exception:  # noqa: BLE001 (best effort: only metrics' state)
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


def fit_batch_size(epoch_iterator: Any) -> int | None:
    """The batch size of `fit`'s input as its data adapter knows it:
    `batch_size` for arrays, the static batch dimension for a
    `tf.data.Dataset` (`EpochIterator.data_adapter`,
    `keras/src/trainers/epoch_iterator.py`), or None."""
    adapter = getattr(epoch_iterator, "data_adapter", None)
    try:
        size = getattr(adapter, "batch_size", None)
    except Exception:  # noqa: BLE001 (an adapter without a static size)
        return None
    return int(size) if size else None


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

_MWMS_EXTENDED = (
    "tensorflow.python.distribute.collective_all_reduce_strategy:"
    "CollectiveAllReduceExtended"
)
_MIRRORED_EXTENDED = "tensorflow.python.distribute.mirrored_strategy:" \
    "MirroredExtended"


def num_workers(strategy: Any) -> int:
    """Number of workers (processes) in `strategy`'s cluster; 1 if local.

    tf.distribute has no public API for it: `CollectiveAllReduceExtended`
    keeps it in `_num_workers` and says whether it spans several workers
    in `_in_multi_worker_mode()`
    (tensorflow/python/distribute/collective_all_reduce_strategy.py).

    Args:
        strategy: `tf.distribute.Strategy`.

    Returns:
        int.

    Example:

    >>> import tensorflow as tf
    >>> num_workers(tf.distribute.get_strategy())
    1
    """
    extended = strategy.extended
    if getattr(extended, "_in_multi_worker_mode", lambda: False)():
        return int(extended._num_workers)  # noqa: SLF001
    return 1


CANARIES += [
    Canary(_MWMS_EXTENDED, "_in_multi_worker_mode", "num_workers"),
    Canary(_MWMS_EXTENDED, "_num_workers", "num_workers"),
]


def set_collective_key_base(strategy: Any, base: int) -> None:
    """Gives a mirrored strategy its own range of collective keys.

    Call it before `MirroredStrategy.__init__`: the extended object copies
    `_collective_key_base` (0 upstream) when it is created, and every
    strategy's group and instance keys start at `1 + _collective_key_base`
    (tensorflow/python/distribute/mirrored_strategy.py), so two strategies
    over different device sets in one process would share group key 1.

    Args:
        strategy: `tf.distribute.MirroredStrategy`, not yet initialised.
        base: int. The first key minus one.

    Example:

    ```python
    set_collective_key_base(self, 100_000)
    ```
    """
    strategy._collective_key_base = base  # noqa: SLF001


CANARIES += [
    Canary("tensorflow.python.distribute.mirrored_strategy:MirroredStrategy",
           "_collective_key_base", "set_collective_key_base"),
    Canary(_MIRRORED_EXTENDED, "_collective_key_base",
           "set_collective_key_base"),
]


# `StrategyExtended._batch_reduce_to` is what `ReplicaContext.all_reduce`
# reaches through `merge_call` and `batch_reduce_to`; kerasdist.compression
# overrides it in a per-instance subclass
# (tensorflow/python/distribute/mirrored_strategy.py).
CANARIES += [
    Canary(_MIRRORED_EXTENDED, "_batch_reduce_to", "compression.enable"),
    Canary(_MWMS_EXTENDED, "_batch_reduce_to", "compression.enable"),
    Canary(_MIRRORED_EXTENDED, "_batch_reduce_to",
           "_internals.map_batch_reduce_results"),
    Canary(_MWMS_EXTENDED, "_batch_reduce_to",
           "_internals.map_batch_reduce_results"),
]


def map_batch_reduce_results(strategy: Any, fn: Callable) -> None:
    """Applies `fn` to each result of every batch all-reduce of `strategy`.

    `StrategyExtendedV2._batch_reduce_to` (tensorflow/python/distribute/
    distribute_lib.py) is the path of `ReplicaContext.all_reduce`, which
    Keras's optimizers use to sum gradients across replicas. The wrapper
    is an instance attribute that calls the class's method at each call,
    so a class swapped in later (`kerasdist.compression.enable`) still
    runs under it.

    Args:
        strategy: `tf.distribute.Strategy`.
        fn: callable mapping one reduced value (a tensor, `IndexedSlices`
            or `Mirrored`) to its replacement; runs in cross-replica
            context, inside traced functions.

    Example:

    ```python
    map_batch_reduce_results(strategy, lambda value: value)
    ```
    """
    extended = strategy.extended

    def reduce_then_map(reduce_op, value_destination_pairs, options):
        results = type(extended)._batch_reduce_to(  # noqa: SLF001
            extended, reduce_op, value_destination_pairs, options)
        return [fn(r) for r in results]

    extended._batch_reduce_to = reduce_then_map  # noqa: SLF001


def make_per_replica(values: Any) -> Any:
    """A `PerReplica` value holding one component per local replica.

    tf.distribute exports `DistributedValues` but not the constructor of
    its per-replica subclass (tensorflow/python/distribute/values.py).

    Args:
        values: sequence of tensors, one per replica, in replica order.

    Returns:
        `tensorflow.python.distribute.values.PerReplica`.

    Example:

    >>> import tensorflow as tf
    >>> len(make_per_replica([tf.constant(1.0)]).values)
    1
    """
    from tensorflow.python.distribute import values as values_lib

    return values_lib.PerReplica(values)


def make_mirrored(values: Any) -> Any:
    """A `Mirrored` value (the same value on each replica).

    See `make_per_replica` (tensorflow/python/distribute/values.py).

    Args:
        values: sequence of tensors, one per replica, in replica order.

    Returns:
        `tensorflow.python.distribute.values.Mirrored`.

    Example:

    >>> import tensorflow as tf
    >>> len(make_mirrored([tf.constant(1.0)]).values)
    1
    """
    from tensorflow.python.distribute import values as values_lib

    return values_lib.Mirrored(values)


def is_per_replica(value: Any) -> bool:
    """Whether `value` is a `PerReplica` (not a mirrored or plain) value.

    Args:
        value: anything.

    Returns:
        bool.

    Example:

    >>> is_per_replica(1.0)
    False
    """
    from tensorflow.python.distribute import values as values_lib

    return isinstance(value, values_lib.PerReplica)


CANARIES += [
    Canary("tensorflow.python.distribute.values", "PerReplica",
           "make_per_replica"),
    Canary("tensorflow.python.distribute.values", "Mirrored",
           "make_mirrored"),
]


def host_address_space() -> str:
    """This process's device prefix, e.g. "/job:worker/replica:0/task:1".

    "/job:localhost/replica:0/task:0" alone, the cluster task's once a
    multi-worker strategy started its server. No public API gives it:
    `Context.host_address_space` (tensorflow/python/eager/context.py).

    Returns:
        str.

    Example:

    >>> host_address_space().startswith("/job:")
    True
    """
    from tensorflow.python.eager import context

    return context.context().host_address_space()


CANARIES.append(Canary("tensorflow.python.eager.context:Context",
                       "host_address_space", "host_address_space"))


def serialized_dataset_graph(dataset: Any) -> bytes:
    """The serialized `GraphDef` of a `tf.data.Dataset`.

    `DatasetV2._as_serialized_graph` (tensorflow/python/data/ops/
    dataset_ops.py) is what tf.data's own auto-sharding rewrites; kerasdist
    reads the reader ops and file names in it to choose a shard policy.

    Args:
        dataset: `tf.data.Dataset`.

    Returns:
        bytes, parseable with `tf.compat.v1.GraphDef().ParseFromString`.

    Example:

    >>> import tensorflow as tf
    >>> len(serialized_dataset_graph(tf.data.Dataset.range(3))) > 0
    True
    """
    return dataset._as_serialized_graph().numpy()  # noqa: SLF001


CANARIES.append(Canary("tensorflow.python.data.ops.dataset_ops:DatasetV2",
                       "_as_serialized_graph", "serialized_dataset_graph"))


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
    kerasdist checks there (uneven batches; file callbacks on several
    workers; an unscaled custom `train_step`; XLA on CPU).

    Args:
        max_depth: int. How many callers up to look. Defaults to 8.

    Returns:
        A `KerasCallSite`, or None if the caller is not Keras's epoch
        iterator.

    Example:

    >>> keras_call_site() is None
    True
    """
    from keras.src.backend.tensorflow import trainer

    frame = _caller_running(trainer.TFEpochIterator.__init__.__code__,
                            max_depth)
    if frame is None:
        return None
    caller = frame.f_back
    try:
        adapter = getattr(frame.f_locals.get("self"), "data_adapter", None)
        if adapter is None or caller is None:
            return None
        local = caller.f_locals
        method = caller.f_code.co_name
        if method == "fit" and local.get("epoch_iterator") is not None:
            # `Trainer.fit` makes the validation iterator after the
            # training one (`self._eval_epoch_iterator`, at the end of the
            # first epoch): that is validation data.
            method = "validation"
        return KerasCallSite(adapter, method, local.get("self"),
                             local.get("callbacks"))
    finally:
        del frame, caller


def _caller_running(code: Any, max_depth: int) -> Any:
    """The nearest frame (of `max_depth` callers above ours) running
    `code`, or None."""
    frame = inspect.currentframe().f_back
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None or frame.f_code is code:
                return frame
        return None
    finally:
        del frame


CANARIES.append(Canary("keras.src.backend.tensorflow.trainer:TensorFlowTrainer",
                       "_maybe_symbolic_build",
                       "_internals.in_keras_symbolic_build"))


def in_keras_symbolic_build(max_depth: int = 6) -> bool:
    """Whether Keras's `_maybe_symbolic_build` is reducing a batch now.

    `TensorFlowTrainer._maybe_symbolic_build` (`keras/src/backend/
    tensorflow/trainer.py`) calls `strategy.reduce("MEAN", batch,
    axis=None)` on the first distributed batch only to learn its structure,
    shapes and dtypes for `_symbolic_build`. A partial batch that splits
    unevenly (4 + 3 rows, or 1 + 0 on two workers) has no mean: TensorFlow
    fails with "Inputs to operation AddN ... must have the same size and
    shape" on one machine, and a collective's shape mismatch across workers
    (the upstream reduce of a structure is tensorflow/tensorflow#72388).

    Args:
        max_depth: int. How many callers up to look. Defaults to 6.

    Returns:
        bool.

    Example:

    >>> in_keras_symbolic_build()
    False
    """
    from keras.src.backend.tensorflow import trainer

    build = getattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build",
                    None)  # Keras versions without it never reduce there.
    return build is not None and (
        _caller_running(build.__code__, max_depth) is not None)


_BATCH_DATASET = "tensorflow.python.data.ops.batch_op:_BatchDataset"
CANARIES.extend(
    Canary(_BATCH_DATASET, name, "_internals.dataset_batching")
    for name in ("_input_dataset", "_batch_size", "_drop_remainder"))


class Batching:
    """How the batch op nearest a dataset's end batches (see
    `dataset_batching`).

    Args:
        batch_size: int. The batch op's `batch_size`.
        drop_remainder: bool.
        examples: int. Cardinality of the batch op's input: the number of
            examples, or `tf.data.INFINITE_CARDINALITY` /
            `tf.data.UNKNOWN_CARDINALITY`.
        same_batches: bool. Whether the dataset yields as many elements
            as the batch op (no `take`, `filter`, ... after batching), so
            the batch op's last batch is the dataset's.

    Example:

    >>> Batching(4, False, 10, True).batch_size
    4
    """

    def __init__(self, batch_size: int, drop_remainder: bool,
                 examples: int, same_batches: bool):
        self.batch_size = batch_size
        self.drop_remainder = drop_remainder
        self.examples = examples
        self.same_batches = same_batches


def dataset_batching(dataset: Any, max_depth: int = 32) -> Batching | None:
    """The batch op nearest the end of `dataset`, read without running it.

    tf.data keeps a `batch`'s arguments on its Python dataset object
    (`_BatchDataset._batch_size`, `_drop_remainder`, and the chain of
    `_input_dataset`s, tensorflow/python/data/ops/batch_op.py and
    dataset_ops.py). kerasdist reads them before the first step to know
    the size of a partial last batch, instead of checking every batch as
    it is read (which cost 13-25 % per step on a small MLP).

    Args:
        dataset: `tf.data.Dataset`.
        max_depth: int. How many datasets down the chain to look.
            Defaults to 32.

    Returns:
        `Batching`, or None when no batch op is found (or its arguments
        are not constants).

    Example:

    >>> import tensorflow as tf
    >>> dataset_batching(tf.data.Dataset.range(10).batch(4)).examples
    10
    """
    import tensorflow as tf

    node = dataset
    for _ in range(max_depth):
        if node is None:
            return None
        size = getattr(node, "_batch_size", None)
        drop = getattr(node, "_drop_remainder", None)
        if size is not None and drop is not None:
            try:
                size, drop = int(size), bool(drop)
            except (TypeError, ValueError, tf.errors.OpError):
                return None  # Not a constant (a placeholder in a graph).
            inner = node._input_dataset  # noqa: SLF001
            return Batching(size, drop, int(inner.cardinality()),
                            int(node.cardinality())
                            == int(dataset.cardinality())
                            or int(dataset.cardinality())
                            == tf.data.INFINITE_CARDINALITY)
        node = getattr(node, "_input_dataset", None)
    return None




# ---------------------------------------------------------------------------
# Section: Keras optimizers and variables (accumulation.py, warmup.py,
# metric_average.py, local SGD).
# ---------------------------------------------------------------------------

_BASE_OPTIMIZER = "keras.src.optimizers.base_optimizer:BaseOptimizer"
_TF_OPTIMIZER = "keras.src.backend.tensorflow.optimizer:TFOptimizer"


def learning_rate_attribute(optimizer: Any) -> Any:
    """What a Keras optimizer holds as its rate: a variable or a schedule.

    `optimizer.learning_rate` evaluates a schedule; the schedule object
    itself is only in `BaseOptimizer._learning_rate`
    (keras/src/optimizers/base_optimizer.py).

    Args:
        optimizer: `keras.optimizers.Optimizer`.

    Returns:
        A `keras.Variable`, a `LearningRateSchedule`, or a callable.

    Example:

    >>> import keras
    >>> learning_rate_attribute(keras.optimizers.SGD(0.1)) is not None
    True
    """
    return getattr(optimizer, "_learning_rate", None)


def set_learning_rate_schedule(optimizer: Any, schedule: Any) -> None:
    """Replaces a Keras optimizer's learning-rate schedule in place.

    Keras evaluates `_learning_rate` at `iterations` inside the train step
    (keras/src/optimizers/base_optimizer.py); the public setter refuses to
    swap one schedule for another.

    Args:
        optimizer: `keras.optimizers.Optimizer` built with a
            `LearningRateSchedule`.
        schedule: `keras.optimizers.schedules.LearningRateSchedule`.

    Example:

    ```python
    set_learning_rate_schedule(opt, WarmupSchedule(opt_schedule, 100))
    ```
    """
    optimizer._learning_rate = schedule  # noqa: SLF001


CANARIES.append(Canary(_BASE_OPTIMIZER, "_learning_rate",
                       "learning_rate_attribute"))


# kerasdist.accumulation's mixin overrides
# `BaseOptimizer._backend_apply_gradients` (keras/src/optimizers/
# base_optimizer.py, whose `ops.cond` around a `merge_call` fails under
# tf.distribute, keras-team/keras#20582) and uses the helpers below.
CANARIES.append(Canary(_BASE_OPTIMIZER, "_backend_apply_gradients",
                       "accumulation._DistributedAccumulation"))


def accumulators(optimizer: Any, variables: Any) -> list:
    """Keras's gradient accumulator of each variable, in order.

    `BaseOptimizer._accumulated_gradients` indexed by
    `_get_variable_index` (keras/src/optimizers/base_optimizer.py).

    Args:
        optimizer: a built `keras.optimizers.Optimizer` with
            `gradient_accumulation_steps`.
        variables: list of the model's trainable variables.

    Returns:
        list of `keras.Variable`.

    Example:

    ```python
    acc = accumulators(optimizer, model.trainable_variables)
    ```
    """
    table = optimizer._accumulated_gradients  # noqa: SLF001
    index = optimizer._get_variable_index  # noqa: SLF001
    return [table[index(v)] for v in variables]


def iterations_variable(optimizer: Any) -> Any:
    """The optimizer's step counter as a variable usable in graph code.

    `BaseOptimizer._iterations` (keras/src/optimizers/base_optimizer.py);
    the public `iterations` property is the same variable.

    Args:
        optimizer: `keras.optimizers.Optimizer`.

    Returns:
        `keras.Variable`.

    Example:

    >>> import keras
    >>> int(iterations_variable(keras.optimizers.SGD()).numpy())
    0
    """
    return optimizer._iterations  # noqa: SLF001


def clip_gradients(optimizer: Any, grads: list) -> list:
    """Clips `grads` as the optimizer's `clipnorm`/`clipvalue` ask.

    `BaseOptimizer._clip_gradients` (keras/src/optimizers/
    base_optimizer.py).

    Args:
        optimizer: `keras.optimizers.Optimizer`.
        grads: list of tensors.

    Returns:
        list of tensors.

    Example:

    ```python
    grads = clip_gradients(optimizer, grads)
    ```
    """
    return optimizer._clip_gradients(grads)  # noqa: SLF001


def uses_weight_decay(optimizer: Any, variable: Any) -> bool:
    """Whether the optimizer's weight decay applies to `variable`.

    `BaseOptimizer._use_weight_decay` (keras/src/optimizers/
    base_optimizer.py), which honours `exclude_from_weight_decay`.

    Args:
        optimizer: `keras.optimizers.Optimizer`.
        variable: a model variable.

    Returns:
        bool.

    Example:

    ```python
    if uses_weight_decay(optimizer, var): ...
    ```
    """
    return optimizer._use_weight_decay(variable)  # noqa: SLF001


def distributed_update_step(
    optimizer: Any, distribution: Any, grads_and_vars: list, lr: Any
) -> None:
    """Applies reduced gradients from the cross-replica context.

    `TFOptimizer._distributed_tf_update_step` (keras/src/backend/
    tensorflow/optimizer.py) runs the optimizer's update on each variable
    through `distribution.extended.update`.

    Args:
        optimizer: `keras.optimizers.Optimizer` (TensorFlow backend).
        distribution: `tf.distribute.Strategy`.
        grads_and_vars: list of (gradient, tf.Variable).
        lr: the learning rate.

    Example:

    ```python
    distributed_update_step(opt, strategy, list(zip(grads, tf_vars)), lr)
    ```
    """
    optimizer._distributed_tf_update_step(  # noqa: SLF001
        distribution, grads_and_vars, lr
    )


CANARIES += [
    Canary(_BASE_OPTIMIZER, "_accumulated_gradients", "accumulators"),
    Canary(_BASE_OPTIMIZER, "_get_variable_index", "accumulators"),
    Canary(_BASE_OPTIMIZER, "_iterations", "iterations_variable"),
    Canary(_BASE_OPTIMIZER, "_clip_gradients", "clip_gradients"),
    Canary(_BASE_OPTIMIZER, "_use_weight_decay", "uses_weight_decay"),
    Canary(_TF_OPTIMIZER, "_distributed_tf_update_step",
           "distributed_update_step"),
]

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


def set_gradient_all_reduce(
    optimizer: Any, all_reduce: Callable[[list], list] | None
) -> None:
    """Replaces a Keras TF optimizer's gradient all-reduce (or restores it).

    Keras's `TFOptimizer._backend_update_step`
    (`keras/src/backend/tensorflow/optimizer.py`) all-reduces gradients with
    `_all_reduce_sum_gradients(grads_and_vars)` and then updates every
    replica's component of each `MirroredVariable` with the result. A
    per-instance subclass overriding that one method with `all_reduce`
    decides what each replica applies (e.g. its own gradient, for local
    SGD). Only functions traced afterwards are affected.

    Args:
        optimizer: `keras.optimizers.Optimizer`; changed in place.
        all_reduce: callable `(list of (gradient, variable)) -> list of
            (gradient, variable)`, called in replica context; or None to
            restore the optimizer's own class.

    Example:

    ```python
    set_gradient_all_reduce(optimizer, lambda pairs: list(pairs))
    ```
    """
    cls = type(optimizer)
    base = getattr(cls, "_kd_all_reduce_base", None)
    if all_reduce is None:
        if base is not None:
            optimizer.__class__ = base
        return
    if base is None:
        def _all_reduce_sum_gradients(self, grads_and_vars):
            return self._kd_all_reduce(grads_and_vars)  # noqa: SLF001

        optimizer.__class__ = type(cls.__name__, (cls,), {
            "_all_reduce_sum_gradients": _all_reduce_sum_gradients,
            "_kd_all_reduce_base": cls,
            "__module__": cls.__module__,
        })
    optimizer._kd_all_reduce = all_reduce  # noqa: SLF001


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

_FUNCTION = "keras.src.ops.function:Function"


def sequential_graph(model: Any) -> Any:
    """A built Sequential model's inner functional graph, or None.

    Keras 3 keeps it in `Sequential._functional` (keras/src/models/
    sequential.py, `build`).

    Args:
        model: `keras.Sequential`.

    Returns:
        `keras.Model` (functional) or None when the input shape is unknown.

    Example:

    >>> import keras
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> sequential_graph(m) is not None
    True
    """
    return getattr(model, "_functional", None)


def has_layer_graph(model: Any) -> bool:
    """Whether `model` records its layer graph (functional, not subclassed).

    Looks for `Function._nodes_by_depth` and `_inputs_struct`
    (keras/src/ops/function.py).

    Args:
        model: `keras.Model`.

    Returns:
        bool.

    Example:

    >>> import keras
    >>> x = keras.Input((2,))
    >>> has_layer_graph(keras.Model(x, keras.layers.Dense(1)(x)))
    True
    """
    return hasattr(model, "_nodes_by_depth") and hasattr(
        model, "_inputs_struct"
    )


def nodes_by_depth(functional: Any) -> dict:
    """`{depth: [Node, ...]}` of a functional model, outputs at depth 0.

    `Function._nodes_by_depth` (keras/src/ops/function.py).

    Args:
        functional: a functional `keras.Model`.

    Returns:
        dict of int to list of `Node`.

    Example:

    ```python
    for depth in sorted(nodes_by_depth(f), reverse=True): ...
    ```
    """
    return functional._nodes_by_depth  # noqa: SLF001


def producing_layer(tensor: Any) -> Any:
    """The layer (operation) that produced a symbolic `KerasTensor`.

    `KerasTensor._keras_history[0]` (keras/src/ops/node.py sets it).

    Args:
        tensor: `keras.KerasTensor`.

    Returns:
        `keras.Operation`.

    Example:

    >>> import keras
    >>> producing_layer(keras.Input((2,), name="x")).name
    'x'
    """
    return tensor._keras_history[0]  # noqa: SLF001


def standardize_inputs(functional: Any, x: Any) -> list:
    """Model inputs `x` flattened in the order of the graph's inputs.

    `Functional._standardize_inputs` (keras/src/models/functional.py).

    Args:
        functional: a functional `keras.Model`.
        x: the inputs as a user passes them (array, list, dict).

    Returns:
        list of tensors.

    Example:

    ```python
    flat = standardize_inputs(functional, x)
    ```
    """
    return list(functional._standardize_inputs(x))  # noqa: SLF001


def outputs_structure(functional: Any) -> Any:
    """The nested structure of a functional model's outputs.

    `Function._outputs_struct` (keras/src/ops/function.py).

    Args:
        functional: a functional `keras.Model`.

    Returns:
        The structure (a tensor, list, tuple or dict of KerasTensors).

    Example:

    ```python
    out = keras.tree.pack_sequence_as(outputs_structure(f), flat)
    ```
    """
    return functional._outputs_struct  # noqa: SLF001


def call_context_args(operation: Any) -> set:
    """Names of the call-context arguments (`training`) a layer takes.

    `Layer._call_context_args` (keras/src/layers/layer.py); functional
    models inject them the same way (`operation_fn` in
    keras/src/models/functional.py).

    Args:
        operation: `keras.Operation`.

    Returns:
        set of str (empty for operations that are not layers).

    Example:

    >>> import keras
    >>> "training" in call_context_args(keras.layers.Dropout(0.5))
    True
    """
    return getattr(operation, "_call_context_args", set())


def reinitialize_variable(variable: Any, value: Any) -> None:
    """Re-creates a Keras variable's backing `tf.Variable` from `value`.

    Keras 3 has no API to move a variable: `Variable._initialize`
    (keras/src/backend/tensorflow/core.py) builds the tf.Variable under the
    current device scope. The `keras.Variable` object (its path, name and
    any optimizer reference) stays the same.

    Args:
        variable: `keras.Variable` (TensorFlow backend).
        value: tensor, the new initial value.

    Example:

    ```python
    with tf.init_scope(), tf.device("/cpu:1"):
        reinitialize_variable(v, tf.identity(v.value))
    ```
    """
    variable._initialize(value)  # noqa: SLF001


def compute_loss(model: Any, **kwargs: Any) -> Any:
    """`model`'s loss as `keras.Model.train_step` computes it.

    `Trainer._compute_loss` (keras/src/trainers/trainer.py) adds the
    regularization losses and handles a user `compute_loss` override.

    Args:
        model: a compiled `keras.Model`.
        **kwargs: `x`, `y`, `y_pred`, `sample_weight`, `training`.

    Returns:
        scalar tensor.

    Example:

    ```python
    loss = compute_loss(self, x=x, y=y, y_pred=y_pred, training=True)
    ```
    """
    return model._compute_loss(**kwargs)  # noqa: SLF001


def loss_tracker(model: Any) -> Any:
    """The `Mean` metric behind a compiled model's "loss" log.

    `Trainer._loss_tracker` (keras/src/trainers/trainer.py).

    Args:
        model: a compiled `keras.Model`.

    Returns:
        `keras.metrics.Mean`.

    Example:

    ```python
    loss_tracker(self).update_state(loss, sample_weight=batch)
    ```
    """
    return model._loss_tracker  # noqa: SLF001


def unscale_loss_for_distribution(loss: Any) -> Any:
    """The loss as `keras.Model.train_step` logs it under a strategy.

    `keras.src.losses.loss.unscale_loss_for_distribution`, not exported.

    Args:
        loss: scalar tensor.

    Returns:
        scalar tensor.

    Example:

    ```python
    logged = unscale_loss_for_distribution(loss)
    ```
    """
    from keras.src.losses import loss as loss_module

    return loss_module.unscale_loss_for_distribution(loss)


def _keras_input(keras_input: Any) -> Any:
    return keras_input((1,))


CANARIES += [
    Canary("keras.src.models.sequential:Sequential", "_functional",
           "sequential_graph"),
    Canary(_FUNCTION, "_nodes_by_depth", "nodes_by_depth"),
    Canary(_FUNCTION, "_inputs_struct", "has_layer_graph"),
    Canary(_FUNCTION, "_outputs_struct", "outputs_structure"),
    Canary("keras.src.models.functional:Functional", "_standardize_inputs",
           "standardize_inputs"),
    Canary("keras:Input", "_keras_history", "producing_layer",
           make=_keras_input),
    Canary("keras.src.layers.layer:Layer", "_call_context_args",
           "call_context_args"),
    Canary("keras.src.backend.tensorflow.core:Variable", "_initialize",
           "reinitialize_variable"),
    Canary("keras.src.trainers.trainer:Trainer", "_compute_loss",
           "compute_loss"),
    Canary("keras.src.trainers.trainer:Trainer", "_loss_tracker",
           "loss_tracker"),
    Canary("keras.src.losses.loss", "unscale_loss_for_distribution",
           "unscale_loss_for_distribution"),
]

# ---------------------------------------------------------------------------
# Section: Keras random numbers (strategies.py: per-replica streams).
# ---------------------------------------------------------------------------

_SEED_GENERATOR = "keras.src.random.seed_generator:SeedGenerator"
_SEED_TRANSFORMS: list[Callable[[Any], Any]] = []


def transform_seed_draws(transform: Callable[[Any], Any]) -> None:
    """Pass every seed a Keras `SeedGenerator` hands out through `transform`.

    Every Keras random op (`keras.random.*`, Dropout, the augmentation
    layers) draws its stateless seed with `SeedGenerator.next`
    (keras/src/random/seed_generator.py, via `draw_seed`); the generator's
    state is a variable with `aggregation="none"`, so under a strategy each
    replica holds an identical copy and every replica draws the same
    numbers. Wrapping `next` (once per process; later calls replace the
    transform) changes what is drawn, never the state, so checkpoints keep
    their format.

    Args:
        transform: callable taking the drawn seed (a `[2]` int tensor) and
            returning the seed to use.

    Example:

    ```python
    transform_seed_draws(lambda seed: seed)
    ```
    """
    from keras.src.random import seed_generator

    _SEED_TRANSFORMS[:] = [transform]
    cls = seed_generator.SeedGenerator
    if getattr(cls.next, "_kd_original", None) is not None:
        return
    original = cls.next

    def next_seed(self, ordered=True):
        return _SEED_TRANSFORMS[0](original(self, ordered=ordered))

    next_seed._kd_original = original
    cls.next = next_seed


CANARIES += [
    Canary(_SEED_GENERATOR, "next", "transform_seed_draws"),
    Canary(_SEED_GENERATOR, "state", "transform_seed_draws"),
    Canary("keras.src.random.seed_generator", "draw_seed",
           "transform_seed_draws"),
]


# ---------------------------------------------------------------------------
# Section: anything else.
# ---------------------------------------------------------------------------

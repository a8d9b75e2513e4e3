"""Data-parallel strategies that are correct with Keras 3 `fit`/`evaluate`.

`kd.MirroredStrategy` and `kd.MultiWorkerMirroredStrategy` subclass
tf.distribute's and can be used wherever those are. They differ only where
Keras 3's TensorFlow trainer (`keras/src/backend/tensorflow/trainer.py`)
calls `Strategy.reduce` in ways tf.distribute does not support under
multi-worker collectives:

1. `Trainer._maybe_symbolic_build` calls `strategy.reduce("MEAN", batch,
   axis=None)` on a *structure* (tuple/dict) of `PerReplica` values.
   `CollectiveAllReduceExtended` converts the structure to one tensor and
   fails with `ValueError: Attempt to convert a value (PerReplica ...)`
   (tensorflow/tensorflow#72388, keras-team/keras#20585, keras-team/keras#20329
   for dict inputs, ray-project/ray#47464).
2. `reduce_per_replica(..., reduction="mean")` calls `strategy.reduce("MEAN",
   v, axis=0)` on scalar logs, which fails with `ValueError: Invalid reduction
   dimension 0 for input with 0 dimensions` (same reports).

Both are fixed by a `reduce` that maps over structures and treats `axis=0` on
a rank-0 value as the mean over replicas, which is what Keras means there.
That `reduce` also never all-reduces strings or booleans (a
TextVectorization vocabulary, bool inputs).

Where Keras's `fit`/`evaluate`/`predict` distributes its input
(`experimental_distribute_dataset`), kerasdist checks, before the first
step, what would otherwise crash or silently train differently on several
replicas: uneven global batches, Keras's file-writing callbacks, XLA on CPU
workers, custom training steps (see `docs/guide/custom_loops.md`). A process
has at most one `MultiWorkerMirroredStrategy`, handed back when created
again with the same cluster and options.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from typing import Any

import tensorflow as tf
from absl import logging

from kerasdist import _internals
from kerasdist import cluster as cluster_lib
from kerasdist import compression as compression_lib
from kerasdist import data as data_lib
from kerasdist import devices as devices_lib
from kerasdist import elastic as elastic_lib
from kerasdist._validate import check_int
from kerasdist.errors import PermanentError

__all__ = [
    "CollectivesAfterStartupError",
    "MirroredStrategy",
    "ModelWithoutCallError",
    "MultiWorkerMirroredStrategy",
    "MultiWorkerStrategyConflictError",
    "STRATEGY_NAMES",
    "UnbuiltOptimizerError",
    "get_strategy",
    "scope_or_null",
]

STRATEGY_NAMES = ("auto", "one_device", "mirrored", "multi_worker")
_COMMUNICATIONS = ("auto", "ring", "nccl")
_MIRRORED_CROSS_DEVICE_OPS = ("auto", "nccl", "hierarchical_copy", "one_device")


def _is_single_value(value: Any) -> bool:
    return isinstance(value, (tf.distribute.DistributedValues, tf.Tensor,
                              tf.Variable)) or not tf.nest.is_nested(value)


# Dtypes every cross-device all-reduce implements: TF's collective ops
# (CollectiveReduceV2 / NCCL) accept only these, and a mean of strings or
# booleans means nothing anyway.
_REDUCIBLE_DTYPES = frozenset({
    tf.bfloat16, tf.float16, tf.float32, tf.float64, tf.int32, tf.int64,
})


def _is_reducible(value: Any) -> bool:
    if isinstance(value, tf.distribute.DistributedValues):
        value = value.values[0]
    dtype = getattr(value, "dtype", None)
    return dtype is None or tf.as_dtype(dtype) in _REDUCIBLE_DTYPES


def _rank(value: Any) -> int | None:
    if isinstance(value, tf.distribute.DistributedValues):
        value = value.values[0]
    shape = getattr(value, "shape", None)
    return None if shape is None else shape.rank


class _KerasCompatibleReduce:
    """Mixin: a `reduce` that accepts what Keras 3's TF trainer passes."""

    def reduce(self, reduce_op, value, axis=None):
        """Reduces `value` across replicas (and workers).

        Unlike `tf.distribute.Strategy.reduce`, `value` may be a nested
        structure of per-replica values (each leaf is reduced), and
        `axis=0` on a scalar reduces across replicas only. A per-replica
        value whose dtype no all-reduce implements (string, bool, int8, ...)
        is not reduced: the first local replica's value is returned.

        Args:
            reduce_op: `tf.distribute.ReduceOp` or `"SUM"`/`"MEAN"`.
            value: per-replica value, tensor, or a structure of them.
            axis: int or None. As for `tf.distribute.Strategy.reduce`.

        Returns:
            The reduced value(s), with the structure of `value`.

        Example:

        ```python
        strategy.reduce("MEAN", {"x": per_replica_x, "y": per_replica_y})
        ```
        """
        parent = super()
        if axis is None and _internals.in_keras_symbolic_build():
            # Keras reduces the first batch only for its structure and
            # shapes; an uneven split (evaluate/predict on 4 + 3 rows, or
            # 1 + 0 across workers) has no mean. Each replica's own value
            # serves, with no collective.
            return tf.nest.map_structure(self._first_local, value)
        if not _is_single_value(value):
            # Upstream bug 1 (tensorflow/tensorflow#72388,
            # keras-team/keras#20585, #20329): Keras reduces a whole batch
            # structure at once in `_maybe_symbolic_build`.
            return tf.nest.map_structure(
                lambda v: self.reduce(reduce_op, v, axis=axis), value
            )
        if isinstance(value, tf.distribute.DistributedValues) and not (
            _is_reducible(value)
        ):
            # Issues 15.1 / 16.2: Keras's `_maybe_symbolic_build` reduces the
            # whole first batch with "MEAN" only to learn its structure and
            # shapes; a string or boolean element (TextVectorization inputs,
            # keras_hub's `padding_mask`) has no all-reduce ("Value for attr
            # 'T' of string is not in the list of allowed values"). Such a
            # value cannot be averaged: take the first local replica's.
            return self.experimental_local_results(value)[0]
        if axis is not None and _rank(value) == 0:
            # Upstream bug 2 (same reports): Keras asks for axis=0 on scalar
            # logs; the mean over replicas is axis=None.
            axis = None
        return parent.reduce(reduce_op, value, axis=axis)

    def _first_local(self, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return self.experimental_local_results(value)[0]
        return value

    def run(self, fn, args=(), kwargs=None, options=None):
        """Runs `fn` on each replica; refuses unbuilt Keras optimizers.

        As `tf.distribute.Strategy.run`. When called while a `tf.function`
        is traced (TF's custom-loop tutorial), a Keras 3 optimizer that
        `fn` uses but that is not built yet would create its variables
        inside the replica function and fail at the first step with
        "You must feed a value for placeholder tensor" (with TensorFlow's
        own strategies too). That is refused here, before the
        step runs, with the fix.

        Args:
            fn: the replica function.
            args: tuple. Positional arguments for `fn`.
            kwargs: dict or None. Keyword arguments for `fn`.
            options: `tf.distribute.RunOptions` or None.

        Returns:
            The per-replica results of `fn`.

        Raises:
            UnbuiltOptimizerError: if `fn` refers to an unbuilt Keras
                optimizer while a `tf.function` is traced.

        Example:

        ```python
        losses = strategy.run(step, args=(batch,))
        ```
        """
        if not tf.executing_eagerly():
            _refuse_unbuilt_optimizers(
                _optimizers_used_by(fn),
                "optimizer.build(model.trainable_variables) inside "
                "`with strategy.scope():`, right after creating the "
                "optimizer, before the training loop",
            )
        return super().run(fn, args=args, kwargs=kwargs, options=options)

    def experimental_distribute_dataset(self, dataset, options=None):
        """Distributes `dataset`; under Keras `fit`, refuses uneven batches.

        As `tf.distribute.Strategy.experimental_distribute_dataset`. When
        Keras's `fit` calls it for its training data with more than one
        replica (or under an elastic launcher), a global batch that would
        not split evenly over the replicas (`batch_size=3` on 2 replicas,
        or a last partial batch of 1; at every allowed group size when
        elastic) is refused with `kerasdist.data.UnevenBatchError` before
        the first step: Keras's loss scaling is only exact for even splits.
        The sizes are read from the dataset once, at no cost per step.
        Evaluation, validation and `predict` data are accepted with any
        split: Keras's results for them equal one device's. Custom loops
        that call this method themselves are not checked (see the custom
        loops guide for a loss that is exact with a partial batch).

        At the same point, before the first step, kerasdist also: makes
        Keras's `ModelCheckpoint`/`CSVLogger`/`TensorBoard` write from the
        chief only and refuses `keras.callbacks.BackupAndRestore` (several
        workers, see `kerasdist.callbacks.adapt_file_callbacks`); turns
        `jit_compile=True` off with a warning on CPU workers (TensorFlow
        has no XLA collectives on CPU); warns once about a custom
        `train_step` that may not scale its loss (`kd.scale_loss`); and
        refuses optimizers a custom model holds but has not built.

        Across workers, for a dataset of known size that every worker
        reads as many batches of (`DATA` sharding, or `AUTO` with no input
        files), Keras's iterator gets no per-step all-reduce of "each
        worker still has data" (TensorFlow's partial-batch handling, which
        Keras never needs there: it stops at the dataset's size).

        Args:
            dataset: `tf.data.Dataset` of global batches.
            options: `tf.distribute.InputOptions` or None.

        Returns:
            A `tf.distribute.DistributedDataset`.

        Raises:
            kerasdist.data.UnevenBatchError: for training data whose
                `batch_size` or last partial batch does not divide over the
                replicas. A `tf.data.Dataset` of unknown size (after
                `filter`) is checked as each batch is read instead
                (`tf.errors.InvalidArgumentError` with the same advice),
                or refused under an elastic launcher.

        Example:

        ```python
        dist = strategy.experimental_distribute_dataset(ds.batch(64))
        ```
        """
        site = None
        if isinstance(dataset, tf.data.Dataset) and (
            self.num_replicas_in_sync > 1 or elastic_lib.is_elastic()
        ):
            site = _internals.keras_call_site()
            if site is not None:
                dataset = _check_keras_call(self, dataset, site)
        if site is None or not _same_batch_count_everywhere(self, dataset):
            return super().experimental_distribute_dataset(dataset, options)
        # Every worker reads the same number of batches: TensorFlow's
        # partial-batch handling would only all-reduce, at every step, that
        # each still has data. Keras's `fit`/`evaluate`/`predict` never
        # read past a dataset of known size (`EpochIterator` stops at its
        # `num_batches`), so the all-reduce says nothing; it is off for
        # this dataset, as TensorFlow turns it off for an infinite one.
        extended, name = self.extended, _partial_batch_flag(self)
        previous = getattr(extended, name)
        setattr(extended, name, False)
        try:
            return super().experimental_distribute_dataset(dataset, options)
        finally:
            setattr(extended, name, previous)


def _partial_batch_flag(strategy) -> str:
    """The attribute TensorFlow reads to turn partial-batch handling on
    (`_enable_get_next_as_optional` in tensorflow/python/distribute/
    input_lib.py reads the first that exists)."""
    for name in ("enable_partial_batch_handling",
                 "experimental_enable_get_next_as_optional"):
        if hasattr(strategy.extended, name):
            return name
    return "experimental_enable_get_next_as_optional"


def _same_batch_count_everywhere(strategy, dataset) -> bool:
    """True when every worker reads as many batches of `dataset`.

    A dataset of known size sharded by `DATA` (each worker keeps its part
    of every global batch: `kd.data.distribute`'s choice, and Keras's for
    NumPy inputs), or by `AUTO` when it reads no files (TensorFlow falls
    back to `DATA`). `FILE` and `OFF` sharding may leave workers with
    different numbers of batches; a dataset of unknown size is not known
    to end at a step boundary. On one worker TensorFlow's partial-batch
    handling runs no collective (and is off for static shapes).
    """
    if _internals.num_workers(strategy) <= 1 or not getattr(
        strategy.extended, _partial_batch_flag(strategy), False
    ):
        return False
    if int(dataset.cardinality()) < 0:
        return False
    policy = tf.data.experimental.AutoShardPolicy
    chosen = dataset.options().experimental_distribute.auto_shard_policy
    if chosen == policy.DATA:
        return True
    return chosen == policy.AUTO and data_lib.reads_no_files(dataset)


def _check_keras_call(strategy, dataset, site):
    """Checks what a Keras `fit`/`evaluate`/`predict` call distributes.

    Runs before the first step, on every worker alike, with more than one
    replica: uneven batches are refused, Keras's file-writing callbacks are
    made multi-worker safe, an unscaled custom `train_step` is warned of
    and XLA on CPU under multi-worker is turned off with a warning.
    """
    from kerasdist import losses as losses_lib
    from kerasdist.callbacks import keras_files

    if strategy.num_replicas_in_sync == 1:
        # One replica now, under an elastic launcher: the group may restart
        # at another size, so the training batches are checked at all.
        if site.method == "fit":
            return _check_keras_input(strategy, dataset, site.adapter)
        return dataset
    multi_worker = _internals.num_workers(strategy) > 1
    _build_call_free_model(site.model)
    if multi_worker:
        keras_files.adapt_file_callbacks(site.callbacks)
        _no_xla_collectives_on_cpu(site.model)
    if site.method == "fit":
        data_lib.warn_if_unseeded_shuffle(dataset, strategy)
        losses_lib.warn_if_custom_train_step(site.model, strategy)
        _refuse_unbuilt_optimizers(
            _model_optimizers(site.model),
            "create it and call e.g. `self.d_optimizer.build(self."
            "discriminator.trainable_variables)` in your model's compile()"
            " (which runs inside strategy.scope()), for each optimizer with "
            "the variables it updates",
        )
    if site.method != "fit":
        # Evaluation, validation and prediction are exact for any split,
        # on one machine and across workers: Keras's metrics weight each
        # replica by its examples and `predict` gathers every replica's
        # rows in order (tests/clients compare them with one device).
        return dataset
    return _check_keras_input(strategy, dataset, site.adapter)


class ModelWithoutCallError(PermanentError, ValueError):
    """A `keras.Model` subclass without `call()` whose parts are unbuilt.

    Under a strategy Keras builds the model from the first batch before
    the first step (`_symbolic_build`), which needs `call()`; a model that
    only has a `train_step` (the keras.io GAN, Distiller and VAE) fails
    there ("Unable to automatically build the model"). kerasdist marks
    such a model built when all its layers are; otherwise it raises this,
    before the first step, with the fix.

    Example:

    >>> issubclass(ModelWithoutCallError, ValueError)
    True
    """


def _defines_call(model) -> bool:
    return any("call" in vars(cls) for cls in type(model).__mro__
               if not cls.__module__.startswith("keras."))


def _build_call_free_model(model) -> None:
    """Marks a model without `call()` built when its layers are."""
    if model is None or model.built or _defines_call(model):
        return
    unbuilt = [layer.name for layer in model.layers if not layer.built]
    if model.layers and not unbuilt:
        # Nothing left to build; Keras's `_symbolic_build` would call the
        # missing `call()` only to build it (keras/src/trainers/
        # trainer.py), and on one device Keras never does.
        model.built = True
        return
    raise ModelWithoutCallError(
        f"{type(model).__name__} has no call() method and its layers "
        f"{unbuilt or '(none)'} are not built, so Keras cannot build it "
        "from the first batch under a distribution strategy (\"Unable to "
        "automatically build the model\"). Build its layers when you "
        "create them, e.g. keras.Sequential([keras.Input(shape), ...]) "
        "for each sub-model, or define call()."
    )


class UnbuiltOptimizerError(PermanentError, ValueError):
    """A Keras optimizer used under a strategy before it was built.

    A Keras 3 optimizer creates its variables on its first
    `apply_gradients`. Inside `strategy.run` in a `tf.function` (a custom
    training loop, or a custom `train_step` with optimizers of its own, as
    in the keras.io GAN example) that fails with TensorFlow's "You must
    feed a value for placeholder tensor". Build it under
    `strategy.scope()` first.

    Example:

    >>> issubclass(UnbuiltOptimizerError, ValueError)
    True
    """


def _is_unbuilt_optimizer(value) -> bool:
    import keras

    return isinstance(value, keras.optimizers.Optimizer) and not (
        value.built
    )


def _optimizers_used_by(fn) -> list[tuple[str, Any]]:
    """(name, optimizer) for the unbuilt Keras optimizers `fn` refers to."""
    fn = getattr(fn, "python_function", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    found = []
    for name, cell in zip(code.co_freevars, fn.__closure__ or (),
                          strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # An empty cell.
            continue
        found.append((name, value))
    found += [(name, fn.__globals__[name]) for name in code.co_names
              if name in getattr(fn, "__globals__", {})]
    return [(n, v) for n, v in found if _is_unbuilt_optimizer(v)]


def _refuse_unbuilt_optimizers(named, fix):
    if not named:
        return
    name, optimizer = named[0]
    raise UnbuiltOptimizerError(
        f"The Keras optimizer `{name}` ({type(optimizer).__name__}) is not "
        "built, and under a tf.distribute strategy it cannot create its "
        "variables inside the training step (TensorFlow fails at the first "
        "step with \"You must feed a value for placeholder tensor\"). "
        f"Build it first: {fix}."
    )


def _model_optimizers(model) -> list[tuple[str, Any]]:
    """Unbuilt optimizers a custom model holds besides `model.optimizer`."""
    if model is None:
        return []
    main = getattr(model, "optimizer", None)
    return [(f"{type(model).__name__}.{name}", value)
            for name, value in vars(model).items()
            if value is not main and _is_unbuilt_optimizer(value)]


def _no_xla_collectives_on_cpu(model):
    """Falls back from `jit_compile=True` under multi-worker on CPU."""
    if model is None or not getattr(model, "jit_compile", False):
        return
    if devices_lib.gpus():
        return
    warnings.warn(
        "jit_compile=True is not supported by kd.MultiWorkerMirroredStrategy"
        " on CPU: TensorFlow's XLA has no CPU collectives (\"Collectives are"
        " not yet implemented for CPU devices when compiling with XLA\"). "
        "kerasdist trains this model without XLA. To silence this warning, "
        "compile it with model.compile(..., jit_compile=False).",
        stacklevel=4,
    )
    model.jit_compile = False
    # A function traced with XLA earlier would keep it.
    model.train_function = None
    model.test_function = None
    model.predict_function = None


def _check_keras_input(strategy, dataset, adapter):
    """Checks the batches Keras made from `adapter` split evenly."""
    try:
        batch_size = adapter.batch_size
        partial = adapter.partial_batch_size if batch_size else None
        batches = adapter.num_batches
    except NotImplementedError:
        batch_size = partial = batches = None
    if batch_size is None:  # A dataset: its batches are checked as read.
        return data_lib.assert_even_batches(dataset, strategy)
    examples = None
    if batches:
        examples = (batches - 1) * batch_size + (partial or batch_size)
    data_lib.check_keras_batches(batch_size, partial, strategy, examples)
    return dataset


def _merge_replica_copies(slices: tf.IndexedSlices,
                          replicas: int) -> tf.IndexedSlices:
    """`slices` with the replicas' pieces summed when they index alike.

    The all-reduced slices are the replicas' slices one after the other.
    When every replica's indices are the same list (a lookup that does not
    depend on the data, such as `ops.arange` positions), one device would
    have had one piece per index holding the sum over the whole batch:
    those pieces are summed. Data-dependent lookups (token ids) differ
    between replicas and are kept as they are, as one device keeps each
    occurrence.
    """
    indices = slices.indices
    count = tf.size(indices)
    per_replica = count // replicas
    rows = tf.reshape(indices[:per_replica * replicas],
                      [replicas, per_replica])
    alike = tf.logical_and(tf.equal(count % replicas, 0),
                           tf.reduce_all(tf.equal(rows, rows[:1])))

    def summed():
        values = tf.reshape(slices.values, tf.concat(
            [[replicas, per_replica], tf.shape(slices.values)[1:]], 0))
        return tf.reduce_sum(values, axis=0), indices[:per_replica]

    values, indices = tf.cond(alike, summed,
                              lambda: (slices.values, indices))
    return tf.IndexedSlices(values, indices, slices.dense_shape)


def _merged_sparse(value: Any, replicas: int) -> Any:
    """A reduced gradient whose sparse parts are as one device has them.

    TensorFlow all-reduces an `IndexedSlices` gradient by concatenating
    the replicas' slices, so an index every replica touches (a position
    embedding looked up with `ops.arange`, keras.io's
    `TokenAndPositionEmbedding`, ViT's `PatchEncoder`) appears once per
    replica, where one device has it once. Keras's Adam squares each piece
    before adding them (a^2 + b^2 instead of (a + b)^2): its first update
    was 0.014 instead of one device's 0.100 on 2 replicas
    (tests/test_sparse_gradients.py).
    """
    if replicas < 2:
        return value
    if isinstance(value, tf.IndexedSlices):
        return _merge_replica_copies(value, replicas)
    if isinstance(value, tf.distribute.DistributedValues) and all(
            isinstance(v, tf.IndexedSlices) for v in value.values):
        return _internals.make_mirrored(
            [_merge_replica_copies(v, replicas) for v in value.values])
    return value


def _merge_sparse_gradients(strategy) -> None:
    _internals.map_batch_reduce_results(
        strategy, lambda value: _merged_sparse(
            value, strategy.num_replicas_in_sync))


# Keras's `SeedGenerator` state is mirrored (aggregation="none", the same
# on every replica: keras/src/random/seed_generator.py), so Dropout masks,
# augmentations and a GAN's latents were identical on all replicas. Under
# a kd strategy each replica's draw adds its global replica id
# times a large odd constant to the seed's first half: replica 0 draws what
# one device draws, the others independent streams; the state (and so every
# checkpoint) is unchanged, so runs and resumes reproduce the same draws.
_REPLICA_SEED_STRIDE = 0x9E3779B1


def _per_replica_seed(seed):
    """`seed` folded with the global replica id under a kd strategy."""
    if not tf.is_tensor(seed):
        return seed  # A generator on another backend (numpy).
    context = tf.distribute.get_replica_context()
    if (context is None
            or not isinstance(context.strategy, _KerasCompatibleReduce)
            or context.strategy.num_replicas_in_sync == 1):
        return seed
    replica = tf.cast(context.replica_id_in_sync_group, seed.dtype)
    return seed + tf.stack([replica * _REPLICA_SEED_STRIDE,
                            tf.zeros_like(replica)])


# Collective group/instance keys of every MirroredStrategy in a process start
# at 1 + `_collective_key_base` (0 upstream), so a second strategy over a
# different device set reuses group key 1 and aborts with "Device ... is
# joining a group with size 4, but that group has size 2". Each kd strategy
# gets its own key range instead.
_KEY_STRIDE = 100_000
_next_key_base = itertools.count(1)


class MirroredStrategy(_KerasCompatibleReduce, tf.distribute.MirroredStrategy):
    """`tf.distribute.MirroredStrategy` that is correct with Keras 3.

    Synchronous data parallelism over the devices of one machine. Accepts
    the arguments of `tf.distribute.MirroredStrategy`, plus `compression`.

    Args:
        devices: list of str or None. Devices to replicate over; defaults
            to all GPUs, else the CPU.
        cross_device_ops: `tf.distribute.CrossDeviceOps` or None. Defaults
            to TF's choice: collective all-reduce (NCCL on GPUs, ring on
            CPUs).
        compression: str or None. `"fp16"` or `"bf16"` all-reduces
            gradients in 16 bits (see `kerasdist.compression`). Defaults to
            None (no compression).

    Example:

    ```python
    kd.virtual_cpus(2)
    strategy = kd.MirroredStrategy()
    with strategy.scope():
        model = build_model()
        model.compile(...)
    model.fit(dataset)
    ```
    """

    def __init__(self, devices=None, cross_device_ops=None, *,
                 compression=None):
        compression = compression_lib.check_compression(compression)
        _internals.set_collective_key_base(
            self, next(_next_key_base) * _KEY_STRIDE
        )
        super().__init__(devices=devices, cross_device_ops=cross_device_ops)
        _merge_sparse_gradients(self)
        _internals.transform_seed_draws(_per_replica_seed)
        if compression is not None:
            compression_lib.enable(self, compression)


class MultiWorkerMirroredStrategy(
    _KerasCompatibleReduce, tf.distribute.MultiWorkerMirroredStrategy
):
    """`tf.distribute.MultiWorkerMirroredStrategy` correct with Keras 3.

    Synchronous data parallelism over several machines (read from
    `TF_CONFIG`), using collective all-reduce. Accepts exactly the arguments
    of `tf.distribute.MultiWorkerMirroredStrategy`; `TF_CONFIG` is validated
    first so a malformed one is a clear error rather than a hang.

    TensorFlow supports one multi-worker strategy per process. Creating it
    again with the same cluster and options (a script's `run_training()`
    called twice) returns the existing one; anything else raises
    `MultiWorkerStrategyConflictError`.

    Args:
        cluster_resolver: `tf.distribute.cluster_resolver.ClusterResolver`
            or None. Defaults to reading `TF_CONFIG`.
        communication_options: `tf.distribute.experimental.
            CommunicationOptions` or None. All-reduce implementation, bytes
            per pack and timeout. Defaults to TF's defaults.
        compression: str or None. `"fp16"` or `"bf16"` all-reduces
            gradients in 16 bits (see `kerasdist.compression`). Defaults to
            None (no compression).

    Raises:
        MultiWorkerStrategyConflictError: if the process already has one
            with another cluster or options.
        CollectivesAfterStartupError: if TensorFlow already ran an
            operation in this process.

    Example:

    ```python
    # On each worker, with TF_CONFIG set (kerasdist-run does it):
    strategy = kd.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model()
        model.compile(...)
    model.fit(kd.data.distribute(ds, strategy, global_batch_size=256))
    ```
    """

    def __new__(cls, cluster_resolver=None, communication_options=None,
                *, compression=None):
        # TensorFlow supports one multi-worker collective context per
        # process: a second strategy re-enables collective ops and aborts
        # ("Delete called on non-empty BufRendezvous"). The keras.io guide
        # calls `run_training()`, which creates the strategy, twice. Hand
        # back the process's strategy when nothing differs.
        existing = _PROCESS_MULTI_WORKER.get("strategy")
        if existing is None:
            return super().__new__(cls)
        compression = compression_lib.check_compression(compression)
        key = _multi_worker_key(cluster_resolver, communication_options,
                                compression)
        if key != existing._kd_key:  # noqa: SLF001 (our own attribute)
            raise MultiWorkerStrategyConflictError(
                "This process already has a kd.MultiWorkerMirroredStrategy "
                f"for {_describe_key(existing._kd_key)}, and TensorFlow "  # noqa: SLF001
                "supports one multi-worker strategy per process. Received "
                f"{_describe_key(key)}. Reuse the first strategy (create it "
                "once, at program start, and pass it around), or train the "
                "other cluster or options in a new process (e.g. a second "
                "`kerasdist-run`)."
            )
        if not isinstance(existing, cls):
            raise MultiWorkerStrategyConflictError(
                f"This process already has a {type(existing).__name__}; "
                f"a {cls.__name__} cannot be created next to it. Reuse the "
                "first strategy."
            )
        if cluster_lib.from_env().is_chief:
            logging.info("kerasdist: reusing this process's "
                         "MultiWorkerMirroredStrategy (same cluster and "
                         "options)")
        return existing

    def __init__(self, cluster_resolver=None, communication_options=None,
                 *, compression=None):
        if getattr(self, "_kd_key", None) is not None:
            return  # The process's strategy, handed back by __new__.
        compression = compression_lib.check_compression(compression)
        if cluster_resolver is None:
            cluster_lib.resolve()  # Readable error; exports SLURM/K8s.
        key = _multi_worker_key(cluster_resolver, communication_options,
                                compression)
        try:
            super().__init__(
                cluster_resolver=cluster_resolver,
                communication_options=communication_options,
            )
        except RuntimeError as e:
            if "must be configured at program startup" not in str(e):
                raise
            raise CollectivesAfterStartupError(
                "kd.MultiWorkerMirroredStrategy must be created before "
                "TensorFlow runs any operation in this process (TensorFlow: "
                f"{e}). Move `strategy = kd.get_strategy(\"multi_worker\")`"
                " (or `kd.MultiWorkerMirroredStrategy()`) to the start of "
                "your program, right after the imports and "
                "`kd.virtual_cpus(...)`, before creating any tensor, "
                "dataset, model or layer, and create the model inside "
                "`strategy.scope()`."
            ) from e
        _merge_sparse_gradients(self)
        _internals.transform_seed_draws(_per_replica_seed)
        if compression is not None:
            compression_lib.enable(self, compression)
        self._kd_key = key
        _PROCESS_MULTI_WORKER["strategy"] = self
        # TF's multi-worker runtime has just installed its own SIGTERM
        # handler; record preemption signals for BackupAndRestore instead.
        from kerasdist.callbacks import _backup_preemption

        _backup_preemption.record_preemption_signals()


# The process's multi-worker strategy (TensorFlow supports one).
_PROCESS_MULTI_WORKER: dict[str, Any] = {}


class MultiWorkerStrategyConflictError(PermanentError, RuntimeError):
    """A second multi-worker strategy with another cluster in one process.

    TensorFlow configures collective ops once per process, so a process has
    at most one `MultiWorkerMirroredStrategy`. Creating it again with the
    same cluster and options returns the first one; anything else raises
    this error.

    Example:

    >>> issubclass(MultiWorkerStrategyConflictError, RuntimeError)
    True
    """


class CollectivesAfterStartupError(PermanentError, RuntimeError):
    """The multi-worker strategy was created after TensorFlow ran an op.

    TensorFlow raises "Collective ops must be configured at program
    startup"; this error says which line to move where.

    Example:

    >>> issubclass(CollectivesAfterStartupError, RuntimeError)
    True
    """


def _multi_worker_key(cluster_resolver, communication_options, compression):
    """What makes two multi-worker strategies the same: cluster, options."""
    resolver = cluster_resolver or (
        tf.distribute.cluster_resolver.TFConfigClusterResolver()
    )
    cluster = resolver.cluster_spec().as_dict()
    options = communication_options or (
        tf.distribute.experimental.CommunicationOptions()
    )
    return (
        tuple(sorted((k, tuple(v) if isinstance(v, list) else
                      tuple(sorted(v.items())))
                     for k, v in cluster.items())),
        resolver.task_type,
        resolver.task_id,
        getattr(options, "implementation", None),
        getattr(options, "bytes_per_pack", 0),
        getattr(options, "timeout_seconds", None),
        compression,
    )


def _describe_key(key) -> str:
    cluster, task_type, task_id, impl, pack, timeout, compression = key
    impl_name = getattr(impl, "name", impl)
    return (
        f"cluster={dict(cluster)}, task={task_type}:{task_id}, "
        f"communication={impl_name}, bytes_per_pack={pack}, "
        f"timeout_seconds={timeout}, compression={compression}"
    )


def _communication_options(
    communication: str, bytes_per_pack: int, timeout_seconds: float | None
):
    impl = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[communication]
    return tf.distribute.experimental.CommunicationOptions(
        bytes_per_pack=bytes_per_pack,
        timeout_seconds=timeout_seconds,
        implementation=impl,
    )


def _mirrored_cross_device_ops(communication: str):
    if communication == "auto":
        return None
    if communication == "nccl":
        if not devices_lib.gpus():
            raise ValueError(
                "Invalid value for argument `communication`. Received: "
                "communication='nccl', but NCCL needs GPUs and this host has "
                "none. Use communication='auto'."
            )
        return tf.distribute.NcclAllReduce()
    if communication == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce()
    return tf.distribute.ReductionToOneDevice()


def get_strategy(
    name: str = "auto",
    *,
    devices: list[str] | None = None,
    communication: str = "auto",
    bytes_per_pack: int = 0,
    timeout_seconds: float | None = None,
    compression: str | None = None,
) -> tf.distribute.Strategy:
    """Returns a distribution strategy chosen by name.

    Args:
        name: str. One of:
            - `"auto"` (default): `"multi_worker"` when `TF_CONFIG` names
              more than one training task, else `"mirrored"` over all GPUs
              when there are several, else `"one_device"`.
            - `"one_device"`: `tf.distribute.OneDeviceStrategy` on the first
              GPU, else the CPU (or `devices[0]`).
            - `"mirrored"`: `kd.MirroredStrategy` over `devices` (default:
              all GPUs, else all logical CPUs).
            - `"multi_worker"`: `kd.MultiWorkerMirroredStrategy` from
              `TF_CONFIG`.
        devices: list of str or None. Local devices for `"one_device"` and
            `"mirrored"`. Defaults to None (all GPUs, else all CPUs).
        communication: str. All-reduce implementation. For
            `"multi_worker"`: `"auto"`, `"ring"` or `"nccl"`. For
            `"mirrored"`: `"auto"` (collective all-reduce: NCCL on GPUs,
            ring on CPUs), `"nccl"` (`tf.distribute.NcclAllReduce`),
            `"hierarchical_copy"` or `"one_device"` (reduce on one device).
            Defaults to `"auto"`.
        bytes_per_pack: int. For `"multi_worker"`: pack gradients into
            chunks of this many bytes per all-reduce; 0 lets TF decide.
            Defaults to 0.
        timeout_seconds: float or None. For `"multi_worker"`: fail a
            collective that takes longer than this, so a lost peer is an
            error rather than a hang. Defaults to None (no timeout), or
            `KERASDIST_COLLECTIVE_TIMEOUT` if set.
        compression: str or None. For `"mirrored"` and `"multi_worker"`:
            `"fp16"` or `"bf16"` all-reduces gradients in 16 bits and casts
            them back (fp16 with per-tensor power-of-two scaling, see
            `kerasdist.compression`); ignored by `"one_device"` (nothing to
            all-reduce). Defaults to None (32-bit all-reduce).

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: on an unknown `name` or `communication`, a device that
            does not exist, `"multi_worker"` options that are invalid, or an
            unknown `compression`.
        kerasdist.cluster.TFConfigError: if `TF_CONFIG` is malformed.
        MultiWorkerStrategyConflictError: for `"multi_worker"` when this
            process already has a multi-worker strategy with another
            cluster or options (the same ones hand it back).
        CollectivesAfterStartupError: for `"multi_worker"` created after
            TensorFlow ran an operation in this process.

    Example:

    ```python
    strategy = kd.get_strategy("auto")
    with strategy.scope():
        model = build_model()
    ```
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(
            "Invalid value for argument `name`. "
            f"Received: name={name!r}. Expected one of {list(STRATEGY_NAMES)}."
        )
    bytes_per_pack = check_int(
        "bytes_per_pack", bytes_per_pack, 0, hint="0 lets TensorFlow decide."
    )
    compression = compression_lib.check_compression(compression)
    timeout_seconds = _timeout_seconds(timeout_seconds)
    task = cluster_lib.resolve()
    name = _resolve_auto(name, task, devices)
    if devices is not None:
        devices = devices_lib.check_devices(list(devices))
    if name == "multi_worker":
        strategy = _multi_worker_strategy(
            devices, communication, bytes_per_pack, timeout_seconds,
            compression,
        )
    elif name == "mirrored":
        strategy = _mirrored_strategy(devices, communication, compression)
    else:  # one_device
        device = (devices or devices_lib.local_devices())[0]
        strategy = tf.distribute.OneDeviceStrategy(device)
    if task.is_chief:
        logging.info(
            "kerasdist: %s with %d replica(s) in sync",
            type(strategy).__name__,
            strategy.num_replicas_in_sync,
        )
    return strategy


def _timeout_seconds(timeout_seconds: float | None) -> float | None:
    """The collective timeout: the argument, else the environment's."""
    if timeout_seconds is None:
        env = os.environ.get("KERASDIST_COLLECTIVE_TIMEOUT", "").strip()
        timeout_seconds = float(env) if env else None
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise ValueError(
            "Invalid value for argument `timeout_seconds`. Received: "
            f"timeout_seconds={timeout_seconds!r}. Expected a positive "
            "number of seconds, or None for no timeout."
        )
    return timeout_seconds


def _resolve_auto(name: str, task, devices: list[str] | None) -> str:
    """The strategy `"auto"` stands for here; other names unchanged."""
    if name != "auto":
        return name
    if task.is_multi_worker:
        return "multi_worker"
    if devices is not None:
        return "mirrored" if len(devices) > 1 else "one_device"
    return "mirrored" if len(devices_lib.gpus()) > 1 else "one_device"


def _multi_worker_strategy(
    devices, communication, bytes_per_pack, timeout_seconds, compression
) -> MultiWorkerMirroredStrategy:
    if communication not in _COMMUNICATIONS:
        raise ValueError(
            "Invalid value for argument `communication`. Received: "
            f"communication={communication!r}. Expected one of "
            f"{list(_COMMUNICATIONS)} for the 'multi_worker' strategy."
        )
    if devices is not None:
        raise ValueError(
            "Argument `devices` is not supported with name='multi_worker':"
            " each worker uses all its GPUs, else its CPU. Received: "
            f"devices={devices!r}."
        )
    return MultiWorkerMirroredStrategy(
        communication_options=_communication_options(
            communication, bytes_per_pack, timeout_seconds
        ),
        compression=compression,
    )


def _mirrored_strategy(devices, communication, compression) -> (
    MirroredStrategy
):
    if communication not in _MIRRORED_CROSS_DEVICE_OPS:
        raise ValueError(
            "Invalid value for argument `communication`. Received: "
            f"communication={communication!r}. Expected one of "
            f"{list(_MIRRORED_CROSS_DEVICE_OPS)} for the 'mirrored' "
            "strategy ('ring' is a multi-worker collective)."
        )
    return MirroredStrategy(
        devices=devices or devices_lib.local_devices(),
        cross_device_ops=_mirrored_cross_device_ops(communication),
        compression=compression,
    )


def scope_or_null(
    strategy: tf.distribute.Strategy | None,
) -> contextlib.AbstractContextManager:
    """`strategy.scope()`, or a do-nothing context when `strategy` is None.

    Lets one code path build a model with or without a strategy (as TF
    Model Garden's `distribute_utils.get_strategy_scope` does), e.g. when
    a pipeline-parallel model uses devices itself and no data parallelism.

    Args:
        strategy: `tf.distribute.Strategy` or None.

    Returns:
        A context manager: `strategy.scope()`, or
        `contextlib.nullcontext()` for None.

    Example:

    ```python
    import keras
    import kerasdist as kd

    strategy = None  # or kd.get_strategy("mirrored")
    with kd.scope_or_null(strategy):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    ```
    """
    if strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()

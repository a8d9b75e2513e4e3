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
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any

import tensorflow as tf
from absl import logging

from kerasdist import _internals
from kerasdist import cluster as cluster_lib
from kerasdist import compression as compression_lib
from kerasdist import data as data_lib
from kerasdist import devices as devices_lib

__all__ = [
    "MirroredStrategy",
    "MultiWorkerMirroredStrategy",
    "STRATEGY_NAMES",
    "get_strategy",
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

    def experimental_distribute_dataset(self, dataset, options=None):
        """Distributes `dataset`; under Keras, refuses uneven global batches.

        As `tf.distribute.Strategy.experimental_distribute_dataset`. When
        Keras's `fit`, `evaluate` or `predict` calls it with more than one
        replica, a global batch that would not split evenly over the
        replicas (`batch_size=3` on 2 replicas, or a last partial batch of
        1) is refused with `kerasdist.data.UnevenBatchError` before the
        first step: Keras's loss scaling is only exact for even splits, and
        across workers such a batch crashes TensorFlow's collectives. Custom
        loops that call this method themselves are not checked
        (`tf.nn.compute_average_loss(..., global_batch_size=...)` is exact
        for any split).

        Args:
            dataset: `tf.data.Dataset` of global batches.
            options: `tf.distribute.InputOptions` or None.

        Returns:
            A `tf.distribute.DistributedDataset`.

        Raises:
            kerasdist.data.UnevenBatchError: for NumPy/tensor inputs whose
                `batch_size` or last partial batch does not divide over the
                replicas. A `tf.data.Dataset` input whose batch size is
                only known when read raises `tf.errors.
                InvalidArgumentError` with the same advice when that batch
                is read.

        Example:

        ```python
        dist = strategy.experimental_distribute_dataset(ds.batch(64))
        ```
        """
        if (
            isinstance(dataset, tf.data.Dataset)
            and self.num_replicas_in_sync > 1
        ):
            caller = _internals.keras_data_adapter_calling()
            if caller is not None:
                dataset = _check_keras_input(self, dataset, caller[0])
        return super().experimental_distribute_dataset(dataset, options)


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
    exactly the arguments of `tf.distribute.MirroredStrategy`.

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
        self._collective_key_base = next(_next_key_base) * _KEY_STRIDE
        super().__init__(devices=devices, cross_device_ops=cross_device_ops)
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

    Args:
        cluster_resolver: `tf.distribute.cluster_resolver.ClusterResolver`
            or None. Defaults to reading `TF_CONFIG`.
        communication_options: `tf.distribute.experimental.
            CommunicationOptions` or None. All-reduce implementation, bytes
            per pack and timeout. Defaults to TF's defaults.
        compression: str or None. `"fp16"` or `"bf16"` all-reduces
            gradients in 16 bits (see `kerasdist.compression`). Defaults to
            None (no compression).

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

    def __init__(self, cluster_resolver=None, communication_options=None,
                 *, compression=None):
        compression = compression_lib.check_compression(compression)
        if cluster_resolver is None:
            cluster_lib.from_env()  # Raises a readable TFConfigError.
        super().__init__(
            cluster_resolver=cluster_resolver,
            communication_options=communication_options,
        )
        if compression is not None:
            compression_lib.enable(self, compression)


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
    if isinstance(bytes_per_pack, bool) or not isinstance(
        bytes_per_pack, int
    ) or bytes_per_pack < 0:
        raise ValueError(
            "Invalid value for argument `bytes_per_pack`. Received: "
            f"bytes_per_pack={bytes_per_pack!r}. Expected an integer >= 0 "
            "(0 lets TensorFlow decide)."
        )
    compression = compression_lib.check_compression(compression)
    if timeout_seconds is None:
        env = os.environ.get("KERASDIST_COLLECTIVE_TIMEOUT", "").strip()
        timeout_seconds = float(env) if env else None
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise ValueError(
            "Invalid value for argument `timeout_seconds`. Received: "
            f"timeout_seconds={timeout_seconds!r}. Expected a positive "
            "number of seconds, or None for no timeout."
        )
    task = cluster_lib.from_env()
    if name == "auto":
        if task.is_multi_worker:
            name = "multi_worker"
        elif devices is not None:
            name = "mirrored" if len(devices) > 1 else "one_device"
        else:
            name = "mirrored" if len(devices_lib.gpus()) > 1 else "one_device"
    if devices is not None:
        devices = devices_lib.check_devices(list(devices))

    if name == "multi_worker":
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
        strategy = MultiWorkerMirroredStrategy(
            communication_options=_communication_options(
                communication, bytes_per_pack, timeout_seconds
            ),
            compression=compression,
        )
    elif name == "mirrored":
        if communication not in _MIRRORED_CROSS_DEVICE_OPS:
            raise ValueError(
                "Invalid value for argument `communication`. Received: "
                f"communication={communication!r}. Expected one of "
                f"{list(_MIRRORED_CROSS_DEVICE_OPS)} for the 'mirrored' "
                "strategy ('ring' is a multi-worker collective)."
            )
        strategy = MirroredStrategy(
            devices=devices or devices_lib.local_devices(),
            cross_device_ops=_mirrored_cross_device_ops(communication),
            compression=compression,
        )
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


def scope_or_null(strategy: tf.distribute.Strategy | None):
    """`strategy.scope()`, or a do-nothing context when `strategy` is None.

    Args:
        strategy: a strategy or None.

    Returns:
        A context manager.

    Example:

    ```python
    with scope_or_null(None):
        model = build_model()
    ```
    """
    return strategy.scope() if strategy is not None else (
        contextlib.nullcontext()
    )

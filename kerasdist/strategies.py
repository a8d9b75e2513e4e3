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
from kerasdist import devices as devices_lib
from kerasdist._validate import check_int

__all__ = [
    "MirroredStrategy",
    "MultiWorkerMirroredStrategy",
    "STRATEGY_NAMES",
    "get_strategy",
    "scope_or_null",
]

STRATEGY_NAMES = ("auto", "one_device", "mirrored", "multi_worker")
_COMMUNICATIONS = ("auto", "ring", "nccl")
_MIRRORED_CROSS_DEVICE_OPS = ("auto", "nccl", "hierarchical_copy", "one_device")


def _is_single_value(value: Any) -> bool:
    return isinstance(value, (tf.distribute.DistributedValues, tf.Tensor,
                              tf.Variable)) or not tf.nest.is_nested(value)


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
        `axis=0` on a scalar reduces across replicas only.

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
        if axis is not None and _rank(value) == 0:
            # Upstream bug 2 (same reports): Keras asks for axis=0 on scalar
            # logs; the mean over replicas is axis=None.
            axis = None
        return parent.reduce(reduce_op, value, axis=axis)


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
            cluster_lib.resolve()  # Readable error; exports SLURM/K8s.
        super().__init__(
            cluster_resolver=cluster_resolver,
            communication_options=communication_options,
        )
        if compression is not None:
            compression_lib.enable(self, compression)
        # TF's multi-worker runtime has just installed its own SIGTERM
        # handler; record preemption signals for BackupAndRestore instead.
        from kerasdist.callbacks import _backup_preemption

        _backup_preemption.record_preemption_signals()


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

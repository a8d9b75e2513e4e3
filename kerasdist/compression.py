"""Gradient compression: all-reduce gradients in 16 bits, apply in 32.

`kd.get_strategy(..., compression="fp16")` (or the `compression=` argument
of `kd.MirroredStrategy` / `kd.MultiWorkerMirroredStrategy`) halves the bytes
every gradient all-reduce sends: each replica casts its float32 gradients to
float16 (or bfloat16), the collective runs in 16 bits, and the result is
cast back to float32 before the optimizer applies it.

Where it hooks in. Keras 3's TensorFlow optimizer all-reduces gradients with
`tf.distribute.get_replica_context().all_reduce(SUM, grads)`
(`keras/src/backend/tensorflow/optimizer.py`, `_all_reduce_sum_gradients`).
On CPUs, and on GPUs outside XLA, `ReplicaContext.all_reduce` enters the
cross-replica context with `merge_call` and calls
`strategy.extended.batch_reduce_to`, whose `_batch_reduce_to` hands the
per-replica values to the strategy's `CrossDeviceOps` (`CollectiveAllReduce`
for multi-worker, `ReductionToOneDevice`/NCCL for mirrored). kerasdist
overrides `_batch_reduce_to` on the strategy's `extended` object, so the
compression applies to the values Keras all-reduces from replica context
(gradients, and the statistics of `BatchNormalization(synchronized=True)`).
`strategy.reduce`, metric and log reductions and variable aggregation go
through `reduce_to` and are never compressed.

Loss scaling. float16 overflows above 65504 and loses values below ~6e-8.
Instead of one global loss scale with skipped steps, each tensor gets its
own power-of-two scale: a small float32 all-reduce first sums the
replicas' per-tensor max abs(g) (an upper bound of every partial sum the
collective forms), and each tensor is multiplied by the largest power of
two that keeps that bound under 32752 (half of float16's range, room for
rounding). Scaling by a power of two is exact, so unscaling loses nothing.
bfloat16 has float32's exponent range and needs no scaling.

Only dense float32/float64 per-replica tensors are compressed;
`tf.IndexedSlices` (sparse embedding gradients), integers and values that
already are 16-bit go through unchanged.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from kerasdist import _internals

__all__ = ["COMPRESSIONS", "check_compression", "enable", "get_compression"]

COMPRESSIONS = (None, "fp16", "bf16")
_WIRE_DTYPES = {"fp16": tf.float16, "bf16": tf.bfloat16}
# Half of float16's largest finite value (65504): the sum of rounded
# addends may exceed the bound by a few ulps.
_FP16_TARGET = 32752.0
_MAX_EXPONENT = 60.0


def check_compression(compression: Any) -> str | None:
    """Validates a `compression` argument.

    Args:
        compression: str or None. `"fp16"`, `"bf16"`, `"none"` or None.

    Returns:
        `"fp16"`, `"bf16"` or None.

    Raises:
        ValueError: for any other value.

    Example:

    >>> check_compression("fp16")
    'fp16'
    """
    if isinstance(compression, str) and compression.lower() in (
        "fp16", "bf16", "none"
    ):
        compression = compression.lower()
        return None if compression == "none" else compression
    if compression is None:
        return None
    raise ValueError(
        "Invalid value for argument `compression`. Received: "
        f"compression={compression!r}. Expected 'fp16', 'bf16' or None."
    )


def get_compression(strategy: tf.distribute.Strategy) -> str | None:
    """The gradient compression a strategy uses.

    Args:
        strategy: `tf.distribute.Strategy`.

    Returns:
        `"fp16"`, `"bf16"` or None (no compression).

    Example:

    >>> get_compression(tf.distribute.get_strategy()) is None
    True
    """
    return getattr(type(strategy.extended), "_kd_compression", None)


def enable(strategy: tf.distribute.Strategy, compression: str | None) -> None:
    """Makes `strategy` all-reduce gradients in 16 bits.

    Used by `kd.MirroredStrategy(compression=...)`,
    `kd.MultiWorkerMirroredStrategy(compression=...)` and
    `kd.get_strategy(..., compression=...)`; call it directly only for a
    strategy built elsewhere. It must be called before the model is built or
    trained: functions already traced keep their 32-bit all-reduce.

    Args:
        strategy: `tf.distribute.MirroredStrategy` or
            `tf.distribute.MultiWorkerMirroredStrategy` (or a subclass).
        compression: str or None. `"fp16"`, `"bf16"`, or None to turn
            compression off.

    Raises:
        ValueError: on an unknown `compression`, or a strategy whose
            all-reduce this module cannot hook.

    Example:

    ```python
    strategy = kd.MultiWorkerMirroredStrategy()
    kd.compression.enable(strategy, "fp16")
    ```
    """
    compression = check_compression(compression)
    extended = strategy.extended
    base = type(extended)
    base = getattr(base, "_kd_compressed_base", None) or base
    if compression is None:
        extended.__class__ = base
        return
    if not hasattr(base, "_batch_reduce_to") or not isinstance(
        strategy,
        (tf.distribute.MirroredStrategy,
         tf.distribute.MultiWorkerMirroredStrategy),
    ):
        raise ValueError(
            "Gradient compression needs a MirroredStrategy or "
            "MultiWorkerMirroredStrategy. Received: "
            f"strategy={type(strategy).__name__}."
        )
    # A per-instance subclass of the strategy's `extended` class (isinstance
    # checks elsewhere in tf.distribute keep working); it records the
    # compression, so nothing is set on the instance.
    extended.__class__ = type(
        f"Compressed{base.__name__}",
        (_CompressedBatchReduce, base),
        {"_kd_compressed_base": base, "_kd_compression": compression},
    )


class _CompressedBatchReduce:
    """Mixin for `StrategyExtended`: 16-bit `_batch_reduce_to`."""

    _kd_compression: str | None = None

    def _batch_reduce_to(self, reduce_op, value_destination_pairs, options):
        return batch_reduce(
            super()._batch_reduce_to,
            self._kd_compression,
            reduce_op,
            list(value_destination_pairs),
            options,
        )


def _components(value: Any) -> tuple:
    # With one replica per worker (multi-worker on CPUs), `merge_call` hands
    # over plain tensors rather than `PerReplica` values.
    if _internals.is_per_replica(value):
        return tuple(value.values)
    return (value,)


def _compressible(value: Any) -> bool:
    if not (_internals.is_per_replica(value) or isinstance(value, tf.Tensor)):
        return False
    return all(
        isinstance(c, tf.Tensor)
        and not isinstance(c, tf.IndexedSlices)
        and c.dtype in (tf.float32, tf.float64)
        for c in _components(value)
    )


def _pow2_scales(bound: tf.Tensor) -> tf.Tensor:
    """Largest power of two keeping `bound * scale` under the target."""
    safe = tf.where(bound > 0, bound, tf.ones_like(bound))
    exponent = tf.clip_by_value(
        tf.floor(tf.math.log(_FP16_TARGET / safe) / tf.math.log(2.0)),
        -_MAX_EXPONENT,
        _MAX_EXPONENT,
    )
    ok = tf.math.is_finite(bound) & (bound > 0)
    return tf.where(ok, tf.pow(2.0, exponent), tf.ones_like(bound))


def batch_reduce(reduce, compression, reduce_op, pairs, options):
    """Compressed `batch_reduce_to` around an uncompressed `reduce`.

    Args:
        reduce: callable `(reduce_op, pairs, options) -> list`: the
            strategy's own `_batch_reduce_to`.
        compression: `"fp16"`, `"bf16"` or None.
        reduce_op: `tf.distribute.ReduceOp`.
        pairs: list of `(value, destinations)`.
        options: `tf.distribute.experimental.CommunicationOptions`.

    Returns:
        list of reduced values, as `reduce` returns them, in the input dtype.
    """
    index = [i for i, (v, _) in enumerate(pairs) if _compressible(v)]
    if compression is None or not index:
        return reduce(reduce_op, pairs, options)
    wire = _WIRE_DTYPES[compression]
    first = pairs[index[0]][0]
    devices = [c.device for c in _components(first)]
    same_devices = all(
        [c.device for c in _components(pairs[i][0])] == devices
        for i in index
    )
    scales = None  # per replica: a vector with one scale per tensor
    if compression == "fp16" and same_devices:
        bounds = []
        for j, device in enumerate(devices):
            with tf.device(device):
                bounds.append(tf.stack([
                    tf.cast(
                        tf.reduce_max(tf.abs(_components(pairs[i][0])[j])),
                        tf.float32,
                    )
                    for i in index
                ]))
        bounds = _internals.make_per_replica(bounds)
        summed = reduce(
            tf.distribute.ReduceOp.SUM, [(bounds, bounds)], options
        )[0]
        scales = {}
        for c in getattr(summed, "values", (summed,)):
            with tf.device(c.device):
                scales[c.device] = _pow2_scales(c)
    elif compression == "fp16":
        # Mixed placements (not produced by Keras): fall back to 32 bits.
        return reduce(reduce_op, pairs, options)

    new_pairs = list(pairs)
    for k, i in enumerate(index):
        value, destination = pairs[i]
        parts = []
        for c in _components(value):
            with tf.device(c.device):
                if scales is not None:
                    c = c * tf.cast(scales[c.device][k], c.dtype)
                parts.append(tf.cast(c, wire))
        packed = _internals.make_per_replica(parts)
        new_pairs[i] = (packed, packed if destination is value else
                        destination)
    reduced = reduce(reduce_op, new_pairs, options)

    for k, i in enumerate(index):
        dtype = _components(pairs[i][0])[0].dtype
        result = reduced[i]
        parts = []
        for c in getattr(result, "values", (result,)):
            with tf.device(c.device):
                c = tf.cast(c, dtype)
                if scales is not None:
                    scale = scales.get(c.device)
                    if scale is None:
                        scale = next(iter(scales.values()))
                    c = c / tf.cast(scale[k], dtype)
                parts.append(c)
        if isinstance(result, tf.distribute.DistributedValues):
            reduced[i] = _internals.make_mirrored(tuple(parts))
        else:
            reduced[i] = parts[0]
    return reduced

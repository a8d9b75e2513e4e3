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

int8 (`kd.callbacks.LocalSGD(compression="int8")` only). One byte per
value on the wire, with error feedback: what a replica's rounding lost is
added to what it sends next time (Seide et al. 2014; Karimireddy et al.
2019), so nothing is lost for good, only delayed. TF's collectives sum
float16/32/64, bfloat16 and int32/int64, never int8, and an int8 sum of N
replicas would overflow. So each replica rounds a value to an integer in
[-L, L] with L = floor(127 / N) (`int8_levels`) on a scale shared by all
replicas (the largest max abs over replicas, exchanged by a small
all-gather), and packs four such integers into one int32 as base-256
digits (`pack_int8`). The int32 all-reduce SUM then adds the digits
exactly: a digit's sum stays in [-127, 127], so no carry is lost, and the
packed sum stays inside int32 (127 * (1 + 256 + 256**2 + 256**3) <
2**31). `unpack_int8` reads the summed digits back. Error feedback needs a
residual per replica and per variable, which the gradient path of a
strategy does not keep: a strategy's `compression=` takes fp16/bf16 only.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from kerasdist import _internals

__all__ = ["COMPRESSIONS", "check_compression", "enable", "get_compression"]

COMPRESSIONS = (None, "fp16", "bf16", "int8")
_WIRE_DTYPES = {"fp16": tf.float16, "bf16": tf.bfloat16}
# Half of float16's largest finite value (65504): the sum of rounded
# addends may exceed the bound by a few ulps.
_FP16_TARGET = 32752.0
_MAX_EXPONENT = 60.0


def check_compression(
    compression: Any, *, error_feedback: bool = False
) -> str | None:
    """Validates a `compression` argument.

    Args:
        compression: str or None. `"fp16"`, `"bf16"`, `"none"` or None;
            also `"int8"` where `error_feedback` is True.
        error_feedback: bool. Whether the caller keeps per-replica
            residuals (`kd.callbacks.LocalSGD` does), which int8 needs.
            Defaults to False.

    Returns:
        `"fp16"`, `"bf16"`, `"int8"` or None.

    Raises:
        ValueError: for any other value, or int8 without error feedback.

    Example:

    >>> check_compression("fp16")
    'fp16'
    """
    if isinstance(compression, str) and compression.lower() in (
        "fp16", "bf16", "none", "int8"
    ):
        compression = compression.lower()
        if compression == "int8" and not error_feedback:
            raise ValueError(
                "Invalid value for argument `compression`. Received: "
                "compression='int8'. int8 needs error feedback (a residual "
                "per replica), which only "
                "kd.callbacks.LocalSGD(compression='int8') keeps. Expected "
                "'fp16', 'bf16' or None here."
            )
        return None if compression == "none" else compression
    if compression is None:
        return None
    expected = "'fp16', 'bf16', 'int8'" if error_feedback else "'fp16', 'bf16'"
    raise ValueError(
        "Invalid value for argument `compression`. Received: "
        f"compression={compression!r}. Expected {expected} or None."
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
        scales = _fp16_scales(reduce, pairs, index, devices, options)
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
        reduced[i] = _unpack(reduced[i], dtype, scales, k)
    return reduced


def _fp16_scales(reduce, pairs, index, devices, options) -> dict:
    """Per device, a power-of-two scale for each compressed tensor.

    Each replica's largest magnitude per tensor is summed over replicas
    (one small all-reduce), so every replica scales by the same factor.
    """
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
    summed = reduce(tf.distribute.ReduceOp.SUM, [(bounds, bounds)], options)[0]
    scales = {}
    for c in getattr(summed, "values", (summed,)):
        with tf.device(c.device):
            scales[c.device] = _pow2_scales(c)
    return scales


def _unpack(result, dtype, scales, k):
    """A reduced wire-dtype value back in `dtype`, unscaled (tensor k)."""
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
        return _internals.make_mirrored(tuple(parts))
    return parts[0]


def int8_levels(num_replicas: int) -> int:
    """L: each replica sends integers in [-L, L], L = floor(127 / N).

    The sum of `num_replicas` such integers stays within a signed byte.

    Args:
        num_replicas: int. Replicas taking part in the all-reduce (<= 127).

    Returns:
        int, at least 1.

    Raises:
        ValueError: above 127 replicas (L would be 0).

    Example:

    >>> int8_levels(4)
    31
    """
    if not 1 <= num_replicas <= 127:
        raise ValueError(
            "int8 compression supports 1 to 127 replicas. Received: "
            f"num_replicas={num_replicas}. Use compression='fp16' or "
            "'bf16' with more replicas."
        )
    return 127 // num_replicas


def quantize_int8(
    value: tf.Tensor, scale: tf.Tensor, levels: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Rounds `value / scale` to integers in [-levels, levels].

    Args:
        value: float tensor, the value plus the carried residual.
        scale: float scalar, shared by all replicas (0: send zeros).
        levels: int, from `int8_levels`.

    Returns:
        (int32 tensor q, float residual `value - q * scale`): the residual
        is what error feedback adds to the next value.

    Example:

    >>> q, r = quantize_int8(tf.constant([0.26, -1.0]), 1 / 31, 31)
    >>> q.numpy().tolist()
    [8, -31]
    """
    safe = tf.where(scale > 0, scale, tf.ones_like(scale))
    q = tf.clip_by_value(tf.round(value / safe), -levels, levels)
    q = tf.where(scale > 0, q, tf.zeros_like(q))
    residual = value - q * scale
    return tf.cast(q, tf.int32), residual


def pack_int8(q: tf.Tensor) -> tf.Tensor:
    """Packs integers in [-127, 127] four to an int32 (base-256 digits).

    Args:
        q: int32 tensor of any shape; flattened and padded with zeros to a
            multiple of 4.

    Returns:
        int32 vector of ceil(size / 4) elements: one byte per value.

    Example:

    >>> pack_int8(tf.constant([1, -1, 0, 2])).numpy().tolist()
    [33554177]
    """
    flat = tf.reshape(q, [-1])
    pad = (-tf.size(flat)) % 4
    digits = tf.reshape(tf.pad(flat, [[0, pad]]), [-1, 4])
    weights = tf.constant([1, 256, 256**2, 256**3], tf.int32)
    return tf.reduce_sum(digits * weights, axis=1)


def unpack_int8(packed: tf.Tensor, shape: Any) -> tf.Tensor:
    """Reads back base-256 digits in [-127, 127] from `pack_int8` sums.

    Args:
        packed: int32 vector: `pack_int8` values, or their sum over
            replicas (each digit's sum within [-127, 127]).
        shape: the shape of the values packed.

    Returns:
        int32 tensor of `shape`.

    Example:

    >>> unpack_int8(tf.constant([33554177]), [4]).numpy().tolist()
    [1, -1, 0, 2]
    """
    digits = []
    rest = packed
    for _ in range(4):
        digit = tf.math.floormod(rest + 128, 256) - 128
        digits.append(digit)
        rest = (rest - digit) // 256
    flat = tf.reshape(tf.stack(digits, axis=1), [-1])
    size = tf.reduce_prod(shape)
    return tf.reshape(flat[:size], shape)

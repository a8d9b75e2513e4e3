"""Activation transfers between pipeline stages: the link and its cost.

`kd.placement.plan(..., cost="time")` balances each stage's measured
forward time plus the time to move the activations it receives from
earlier stages and sends to later ones, at a link bandwidth given
(`bandwidth=`) or measured here (`measure_bandwidth`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from kerasdist.placement import stage_devices

__all__ = ["measure_bandwidth"]


def measure_bandwidth(
    source: str, target: str, nbytes: int = 4 << 20, repeats: int = 5
) -> float:
    """Measures the bytes per second a tensor moves from one device to another.

    Copies a float32 tensor of `nbytes` created on `source` to `target`
    (reduced there to a scalar, so only the copy crosses the link) and
    returns `nbytes` / the median time of `repeats` copies after one
    warm-up. Between the devices of two workers of a joined cluster
    (`kd.placement.join_cluster()`) this is the gRPC link the pipeline's
    activations take; between local devices, a memory copy.

    Args:
        source: str. Device the tensor starts on.
        target: str. Device it is copied to.
        nbytes: int. Size of the tensor. Default 4 MiB.
        repeats: int. Timed copies. Default 5.

    Returns:
        float, bytes per second.

    Raises:
        ValueError: for a device that does not exist.

    Example:

    ```python
    devices = kd.placement.join_cluster()
    print(kd.placement.measure_bandwidth(devices[1], devices[2]) / 2**20,
          "MiB/s")
    ```
    """
    source, target = stage_devices.check_devices([source, target])
    with tf.device(source):
        x = tf.random.uniform([max(1, int(nbytes) // 4)])
    samples = []
    for _ in range(int(repeats) + 1):
        with tf.device(source):
            y = tf.identity(x) + 0.0  # a fresh tensor: no cached copy
        np.asarray(y[0])  # wait for it before the clock starts
        start = time.perf_counter()
        with tf.device(target):
            total = tf.reduce_sum(tf.identity(y))
        np.asarray(total)
        samples.append(time.perf_counter() - start)
    return int(nbytes) / max(statistics.median(samples[1:]), 1e-9)


def transfer_cost(graph, batch_size: int, bandwidth: float) -> Callable:
    """`extra(i, j)`: seconds per batch a stage of operations [i, j) moves.

    The bytes it receives (tensors produced before i, used in [i, j); not
    the model's inputs) plus the bytes it sends (produced in [i, j), used
    at j or later), for `batch_size` examples, over `bandwidth`.
    """
    index = {id(op): k for k, op in enumerate(graph.operations)}
    producer = {}
    for node in graph.nodes:
        for t in node.outputs:
            producer[id(t)] = index[id(node.operation)]
    users = {}
    for node in graph.nodes:
        for t in node.input_tensors:
            if id(t) in producer:
                users.setdefault(id(t), []).append(index[id(node.operation)])
    tensors = [
        (producer[t], sorted(set(us)), example_bytes(graph.tensors[t]))
        for t, us in users.items()
    ]
    scale = batch_size / bandwidth

    def extra(i: int, j: int) -> float:
        moved = 0
        for p, us, size in tensors:
            if p < i and any(i <= u < j for u in us):
                moved += size
            elif i <= p < j and us[-1] >= j:
                moved += size
        return moved * scale

    return extra


def example_bytes(tensor) -> int:
    """Bytes of one example of a symbolic tensor (unknown dims count 1)."""
    elements = 1
    for d in tensor.shape[1:]:
        elements *= 1 if d is None else d
    return elements * tf.as_dtype(tensor.dtype).size

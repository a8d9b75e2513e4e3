"""Dense weight gradients computed once per batch, not per micro-batch.

A pipeline stage's backward pass on a micro-batch has two parts (as in
zero-bubble pipelines): **B**, the gradients the previous stage waits on
(with respect to the stage's inputs), and **W**, the gradients of the
stage's own weights. For a `Dense` layer z = x·K + b, y = act(z), W is
dK = xᵀ·dz and db = Σ dz: per micro-batch, that is M separate small
products and M running sums of a kernel-sized gradient (memory-bound), the
cost that grows with M. Here the backward of each micro-batch computes
only B and dz (the gradient with respect to z, through the activation, by
the same tape); once every micro-batch's dz exists, dK = concat(x_i)ᵀ ·
concat(dz_i) and db = Σ_rows concat(dz_i) are computed in one product per
layer, after the stage's last B, where they fill the pipeline's drain
bubble. Summing rows in one product instead of M partial sums is the same
math (float rounding aside) as the unsplit model's gradient.

Only plain `keras.layers.Dense` layers take this path (not subclasses,
LoRA or quantized ones, nor a layer whose compute dtype differs from its
variables' or whose weights another layer uses); every other layer, and a
Dense layer whose input (once cast as `Layer.__call__` casts it) is not a
dense float tensor of the kernel's dtype, and every layer of a model that
may make Keras masks (`_may_make_masks`), keep the per-micro-batch
gradient. The price:
each such layer's inputs and dz of every micro-batch stay alive until W
(one activation per layer and micro-batch).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import keras
import tensorflow as tf

from kerasdist.placement import graph as graph_lib

__all__ = ["batched_nodes", "run_nodes", "weight_gradients"]


def batched_nodes(graph: graph_lib.LayerGraph, nodes: Sequence) -> dict:
    """The nodes of `nodes` whose weight gradients can be batched.

    Args:
        graph: LayerGraph. The whole model's graph (to see weight sharing).
        nodes: sequence of Node. One stage's nodes.

    Returns:
        dict mapping `id(node)` to its Dense layer, for plain float Dense
        layers with trainable weights that one node of the graph calls
        with one positional argument, and whose variables no other layer
        holds.
    """
    if any(_may_make_masks(layer) for layer in graph.layers):
        return {}
    uses = {}
    for node in graph.nodes:
        uses[id(node.operation)] = uses.get(id(node.operation), 0) + 1
    holders = {}
    for layer in graph.layers:
        for v in getattr(layer, "variables", []):
            holders[id(v)] = holders.get(id(v), 0) + 1
    out = {}
    for node in nodes:
        layer = node.operation
        if (
            _plain_dense(layer)
            and uses[id(layer)] == 1
            and len(node.arguments.args) == 1
            and not node.arguments.kwargs
            and all(holders.get(id(v), 0) == 1 for v in layer.variables)
        ):
            out[id(node)] = layer
    return out


def _plain_dense(layer) -> bool:
    """A `keras.layers.Dense` whose call is exactly matmul, add, act."""
    # pylint: disable=unidiomatic-typecheck
    if type(layer) is not keras.layers.Dense:  # subclasses may differ
        return False
    if layer.lora_enabled or layer.quantization_mode is not None:
        return False
    policy = layer.dtype_policy
    if policy.compute_dtype != policy.variable_dtype:
        return False  # mixed precision: the kernel is cast in call()
    weights = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
    return all(w.trainable for w in weights)


def run_nodes(nodes, values, training, batched, tape) -> None:
    """`graph.run_nodes`, with the batched Dense layers run by hand.

    For a node in `batched` whose input qualifies (a dense float tensor
    of the kernel's dtype, once cast as `Layer.__call__` casts it),
    computes z = x·K + b with K and b cut from the tape (so no
    per-micro-batch weight gradient is recorded), watches z on `tape`,
    and stores x and z in `values` under `("x", id(node))` and
    `("z", id(node))`; the output is act(z), as `Dense.call` computes
    it. Other nodes run as usual.

    Args:
        nodes: sequence of Node, in execution order.
        values: dict of tensor id to value (see `graph.run_nodes`).
        training: bool or None.
        batched: dict from `batched_nodes`.
        tape: tf.GradientTape recording the stage.
    """
    for node in nodes:
        layer = batched.get(id(node))
        if layer is not None:
            (x,), _ = node.arguments.fill_in(values)
            if _is_dense_float(x):
                # As Layer.__call__ converts its inputs (autocast).
                x = layer.dtype_policy.convert_input(
                    x, layer.autocast, layer.input_dtype
                )
            if _takes(layer, x):
                values[id(node.outputs[0])] = _dense(
                    layer, x, id(node), values, tape
                )
                continue
        graph_lib.run_nodes([node], values, training)


def _is_dense_float(x) -> bool:
    return isinstance(x, tf.Tensor) and x.dtype.is_floating


def _takes(layer, x) -> bool:
    return _is_dense_float(x) and x.dtype == tf.as_dtype(layer.kernel.dtype)


def _may_make_masks(layer) -> bool:
    """Whether `layer` may start a Keras mask (which Dense passes on).

    The hand-run Dense would not pass a mask on, so a model with such a
    layer keeps the per-micro-batch path: Masking, Embedding with
    `mask_zero`, and layers from outside Keras that define `compute_mask`.
    """
    if isinstance(layer, keras.layers.Masking):
        return True
    if getattr(layer, "mask_zero", False):
        return True
    own = type(layer).compute_mask is not keras.layers.Layer.compute_mask
    return own and not type(layer).__module__.startswith("keras.")


def _dense(layer, x, key, values, tape):
    """Dense.call (keras/src/layers/core/dense.py) on cut weights."""
    z = keras.ops.matmul(x, tf.stop_gradient(layer.kernel.value))
    if layer.bias is not None:
        z = keras.ops.add(z, tf.stop_gradient(layer.bias.value))
    tape.watch(z)
    values["x", key] = x
    values["z", key] = z
    return z if layer.activation is None else layer.activation(z)


def weight_gradients(layer, xs: Sequence, dzs: Sequence) -> list:
    """dK (and db) of a Dense layer over every micro-batch at once.

    Args:
        layer: keras.layers.Dense.
        xs: list of tensors. The layer's input of each micro-batch.
        dzs: list of tensors. The gradient of each micro-batch's z.

    Returns:
        list of (variable, gradient): the kernel's, then the bias's.
    """
    n_in, units = layer.kernel.shape
    x = xs[0] if len(xs) == 1 else tf.concat(xs, axis=0)
    dz = dzs[0] if len(dzs) == 1 else tf.concat(dzs, axis=0)
    x = tf.reshape(x, [-1, n_in])
    dz = tf.reshape(dz, [-1, units])
    # The scope names the layer (tests read it from the graph).
    scope = "dense_weight_gradient_" + re.sub(r"[^\w.-]", "_", layer.name)
    with tf.name_scope(scope):
        grads = [(layer.kernel, tf.matmul(x, dz, transpose_a=True))]
        if layer.bias is not None:
            grads.append((layer.bias, tf.reduce_sum(dz, axis=0)))
    return grads

"""PipelineModel computes Dense weight gradients once over micro-batches.

The backward pass of each micro-batch computes only what the previous
stage needs and the gradient of each Dense layer's pre-activation; every
Dense layer's weight gradient is then one product over all micro-batches
(kerasdist/placement/weight_grads.py). Other layers keep the
per-micro-batch gradient. Either way training equals the unsplit model.
"""

import re

import keras
import numpy as np
import tensorflow as tf
from model_builders import CPUS

import kerasdist as kd

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def dense_model(name):
    """Dense layers of every supported kind, one on rank-3 inputs, with
    BatchNormalization and Dropout between them."""
    i = keras.Input((4, 8))
    h = keras.layers.Dense(16, activation="relu", name="rank3")(i)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(12, use_bias=False, name="linear_no_bias")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dense(12, activation="tanh", name="tanh")(h)
    h = keras.layers.Dropout(0.2, seed=1)(h)
    o = keras.layers.Dense(3, name="out")(h)
    return keras.Model(i, o, name=name)


class ScaledDense(keras.layers.Dense):
    """A Dense subclass: its call may differ, so it is not batched."""

    def call(self, inputs, training=None):
        return 0.5 * super().call(inputs)


def fallback_model(name):
    """Layers the batched path must leave alone, and one plain Dense."""
    i = keras.Input((4, 8))
    h = keras.layers.Flatten()(i)
    h = ScaledDense(12, activation="tanh", name="subclass")(h)
    lora = keras.layers.Dense(12, name="lora")
    h = lora(h)
    lora.enable_lora(2)
    h = keras.layers.EinsumDense("ab,bc->ac", (12,), name="einsum")(h)
    shared = keras.layers.Dense(12, activation="tanh", name="shared")
    h = shared(shared(h))
    o = keras.layers.Dense(3, name="out")(h)
    return keras.Model(i, o, name=name)


def data(n):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 4, 8)).astype("float32")
    return x, rng.integers(0, 3, n)


def pipeline(build, batched, ref):
    model = build("piped")
    model.set_weights(ref.get_weights())
    pipe = kd.placement.PipelineModel(model, CPUS[:2], num_microbatches=4)
    pipe._batch_weight_grads = batched  # noqa: SLF001 (the old path)
    pipe.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=1.0), loss=LOSS)
    return model, pipe


def weight_gradient_layers(pipe, x, y):
    """Names of the layers whose kernel gradient is one batched product.

    weight_grads.py builds that product under the name scope
    `dense_weight_gradient_<layer name>`.
    """
    fn = tf.function(lambda a, b: pipe.train_step((a, b)))
    graph = fn.get_concrete_function(tf.constant(x), tf.constant(y)).graph
    found = (
        re.search(r"dense_weight_gradient_([^/]+)/MatMul$", op.name)
        for op in graph.get_operations()
        if op.type == "MatMul"
    )
    return sorted(f.group(1) for f in found if f)


def train(build, *batched, fit_ref=True):
    """The unsplit model, then a (model, pipeline) per `batched` flag, all
    after the same fit (the unsplit model's only with `fit_ref`)."""
    ref = build("ref")
    pipes = [pipeline(build, b, ref) for b in batched]
    ref.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=1.0), loss=LOSS)
    x, y = data(32)
    for m in [ref] * fit_ref + [p for _, p in pipes]:
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return ref, pipes


def assert_same_weights(a, b):
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


def test_dense_stages_take_the_batched_path_with_the_same_gradients():
    """Batched and per-micro-batch weight gradients train alike (both
    with BatchNormalization statistics per micro-batch; tests/
    test_pipeline.py compares the batched path with the unsplit model)."""
    _, [(batched, pipe_b), (per_micro, pipe_m)] = train(
        dense_model, True, False, fit_ref=False
    )
    assert_same_weights(per_micro, batched)
    x, y = data(16)
    # One batched kernel-gradient product per Dense layer, none in the
    # per-micro-batch path.
    assert weight_gradient_layers(pipe_b, x, y) == [
        "linear_no_bias", "out", "rank3", "tanh"
    ]
    assert weight_gradient_layers(pipe_m, x, y) == []


def test_unsupported_layers_fall_back_to_per_microbatch_gradients():
    ref, [(batched, pipe_b)] = train(fallback_model, True)
    assert_same_weights(ref, batched)
    x, y = data(16)
    assert weight_gradient_layers(pipe_b, x, y) == ["out"], (
        "only the plain Dense 'out' should be batched: not the subclass, "
        "the LoRA layer, EinsumDense or the layer called twice"
    )


def test_a_model_that_makes_masks_keeps_the_per_microbatch_path():
    i = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(10, 8, mask_zero=True)(i)
    h = keras.layers.Dense(8, activation="relu", name="masked")(h)
    o = keras.layers.Dense(3, name="out")(keras.layers.LSTM(4)(h))
    pipe = kd.placement.PipelineModel(
        keras.Model(i, o), CPUS[:2], num_microbatches=2
    )
    pipe.compile(optimizer="sgd", loss=LOSS)
    x = np.array([[1, 2, 0, 0, 0, 0]] * 4, "int32")
    assert weight_gradient_layers(pipe, x, np.zeros(4, "int64")) == []


def test_mixed_precision_dense_is_not_batched():
    """mixed_float16 casts the float32 kernel in call(): not batched. A
    float16 layer's math is all float16, as in its per-micro-batch path;
    a float32 layer's float16 input is cast first, as Layer.__call__ does.
    """
    i = keras.Input((8,))
    h = keras.layers.Dense(12, "relu", dtype="mixed_float16", name="mixed")(i)
    h = keras.layers.Dense(12, "relu", dtype="float16", name="half")(h)
    o = keras.layers.Dense(3, dtype="float32", name="out")(h)
    pipe = kd.placement.PipelineModel(
        keras.Model(i, o), CPUS[:2], num_microbatches=2
    )
    pipe.compile(optimizer="sgd", loss=LOSS)
    x = np.zeros((4, 8), "float32")
    assert weight_gradient_layers(pipe, x, np.zeros(4, "int64")) == [
        "half", "out"
    ]

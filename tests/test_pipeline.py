"""Tests for kd.placement.PipelineModel: GPipe training equals unsplit."""

import keras
import model_builders
import numpy as np
import pytest
import tensorflow as tf
from model_builders import CPUS, data, sequential

import kerasdist as kd

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def skip_model(name="res"):
    """The residual model, with an L2 term in the loss."""
    return model_builders.skip_model(name, l2=0.01)


def optimizer(name):
    config = {"learning_rate": 0.05}
    if name == "adam":
        # A larger epsilon keeps Adam's step a smooth function of the
        # gradient: with the default 1e-7, a gradient near 0 turns float
        # rounding (which differs run to run) into a visible weight change.
        config["epsilon"] = 1e-3
    return keras.optimizers.get({"class_name": name, "config": config})


def pair(build, devices, opt, **kwargs):
    """An unsplit reference model and a pipeline with the same weights."""
    ref = build("ref")
    model = build("piped")
    model.set_weights(ref.get_weights())
    pipe = kd.placement.PipelineModel(model, devices, **kwargs)
    ref.compile(optimizer=optimizer(opt), loss=LOSS, metrics=["accuracy"])
    pipe.compile(optimizer=optimizer(opt), loss=LOSS, metrics=["accuracy"])
    return ref, model, pipe


def assert_same_weights(a, b):
    # Summing gradients over micro-batches changes float rounding.
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build, num_devices, m, opt, recompute",
    [
        (sequential, 2, 4, "sgd", False),
        (sequential, 4, 2, "adam", False),
        (skip_model, 2, 4, "adam", False),
        (skip_model, 4, 4, "sgd", True),
    ],
)
def test_pipelined_training_matches_unsplit(
    build, num_devices, m, opt, recompute
):
    ref, model, pipe = pair(
        build, CPUS[:num_devices], opt, num_microbatches=m, recompute=recompute
    )
    x, y = data(64)
    h_ref = ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    h = pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert h_ref.history["loss"][1] < h_ref.history["loss"][0]
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(
            h.history[key], h_ref.history[key], rtol=1e-5
        )
    assert_same_weights(ref, model)
    # evaluate and predict, with a batch m does not divide (7 examples).
    np.testing.assert_allclose(
        pipe.evaluate(x[:7], y[:7], verbose=0),
        ref.evaluate(x[:7], y[:7], verbose=0),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        pipe.predict(x[:7], batch_size=7, verbose=0),
        ref.predict(x[:7], batch_size=7, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_sample_weights_and_dataset():
    ref, model, pipe = pair(sequential, CPUS[:2], "adam", num_microbatches=4)
    x, y = data(32)
    w = np.linspace(0.1, 2.0, 32).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8)
    h_ref = ref.fit(ds, epochs=2, verbose=0)
    h = pipe.fit(ds, epochs=2, verbose=0)
    np.testing.assert_allclose(
        h.history["loss"], h_ref.history["loss"], rtol=1e-5
    )
    assert_same_weights(ref, model)


@pytest.mark.parametrize("recompute", [False, True])
def test_stages_overlap_in_the_traced_step(recompute):
    """Stage 1's forward on micro-batch 0 does not wait for stage 0's last.

    That independence is what lets TensorFlow's executor run the two
    devices at once (the GPipe diagonal). With recomputation, every
    stage's forward pass appears twice: once forward, once in backward.
    """
    _, _, pipe = pair(
        sequential, CPUS[:2], "sgd", num_microbatches=4, recompute=recompute
    )
    x, y = data(16)
    fn = tf.function(lambda a, b: pipe.train_step((a, b)))
    graph = fn.get_concrete_function(tf.constant(x), tf.constant(y)).graph
    forward = [
        op
        for op in graph.get_operations()
        if op.type == "MatMul" and "gradient" not in op.name.lower()
    ]
    on = {
        d: [op for op in forward if op.device.endswith(f"CPU:{d}")]
        for d in (0, 1)
    }
    runs = 2 if recompute else 1
    assert len(on[0]) == runs * 4 * len(pipe.plan.stages[0].layers)
    assert len(on[1]) == runs * 4 * len(pipe.plan.stages[1].layers)

    def ancestors(op):
        seen, todo = set(), [op]
        while todo:
            o = todo.pop()
            for t in list(o.inputs) + list(o.control_inputs):
                p = t.op if hasattr(t, "op") else t
                if p.name not in seen:
                    seen.add(p.name)
                    todo.append(p)
        return seen

    first_stage1 = on[1][0]  # creation order: stage 1, micro-batch 0
    independent = [op for op in on[0] if op.name not in ancestors(first_stage1)]
    assert independent, "stage 1 waits for every stage-0 micro-batch"


def test_save_and_load_weights(tmp_path):
    _, model, pipe = pair(skip_model, CPUS[:2], "adam", num_microbatches=2)
    x, y = data(16)
    pipe.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "pipe.weights.h5")
    pipe.save_weights(path)
    fresh = kd.placement.PipelineModel(
        skip_model("piped2"), CPUS[:2], num_microbatches=2
    )
    assert not np.allclose(
        fresh.predict(x, verbose=0), pipe.predict(x, verbose=0)
    )
    fresh.load_weights(path)
    np.testing.assert_allclose(
        fresh.predict(x, verbose=0), pipe.predict(x, verbose=0), rtol=1e-6
    )
    with pytest.raises(NotImplementedError, match="save the wrapped model"):
        pipe.get_config()


def test_batch_not_divisible_is_an_error():
    _, model, pipe = pair(sequential, CPUS[:2], "sgd", num_microbatches=4)
    x, y = data(24)
    before = model.get_weights()
    with pytest.raises(
        ValueError,
        match="batch_size=6, which num_microbatches=4 does not divide",
    ):
        pipe.fit(x, y, batch_size=6, verbose=0)
    with pytest.raises(
        ValueError,
        match=r"last training batch would hold "
        r"2 examples \(18 examples, batch_size=8\)",
    ):
        pipe.fit(x[:18], y[:18], batch_size=8, verbose=0)
    static = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        6, drop_remainder=True
    )
    with pytest.raises(
        ValueError, match="Batch size 6 is not divisible by num_microbatches=4"
    ):
        pipe.fit(static, verbose=0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # no step ran
    dynamic = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="not divisible by num_microbatches=4",
    ):
        pipe.fit(dynamic, verbose=0)


def test_bad_arguments():
    model = sequential("args")
    for bad in (0, "2", 1.5, True):
        with pytest.raises(
            ValueError,
            match=f"num_microbatches={bad!r}. Expected a positive integer",
        ):
            kd.placement.PipelineModel(model, CPUS[:2], num_microbatches=bad)
    with pytest.raises(ValueError, match="recompute='yes'"):
        kd.placement.PipelineModel(model, CPUS[:2], recompute="yes")
    with pytest.raises(ValueError, match="Device '/gpu:0' does not exist"):
        kd.placement.PipelineModel(model, ["/cpu:0", "/gpu:0"])
    i = keras.Input((4,))
    o = keras.layers.Dense(2, activity_regularizer="l2", name="act")(i)
    with pytest.raises(
        ValueError, match="Layer 'act' has an activity_regularizer"
    ):
        kd.placement.PipelineModel(keras.Model(i, o), CPUS[:2])

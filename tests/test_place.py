"""Tests for kd.placement.place: variables on devices, training unchanged."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from model_builders import CPUS, data, sequential, skip_model

import kerasdist as kd


def device_index(device):
    return tf.DeviceSpec.from_string(device).device_index


@pytest.mark.parametrize("num_devices", [2, 4])
def test_variables_land_on_planned_devices(num_devices):
    model = skip_model(f"res{num_devices}")
    devices = CPUS[:num_devices]
    plan = kd.placement.plan(model, num_devices, devices=devices)
    placed = kd.placement.place(model, devices, plan)
    seen = set()
    for layer in model.layers:
        for w in layer.weights:
            stage = plan.assignment[layer.name]
            assert device_index(w.value.device) == stage, (w.path, stage)
            seen.add(stage)
    assert seen == set(range(num_devices))
    # Same layers and weights, by name and by object.
    assert [lay.name for lay in placed.layers] == [
        lay.name for lay in model.layers
    ]
    assert placed.get_layer("skip") is model.get_layer("skip")
    assert {id(w) for w in placed.weights} == {id(w) for w in model.weights}
    # Optimizer slots are created next to their variables.
    placed.compile(optimizer="adam", loss="mse")
    x, _ = data(8)
    placed.fit(x, np.zeros((8, 3)), batch_size=8, verbose=0)
    slots = [
        v for v in placed.optimizer.variables if v.path.endswith("velocity")
    ]
    assert len(slots) == len(model.trainable_weights)
    for v in slots:
        layer_name = v.path.split("/")[-1].split("_")[0]
        assert device_index(v.value.device) == plan.assignment[layer_name]


@pytest.mark.parametrize(
    "build, optimizer",
    [
        (sequential, "sgd"),
        (sequential, "adam"),
        (skip_model, "sgd"),
        (skip_model, "adam"),
    ],
)
def test_placed_training_matches_unsplit(build, optimizer):
    ref = build("ref")
    model = build("split")
    model.set_weights(ref.get_weights())
    placed = kd.placement.place(model, CPUS[:2])
    x, y = data(64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for m in (ref, placed):
        m.compile(
            optimizer=keras.optimizers.get(
                {
                    "class_name": optimizer,
                    # Adam's epsilon 1e-3: see tests/test_pipeline.py.
                    "config": {"learning_rate": 0.05}
                    | ({"epsilon": 1e-3} if optimizer == "adam" else {}),
                }
            ),
            loss=loss,
            metrics=["accuracy"],
        )
    h_ref = ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    h = placed.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        h.history["loss"], h_ref.history["loss"], rtol=1e-5
    )
    for a, b in zip(ref.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert h_ref.history["loss"][1] < h_ref.history["loss"][0]
    np.testing.assert_allclose(
        placed.predict(x[:5], verbose=0),
        ref.predict(x[:5], verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_place_errors():
    model = sequential("bad")
    with pytest.raises(ValueError, match="Device '/cpu:9' does not exist"):
        kd.placement.place(model, ["/cpu:0", "/cpu:9"])
    plan = kd.placement.plan(model, 3, devices=CPUS[:3])
    with pytest.raises(
        ValueError,
        match=r"devices=\['/cpu:0', '/cpu:1'\] \(2 device\(s\)\) for a plan "
        "with 3 stages. Expected at least one device per stage",
    ):
        kd.placement.place(model, CPUS[:2], plan)
    with pytest.raises(ValueError, match="devices=None and plan=None"):
        kd.placement.place(model)
    with pytest.raises(ValueError, match="devices=\\[\\]"):
        kd.placement.place(model, [])
    other = kd.placement.plan(sequential("other"), 2, devices=CPUS[:2])
    with pytest.raises(ValueError, match="made for model 'other', not 'bad'"):
        kd.placement.place(model, CPUS[:2], other)
    with pytest.raises(ValueError, match="Expected a kerasdist.placement.Plan"):
        kd.placement.place(model, CPUS[:2], {"h0": "/cpu:0"})
    unplaced = dataclasses.replace(
        plan,
        stages=tuple(dataclasses.replace(s, device=None) for s in plan.stages),
    )
    with pytest.raises(ValueError, match="plan names no device"):
        kd.placement.place(model, None, unplaced)


@pytest.mark.parametrize("clip", [{}, {"clipnorm": 1.0}, {"clipvalue": 0.5}])
def test_optimizer_math_runs_on_each_variables_device(clip):
    # Keras's update step names no device: without kd's device scopes its
    # math would run on the calling task, which for stages on other
    # workers means every gradient and slot crossing the network.
    model = sequential("opt_devices")
    placed = kd.placement.place(model, CPUS[:2])
    placed.compile(optimizer=keras.optimizers.Adam(**clip), loss="mse")
    x, _ = data(8)

    @tf.function
    def step(x, y):
        return placed.train_step((x, y))

    graph = step.get_concrete_function(x, np.zeros((8, 3), "float32")).graph
    # Adam's sqrt(v) + epsilon, one per variable; ClipByValue/Norm ops too.
    math = [
        op for op in graph.get_operations()
        if op.type in ("Sqrt", "ClipByValue", "Maximum")
        and "adam" in op.name
    ]
    assert len(math) >= len(placed.trainable_variables)
    devices = {tf.DeviceSpec.from_string(op.device).device_index
               for op in math}
    assert devices == {0, 1}, sorted((op.name, op.device) for op in math)

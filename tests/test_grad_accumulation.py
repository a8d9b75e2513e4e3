"""Gradient accumulation over k steps == training with a k-times batch."""

import os

import keras
import numpy as np
import pytest

import kerasdist as kd
from kerasdist.testing import run_scenario

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = ["/cpu:0", "/cpu:1"]
K, BATCH, STEPS = 2, 16, 8  # 8 batches of 16 -> 4 updates of 32


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    return x, y


def _model(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _reference(make_optimizer):
    """One device, no accumulation, batch K * BATCH, same example order."""
    x, y = _data()
    model = _model(make_optimizer())
    model.fit(x, y, batch_size=K * BATCH, epochs=1, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
        lambda: keras.optimizers.Adam(0.01, clipnorm=None),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_accumulation_equals_larger_batch_mirrored(make_optimizer):
    x, y = _data()
    strategy = kd.MirroredStrategy(DEVICES)
    with strategy.scope():
        model = _model(kd.accumulate_gradients(make_optimizer(), K))
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    ref = _reference(make_optimizer)
    for got, want in zip(model.get_weights(), ref.get_weights(),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(model.optimizer.iterations.numpy()) == STEPS // K
    # Weights actually moved (the comparison is not of two untrained nets).
    untrained = _model(make_optimizer()).get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(
        model.get_weights(), untrained, strict=True)) > 1e-2


def test_keras_own_accumulation_fails_under_mirrored_strategy():
    """Why kd.accumulate_gradients exists (keras-team/keras#20582).

    If this starts passing without an error, Keras fixed it upstream and the
    kerasdist wrapper can defer to Keras.
    """
    x, y = _data()
    strategy = kd.MirroredStrategy(DEVICES)
    with strategy.scope():
        model = _model(keras.optimizers.SGD(
            0.05, gradient_accumulation_steps=K))
    with pytest.raises(RuntimeError, match="merge_call"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)


def test_without_strategy_defers_to_keras():
    x, y = _data()
    model = _model(kd.accumulate_gradients(
        keras.optimizers.SGD(0.05, momentum=0.9), K))
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    ref = _reference(lambda: keras.optimizers.SGD(0.05, momentum=0.9))
    for got, want in zip(model.get_weights(), ref.get_weights(),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Saved config is Keras's own option.
    config = model.optimizer.get_config()
    assert config["gradient_accumulation_steps"] == K
    assert type(keras.optimizers.SGD.from_config(config)) is (
        keras.optimizers.SGD)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="steps=1"):
        kd.accumulate_gradients(keras.optimizers.SGD(), 1)
    with pytest.raises(ValueError, match="use_ema"):
        kd.accumulate_gradients(keras.optimizers.SGD(use_ema=True), 2)
    built = keras.optimizers.SGD()
    built.build([keras.Variable(1.0)])
    with pytest.raises(ValueError, match="already built"):
        kd.accumulate_gradients(built, 2)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_accumulation_equals_larger_batch_two_workers(tmp_path):
    for acc in run_scenario(os.path.join(HERE, "toolkit_worker.py"),
                            "accumulation", tmp_path):
        # k=2 steps of global batch 16 over 2 workers == one step of 32,
        # SGD with momentum: same weights as one device, and as MWMS
        # without accumulation.
        assert acc["max_diff_vs_single_device"] < 1e-5
        assert acc["max_diff_vs_big_batch"] < 1e-5
        assert acc["max_update"] > 1e-2
        assert acc["iterations"] == 4

"""Mirrored training over 2 and 4 devices equals single-device training."""

import pytest
from dp_cases import CASES, assert_same, run

import kerasdist as kd


@pytest.fixture(scope="module")
def single_device():
    return {case: run(case) for case in CASES}


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_mirrored_matches_single_device(single_device, case, num_devices):
    strategy = kd.get_strategy(
        "mirrored", devices=[f"/cpu:{i}" for i in range(num_devices)])
    result = run(case, strategy)
    assert_same(result, single_device[case])


def test_one_device_strategy_matches_no_strategy(single_device):
    strategy = kd.get_strategy("one_device")
    assert_same(run("adam_dict", strategy), single_device["adam_dict"])


def _one_sgd_step(loss, strategy=None):
    import keras
    import numpy as np
    import tensorflow as tf

    x = np.arange(8, dtype="float32").reshape(8, 1) / 8
    y = np.ones((8, 1), "float32")
    with kd.scope_or_null(strategy):
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(
            1, kernel_initializer="zeros", bias_initializer="zeros")])
        model.compile(keras.optimizers.SGD(0.1), loss)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = (kd.data.distribute(ds, strategy, global_batch_size=8)
          if strategy else ds.batch(8))
    model.fit(ds, epochs=1, verbose=0)
    return model.get_weights()[1][0]  # the bias moved by -lr * dL/db


def test_per_example_custom_loss_matches_but_scalar_loss_is_unscaled():
    """Documents docs/guide/troubleshooting.md: Keras 3 scales only losses
    it reduces itself, so a loss function returning a scalar gets an
    N-times larger update with N replicas."""
    from keras import ops

    two = kd.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    per_example = lambda t, p: ops.mean(ops.square(t - p), axis=-1)
    scalar = lambda t, p: ops.mean(ops.square(t - p))
    assert _one_sgd_step(per_example, two) == pytest.approx(
        _one_sgd_step(per_example), rel=1e-6)
    ratio = _one_sgd_step(scalar, two) / _one_sgd_step(scalar)
    if ratio == pytest.approx(1.0, rel=1e-6):
        pytest.skip("Keras now scales scalar losses: update the "
                    "troubleshooting guide")
    assert ratio == pytest.approx(2.0, rel=1e-6)

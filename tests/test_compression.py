"""Gradient compression: 16-bit all-reduce that keeps the loss."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasdist as kd
from kerasdist._internals import collective_dtypes
from kerasdist.testing import run_scenario

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = ["/cpu:0", "/cpu:1"]


def _all_reduce(strategy, per_replica_values):
    """SUM all-reduce from replica context, as Keras's optimizer does it."""

    @tf.function
    def step():
        def fn():
            ctx = tf.distribute.get_replica_context()
            values = tf.gather(
                tf.constant(per_replica_values, tf.float32),
                ctx.replica_id_in_sync_group,
            )
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, [values])[0]

        return strategy.run(fn)

    out = strategy.experimental_local_results(step())
    return [np.asarray(v) for v in out], step


def test_fp16_all_reduce_runs_in_half_precision_and_scales_per_tensor():
    strategy = kd.get_strategy("mirrored", devices=DEVICES,
                               compression="fp16")
    # Replica 0 and 1. Column 0: the sum (80000) overflows float16 (max
    # 65504); column 1: values below float16's smallest subnormal (6e-8).
    values = [[40000.0, 3e-9, 1.5], [40000.0, 1e-9, 2.5]]
    for column in np.array(values).T:
        per_replica = [[v] for v in column]
        results, fn = _all_reduce(strategy, per_replica)
        for r in results:
            np.testing.assert_allclose(r, [column.sum()], rtol=2e-3)
    assert "float16" in collective_dtypes(fn)
    # A plain cast, for contrast, loses both.
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(40000.0) + np.float16(40000.0))
    assert np.float16(1e-9) == 0


def test_bf16_all_reduce():
    strategy = kd.get_strategy("mirrored", devices=DEVICES,
                               compression="bf16")
    results, fn = _all_reduce(strategy, [[1.0, 1e30], [2.0, 1e30]])
    np.testing.assert_allclose(results[0], [3.0, 2e30], rtol=1e-2)
    assert set(collective_dtypes(fn)) == {"bfloat16"}  # one op per device


def _train(compression):
    strategy = kd.get_strategy("mirrored", devices=DEVICES,
                               compression=compression)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1).astype("float32")
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ])
        model.compile(keras.optimizers.SGD(0.02, momentum=0.9), "mse")
    hist = model.fit(x, y, batch_size=32, epochs=3, verbose=0,
                     shuffle=False)
    return hist.history["loss"], model


def test_training_with_compression_keeps_the_loss_mirrored():
    loss32, _ = _train(None)
    for compression in ("fp16", "bf16"):
        loss16, model = _train(compression)
        # Stated tolerance: final loss within 2% (measured ~0.01%/0.1%).
        np.testing.assert_allclose(loss16[-1], loss32[-1], rtol=2e-2)
        assert loss16[-1] < loss16[0] / 3  # it trained
        assert kd.compression.get_compression(model.distribute_strategy) == (
            compression)


def test_invalid_compression_is_rejected_before_training():
    with pytest.raises(ValueError, match="compression='fp8'"):
        kd.get_strategy("mirrored", devices=DEVICES, compression="fp8")
    with pytest.raises(ValueError, match="compression='int8'"):
        kd.MirroredStrategy(DEVICES, compression="int8")
    with pytest.raises(ValueError, match="OneDeviceStrategy"):
        kd.compression.enable(tf.distribute.OneDeviceStrategy("/cpu:0"),
                              "fp16")


def test_compression_can_be_switched_off():
    strategy = kd.MirroredStrategy(DEVICES, compression="fp16")
    kd.compression.enable(strategy, None)
    assert kd.compression.get_compression(strategy) is None
    results, fn = _all_reduce(strategy, [[1e-9], [1e-9]])
    assert set(collective_dtypes(fn)) == {"float32"}
    np.testing.assert_allclose(results[0], [2e-9], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compression_keeps_the_loss_two_workers(tmp_path):
    results = run_scenario(os.path.join(HERE, "toolkit_worker.py"),
                           "compression", tmp_path)
    for c in results:
        # The gradient all-reduce runs in 16 bits (the other float32
        # collectives: fp16's per-tensor scale bounds, the loss/metrics).
        assert c["None"]["collective_dtypes"] == ["float32", "float32"]
        assert "float16" in c["fp16"]["collective_dtypes"]
        assert "bfloat16" in c["bf16"]["collective_dtypes"]
        for name in ("fp16", "bf16"):
            np.testing.assert_allclose(c[name]["loss"], c["None"]["loss"],
                                       rtol=2e-2)
    # Both workers saw the same training.
    assert results[0] == results[1]

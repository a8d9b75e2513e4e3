"""Gradient compression: 16-bit all-reduce that keeps the loss."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from collectives import collective_dtypes

import kerasdist as kd
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
    with pytest.raises(ValueError, match="compression='int8'.*LocalSGD"):
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


# ---------------------------------------------------------------------------
# int8 (LocalSGD's pseudo-gradients): packing and error feedback.


@pytest.mark.parametrize("replicas", [1, 2, 4, 7])
def test_int8_digit_sums_are_exact(replicas):
    levels = kd.compression.int8_levels(replicas)
    assert replicas * levels <= 127
    rng = np.random.default_rng(replicas)
    q = rng.integers(-levels, levels + 1, size=(replicas, 7, 5))
    q[:, 0, :] = levels  # the extremes: every replica at +L, then -L
    q[:, 1, :] = -levels
    packed = [kd.compression.pack_int8(tf.constant(r, tf.int32))
              for r in q]
    assert packed[0].shape == (9,)  # 35 values, 4 per int32
    summed = tf.add_n(packed)
    back = kd.compression.unpack_int8(summed, [7, 5]).numpy()
    np.testing.assert_array_equal(back, q.sum(axis=0))


def test_int8_error_feedback_carries_the_residual():
    levels = kd.compression.int8_levels(4)
    value = tf.constant([0.3, -0.77, 0.051, 1.0])
    scale = tf.constant(1.0 / levels)
    sent, residual, plain = 0.0, tf.zeros_like(value), 0.0
    for _ in range(50):
        q, residual = kd.compression.quantize_int8(
            value + residual, scale, levels)
        sent += tf.cast(q, tf.float32) * scale
        q0, _ = kd.compression.quantize_int8(value, scale, levels)
        plain += tf.cast(q0, tf.float32) * scale
    exact = 50 * value
    # With feedback, what was sent misses the exact sum by the one
    # residual still carried (at most half a step), however many rounds.
    np.testing.assert_allclose(sent + residual, exact, rtol=1e-5)
    assert np.max(np.abs(residual)) <= scale / 2 + 1e-6
    # Without it, every round's rounding error adds up.
    assert np.max(np.abs(plain - exact)) > 10 * scale


def test_int8_zero_scale_sends_zeros():
    q, residual = kd.compression.quantize_int8(
        tf.zeros([3]), tf.constant(0.0), 31)
    assert q.numpy().tolist() == [0, 0, 0]
    assert residual.numpy().tolist() == [0, 0, 0]


def test_int8_refuses_too_many_replicas():
    with pytest.raises(ValueError, match="num_replicas=200.*'fp16'"):
        kd.compression.int8_levels(200)

"""User code patterns on 2 virtual CPUs (kd.MirroredStrategy), in-process.

Each pattern must train as on one device, or fail before the first step
with a message that names the fix.
"""

import keras
import numpy as np
import patterns
import pytest
import tensorflow as tf
from keras import ops

import kerasdist as kd
from kerasdist import cluster


@pytest.fixture(scope="module")
def strategy():
    return kd.MirroredStrategy(devices=["/cpu:0", "/cpu:1"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(patterns.EXACT))
def test_pattern_matches_one_device(strategy, name):
    fn = patterns.EXACT[name]
    patterns.assert_same(fn(strategy), fn(None))


@pytest.mark.timeout(300)
def test_bn_dropout_trains(strategy):
    result = patterns.bn_dropout(strategy)
    losses = result["history_loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.timeout(300)
def test_unscaled_custom_step_is_2x_and_warned(strategy):
    with pytest.warns(UserWarning, match=r"kd\.scale_loss\(loss\)"):
        unscaled = patterns.hand_loss(strategy, scale=False)
    # Summed gradients of an unscaled mean: exactly one device at 2x lr.
    twice = patterns.hand_loss(None, scale=False, learning_rate=0.2)
    patterns.assert_same(unscaled, twice)


def test_scale_loss(strategy):
    assert float(kd.scale_loss(tf.constant(3.0))) == 3.0
    per_replica = strategy.run(lambda: kd.scale_loss(tf.constant(3.0)))
    assert [float(v) for v in
            strategy.experimental_local_results(per_replica)] == [1.5, 1.5]


@pytest.mark.timeout(300)
def test_gan_with_unbuilt_optimizers_is_refused(strategy):
    with pytest.raises(kd.strategies.UnbuiltOptimizerError,
                       match=r"`GAN\.d_optimizer` \(Adam\) is not built.*"
                             r"self\.d_optimizer\.build\("):
        patterns.gan(strategy, build=False)


@pytest.mark.timeout(300)
def test_custom_loop_with_unbuilt_optimizer_is_refused(strategy):
    # TensorFlow's strategy fails at the first step with "You must feed a
    # value for placeholder tensor"; kerasdist's says what to do.
    with pytest.raises(Exception, match=r"optimizer` \(Adam\) is not built"
                       r".*optimizer\.build\(model\.trainable_variables\) "
                       r"inside `with strategy\.scope\(\):`"):
        patterns.unbuilt_optimizer_loop(strategy)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(patterns.UNEVEN))
def test_uneven_training_batches_are_refused_before_step_1(strategy, case):
    n, batch, how = patterns.UNEVEN[case]
    # A dataset's sizes are read before the first step too (issue 23.9:
    # no per-batch check any more), so both kinds raise the same error,
    # which only the check before the first step raises.
    if n % batch and how == "fit_tfdata":
        match = (rf"Received: batch_size={batch} with {n} training examples"
                 r".*last batch of 1 example\(s\).*2 replicas in sync")
    else:
        match = (rf"Invalid value for argument `batch_size`. Received: "
                 rf"batch_size={batch}.*2 replicas in sync")
    with pytest.raises(kd.data.UnevenBatchError, match=match):
        patterns.uneven(strategy, case)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(patterns.EVEN))
def test_even_batches_match_one_device(strategy, case):
    # Evaluation, validation and predict data split unevenly too: the
    # results equal one device's (issue 23.1, 23.2).
    patterns.assert_same(patterns.uneven(strategy, case),
                         patterns.uneven(None, case))


def test_uneven_message_names_the_fix(strategy):
    with pytest.raises(kd.data.UnevenBatchError) as info:
        patterns.uneven(strategy, "fit_partial_1")
    # The whole message is checked in tests/test_data.py.
    message = str(info.value)
    assert message.startswith("Invalid value for argument `batch_size`. "
                              "Received: batch_size=4 with 9 training "
                              "examples")
    assert "(e.g. the first 8 examples)" in message
    assert "drop_remainder=True" in message


def test_file_callbacks_move_on_other_workers_only(tmp_path):
    from kerasdist.callbacks import keras_files

    two = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    chief = cluster.TaskInfo("worker", 0, two)
    other = cluster.TaskInfo("worker", 1, two)
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "m-{epoch}.keras"))
    csv = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    assert keras_files.adapt_file_callbacks([ckpt, csv], chief) == []
    assert ckpt.filepath == str(tmp_path / "m-{epoch}.keras")
    moved = keras_files.adapt_file_callbacks([ckpt, csv], other)
    assert moved == [ckpt, csv]
    assert ckpt.filepath.endswith("/m-{epoch}.keras")
    assert not ckpt.filepath.startswith(str(tmp_path))
    assert not csv.filename.startswith(str(tmp_path))
    # Again (a validation iterator in the same fit): nothing moves twice.
    assert keras_files.adapt_file_callbacks([ckpt, csv], other) == []


def test_keras_backup_and_restore_names_kd_callback(tmp_path):
    from kerasdist.callbacks import keras_files

    task = cluster.TaskInfo("worker", 0, {"worker": ["a:1", "b:2"]})
    with pytest.raises(keras_files.KerasBackupAndRestoreError,
                       match=r"Replace it with kd\.callbacks\."
                             r"BackupAndRestore\("):
        keras_files.adapt_file_callbacks(
            [keras.callbacks.BackupAndRestore(str(tmp_path))], task)
    # kerasdist's own callback is fine.
    assert keras_files.adapt_file_callbacks(
        [kd.callbacks.BackupAndRestore(str(tmp_path))], task) == []


def test_multi_worker_strategy_after_tf_ops_says_what_to_move(monkeypatch):
    # This process ran TF ops long ago; TF refuses to configure collectives.
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ['
                       '"127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": '
                       '"worker", "index": 1}}')
    with pytest.raises(kd.strategies.CollectivesAfterStartupError,
                       match=r"must be created before TensorFlow runs any "
                             r"operation in this process.*Move `strategy = "
                             r"kd\.get_strategy\(\"multi_worker\"\)`"):
        kd.get_strategy("multi_worker")


@pytest.mark.timeout(300)
def test_custom_step_loss_reported_scaled_is_warned(strategy):
    # Issue 23.6: a keras.losses.Loss in a custom train_step is scaled by
    # 1/N for the gradients; its returned value reaches the history / N.
    class FreshGAN(patterns.CallFreeGAN):
        def train_step(self, data):
            # The same step: its losses come from self.loss_fn(...).
            return super().train_step(data)

    with pytest.warns(UserWarning, match=r"FreshGAN\.train_step computes "
                      r"losses with a keras\.losses\.Loss \(self\.loss_fn"
                      r".*2x smaller than on one device.*"
                      r"kd\.losses\.unscale_loss\(loss\)"):
        scaled = patterns.gan_history(strategy, FreshGAN)
    one = patterns.gan_history(None, FreshGAN)
    np.testing.assert_allclose(scaled["history_d_loss"] * 2,
                               one["history_d_loss"], rtol=1e-4)


class _Unbuilt(keras.Model):
    """A model without call() whose sub-model has no Input."""

    def __init__(self):
        super().__init__()
        self.inner = keras.Sequential([keras.layers.Dense(1)])

    def train_step(self, data):
        return {"loss": ops.mean(self.inner(data))}


def test_model_without_call_and_unbuilt_layers_is_refused(strategy):
    with strategy.scope():
        model = _Unbuilt()
        model.compile()
    with pytest.raises(kd.strategies.ModelWithoutCallError,
                       match=r"_Unbuilt has no call\(\) method.*"
                             r"keras\.Input\(shape\)") as info:
        model.fit(np.zeros((4, 2), "float32"), batch_size=2, verbose=0)
    assert isinstance(info.value, kd.errors.PermanentError)

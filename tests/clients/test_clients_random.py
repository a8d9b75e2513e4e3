"""Per-replica random streams on 2 virtual CPUs (issue 23.3).

Keras's `SeedGenerator` state is the same on every replica; under a kd
strategy each replica still draws its own numbers, seeded from its global
replica id: replica 0 draws what one device draws, and two runs draw the
same. The same draws on 2 workers are checked in
test_clients_multi_worker.py.
"""

import keras
import numpy as np
import patterns
import pytest
import tensorflow as tf

import kerasdist as kd


@pytest.fixture(scope="module")
def strategy():
    return kd.MirroredStrategy(devices=["/cpu:0", "/cpu:1"])


@pytest.mark.timeout(300)
def test_replicas_draw_their_own_numbers_reproducibly(strategy):
    first = patterns.random_streams(strategy)
    second = patterns.random_streams(strategy)
    one = patterns.random_streams(None)
    # Dropout masks (16 draws at rate 0.5) and latents differ per replica.
    assert not np.array_equal(first["mask0"], first["mask1"])
    assert not np.array_equal(first["z0"], first["z1"])
    assert set(np.unique(first["mask1"])) <= {0.0, 2.0}
    # Replica 0 draws what one device draws; a second run draws the same.
    np.testing.assert_array_equal(first["z0"], one["z0"])
    np.testing.assert_array_equal(first["mask0"], one["mask0"])
    patterns.assert_same(second, first, rtol=0, atol=0)


def test_draws_outside_a_kd_strategy_are_unchanged(strategy):
    generator = keras.random.SeedGenerator(11)
    with strategy.scope():
        in_scope = keras.random.SeedGenerator(11)
    plain = keras.random.normal((3,), seed=generator)
    # Cross-replica context (in scope, outside strategy.run): unchanged.
    np.testing.assert_array_equal(keras.random.normal((3,), seed=in_scope),
                                  plain)
    per_replica = strategy.run(
        tf.function(lambda: keras.random.normal((3,), seed=in_scope)))
    local = strategy.experimental_local_results(per_replica)
    np.testing.assert_array_equal(
        local[0], keras.random.normal((3,), seed=generator))
    assert not np.array_equal(local[0], local[1])


class _Interrupted(Exception):
    pass


class _InterruptAt(keras.callbacks.Callback):
    """A crash as `fit` sees it: an exception after one step."""

    def __init__(self, epoch, step):
        super().__init__()
        self.at = (epoch, step)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise _Interrupted()


@pytest.mark.timeout(300)
def test_resume_after_a_restart_draws_as_the_unfailed_run(
        strategy, tmp_path, monkeypatch):
    # 2 epochs of 4 steps; the crash after step 1 of epoch 1 (global step
    # 6) loses 2 steps since the backup at step 4.
    reference = patterns.random_streams(strategy, epochs=2)
    backup_dir = tmp_path / "backup"
    with pytest.raises(_Interrupted):
        patterns.random_streams(strategy, epochs=2, callbacks=[
            kd.callbacks.BackupAndRestore(backup_dir, save_freq=2),
            _InterruptAt(1, 1)])
    monkeypatch.setenv("KERASDIST_RESTART_COUNT", "1")
    steps = []
    resumed = patterns.random_streams(strategy, epochs=2, callbacks=[
        kd.callbacks.BackupAndRestore(backup_dir, save_freq=2),
        keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: steps.append(batch))])
    # Resumed from the backup at global step 4, not from scratch: the
    # seed state was restored with the weights.
    assert len(steps) == 4
    patterns.assert_same(resumed, reference, rtol=0, atol=1e-7)


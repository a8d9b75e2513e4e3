"""Worker for test_local_sgd_multi_worker.py (run by kerasdist.testing).

    python tests/local_sgd_worker.py OUT_DIR

Under kd.MultiWorkerMirroredStrategy (one replica per worker):
1. reference: LocalSGD(4) with DiLoCo's outer optimizer, 3 epochs, with
   the all-reduces counted and a fingerprint of the weights after each step;
2. the same job interrupted after step 11 (a backup at step 9, mid-round)
   and resumed by a new model and fit with BackupAndRestore;
3. synchronous training for the all-reduce count.
Saves `workerRANK.npz` and `workerRANK.json`.
"""

import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

import kerasdist as kd

STEPS = 8  # per epoch


class Interrupted(Exception):
    pass


class Recorder(keras.callbacks.Callback):
    def __init__(self, stop_after=None):
        super().__init__()
        self.sums = []
        self.stop_after = stop_after

    def on_train_batch_end(self, batch, logs=None):
        self.sums.append(float(sum(
            np.sum(v.numpy(), dtype="float64")
            for v in self.model.trainable_variables)))
        if self.stop_after and len(self.sums) == self.stop_after:
            raise Interrupted()


def dataset(rank):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    # Each worker trains on its own half (no auto-sharding: local SGD's
    # replicas see different data).
    ds = tf.data.Dataset.from_tensor_slices((x[rank::2], y[rank::2]))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    return ds.batch(16).with_options(options)


def build(strategy, seed=3):
    with strategy.scope():
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(16, activation="tanh"),
            keras.layers.BatchNormalization(), keras.layers.Dense(1)])
        model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def outer():
    return keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)


def main(out):
    strategy = kd.MultiWorkerMirroredStrategy()
    rank = kd.cluster.from_env().task_index
    counter = kd.callbacks.AllReduceCounter(strategy)
    ref = build(strategy)
    rec = Recorder()
    local = kd.callbacks.LocalSGD(4, outer())
    ref.fit(dataset(rank), epochs=3, verbose=0, callbacks=[local, rec])
    local_calls = counter.calls

    backup = os.path.join(out, "backup")
    first = build(strategy)
    try:
        first.fit(dataset(rank), epochs=3, verbose=0, callbacks=[
            kd.callbacks.LocalSGD(4, outer()),
            kd.callbacks.BackupAndRestore(backup, save_freq=3),
            Recorder(stop_after=11)])
    except Interrupted:
        pass
    resumed = build(strategy, seed=11)
    resumed.fit(dataset(rank), epochs=3, verbose=0, callbacks=[
        kd.callbacks.BackupAndRestore(backup, save_freq=3),
        kd.callbacks.LocalSGD(4, outer())])

    counter.reset()
    sync = build(strategy)
    sync.fit(dataset(rank), epochs=3, verbose=0)
    np.savez(os.path.join(out, f"worker{rank}.npz"),
             **{f"ref{i}": w for i, w in enumerate(ref.get_weights())},
             **{f"res{i}": w for i, w in enumerate(resumed.get_weights())})
    with open(os.path.join(out, f"worker{rank}.json"), "w") as f:
        json.dump({"sums": rec.sums, "local_calls": local_calls,
                   "sync_calls": counter.calls, "syncs": local.syncs}, f)


if __name__ == "__main__":
    main(sys.argv[1])

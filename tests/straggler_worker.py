"""Worker for test_straggler.py (run under kerasdist-run).

    python tests/straggler_worker.py OUT_DIR CGROUP STEPS

Worker 1 moves itself (all its threads) into the cpu cgroup CGROUP (made
by the test, with a CPU quota) after its first step, so that its start-up
and tracing are not slowed: it is the straggler. Both train one epoch of STEPS
steps with kd.callbacks.LocalSGD(8, dynamic_steps=True) under
kd.MultiWorkerMirroredStrategy, and save to OUT_DIR/workerRANK.npz every
step's weights before and after LocalSGD's sync, the steps of each round,
and the loss on a fixed set before and after training.
"""

import os
import sys

import keras
import local_sgd_worker
import numpy as np
import tensorflow as tf

import kerasdist as kd
from kerasdist.testing import cgroups

SYNC_EVERY = 8


class JoinAfterFirstStep(keras.callbacks.Callback):
    """Moves this process into a cpu cgroup after the first step."""

    def __init__(self, cgroup):
        super().__init__()
        self.cgroup = cgroup

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0 and self.cgroup:
            cgroups.Cgroup(self.cgroup, ("cpu",)).add(os.getpid())


class Weights(keras.callbacks.Callback):
    """The flat trainable weights after every step."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append(np.concatenate(
            [v.numpy().ravel() for v in self.model.trainable_variables]))


def main(out, cgroup, steps):
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    strategy = kd.MultiWorkerMirroredStrategy()
    rank = kd.cluster.from_env().task_index
    # Each worker's half of local_sgd_worker's data, repeated.
    ds = local_sgd_worker.dataset(rank)
    x, y = next(iter(ds.unbatch().batch(128)))
    x, y = x.numpy(), y.numpy()
    ds = ds.repeat()
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.02), "mse")
    before = float(np.mean((model(x).numpy() - y) ** 2))
    start = np.concatenate(
        [v.numpy().ravel() for v in model.trainable_variables])
    local, synced = Weights(), Weights()
    join = JoinAfterFirstStep(cgroup if rank == 1 else None)
    sgd = kd.callbacks.LocalSGD(SYNC_EVERY, dynamic_steps=True)
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0,
              callbacks=[join, local, sgd, synced])
    after = float(np.mean((model(x).numpy() - y) ** 2))
    np.savez(os.path.join(out, f"worker{rank}.npz"),
             local=np.array(local.rows), synced=np.array(synced.rows),
             start=start, steps=np.array(sgd.local_steps),
             loss=np.array([before, after]), seconds=sgd.round_seconds,
             final=np.concatenate(
                 [w.ravel() for w in model.get_weights()]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    # A process at a few % of a core takes a minute to tear TensorFlow
    # down: its results are written, so it leaves at once.
    sys.stdout.flush()
    os._exit(0)

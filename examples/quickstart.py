"""Quick start: data-parallel training of a Keras 3 model with kerasdist.

Runs alone (one device, or `--num_virtual_cpus=2` for mirrored) or as one of
several workers under the launcher:

    kerasdist-run --num_workers 2 -- python examples/quickstart.py

The data is generated (10 Gaussian clusters in 32 dimensions), so nothing is
downloaded; every worker generates the same data and `kd.data.distribute`
gives each its part of every global batch.
"""

import time

import numpy as np
from absl import app, flags

import kerasdist as kd

# The standard flags (--strategy, --num_virtual_cpus, --epochs, --seed,
# --backup_freq, ...; see --helpfull), with this script's defaults.
kd.flags.define_flags(epochs=3, global_batch_size=64)
flags.DEFINE_integer("num_examples", 4096, "Generated training examples.")
FLAGS = flags.FLAGS


def make_data(n, seed, noise_seed, num_classes=10, dim=32):
    """Overlapping Gaussian clusters: learnable, but not trivially.

    `seed` fixes the class centres (the task); `noise_seed` the examples,
    so train and test sets share the task but not the examples.
    """
    centers = np.random.RandomState(seed).normal(
        0, 1.0, (num_classes, dim)).astype("float32")
    rng = np.random.RandomState(noise_seed)
    y = rng.randint(0, num_classes, n)
    x = centers[y] + rng.normal(0, 2.0, (n, dim)).astype("float32")
    return x, y.astype("int64")


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    strategy = kd.flags.strategy_from_flags(FLAGS)
    task = kd.cluster.from_env()
    keras.utils.set_random_seed(FLAGS.seed)

    x, y = make_data(FLAGS.num_examples, FLAGS.seed, noise_seed=1)
    x_test, y_test = make_data(1024, FLAGS.seed, noise_seed=2)

    train = kd.data.distribute(
        tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
            4096, seed=FLAGS.seed, reshuffle_each_iteration=True),
        strategy, global_batch_size=FLAGS.global_batch_size)
    test = kd.data.distribute(
        tf.data.Dataset.from_tensor_slices((x_test, y_test)),
        strategy, global_batch_size=FLAGS.global_batch_size)

    with strategy.scope():
        model = keras.Sequential([
            keras.Input((32,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ])
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    start = time.time()
    # Progress from the chief only: one line per epoch.
    model.fit(
        train,
        epochs=FLAGS.epochs,
        callbacks=kd.flags.callbacks_from_flags(FLAGS),
        verbose=kd.callbacks.chief_verbose(2),
    )
    loss, acc = model.evaluate(test, verbose=0)
    if task.is_chief:
        print(
            f"result: test accuracy {acc:.3f} (chance 0.100), loss {loss:.3f}; "
            f"{task.num_workers} worker(s), {strategy.num_replicas_in_sync} "
            f"replica(s) in sync, global batch {FLAGS.global_batch_size}, "
            f"{time.time() - start:.1f}s",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)

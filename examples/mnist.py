"""MNIST convnet (the Keras example), data-parallel with kerasdist.

The model is the Keras "Simple MNIST convnet" example. Data:

- `--dataset=synthetic` (default, no download): MNIST-shaped 28x28 images
  of 10 classes, each class a fixed random stroke pattern, randomly
  shifted, with pixel noise. A convnet learns it to ~99% in one epoch;
  chance is 10%.
- `--dataset=mnist`: the real MNIST via `tfds.load("mnist")` (downloads to
  `--data_dir` the first time).

Run it alone, on 2 virtual CPUs (mirrored), or as 2 workers:

    python examples/mnist.py
    python examples/mnist.py --num_virtual_cpus=2 --epochs=2
    kerasdist-run --num_workers 2 -- python examples/mnist.py --epochs=2

Flags: the standard ones from `kd.flags.define_flags()` (see
`--helpfull`), plus `--num_examples` for the synthetic set.
"""

import os
import time

from absl import app, flags
from mnist_data import IMAGE_SHAPE, NUM_CLASSES, load_datasets

import kerasdist as kd

kd.flags.define_flags(epochs=2, global_batch_size=64, dataset="synthetic")
flags.DEFINE_integer(
    "num_examples", 8192, "Synthetic training examples (test: 1/4 as many).",
    lower_bound=1,
)
flags.register_validator(
    "dataset", lambda v: v in ("synthetic", "mnist"),
    "Invalid value for flag `--dataset`: expected 'synthetic' or 'mnist'.",
)
FLAGS = flags.FLAGS


def preprocess(image, label):
    import tensorflow as tf

    return tf.cast(image, tf.float32) / 255.0, label


def build_model():
    """The Keras "Simple MNIST convnet"."""
    import keras

    return keras.Sequential([
        keras.Input(IMAGE_SHAPE),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(NUM_CLASSES, activation="softmax"),
    ])


def main(argv):
    del argv
    # First: the strategy (it may split the CPU into virtual devices, which
    # must happen before TensorFlow creates any tensor).
    strategy = kd.flags.strategy_from_flags(FLAGS)
    import keras
    import tensorflow as tf

    task = kd.cluster.from_env()
    keras.utils.set_random_seed(FLAGS.seed)

    train, test = load_datasets(
        FLAGS.dataset, FLAGS.data_dir, FLAGS.num_examples, FLAGS.seed
    )
    train = train.map(preprocess).shuffle(
        10_000, seed=FLAGS.seed, reshuffle_each_iteration=True
    )
    if FLAGS.steps_per_epoch:
        train = train.repeat()
    train = kd.data.distribute(
        train, strategy, global_batch_size=FLAGS.global_batch_size
    )
    test = kd.data.distribute(
        test.map(preprocess), strategy,
        global_batch_size=FLAGS.global_batch_size,
    )

    with strategy.scope():
        model = build_model()
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    start = time.time()
    model.fit(
        train,
        epochs=FLAGS.epochs,
        steps_per_epoch=FLAGS.steps_per_epoch,
        callbacks=kd.flags.callbacks_from_flags(FLAGS),
        verbose=kd.callbacks.chief_verbose(2),
    )
    train_time = time.time() - start
    loss, accuracy = model.evaluate(test, verbose=0)
    if FLAGS.model_dir and task.is_chief:
        tf.io.gfile.makedirs(FLAGS.model_dir)
        model.save_weights(os.path.join(FLAGS.model_dir, "mnist.weights.h5"))
    if task.is_chief:
        print(
            f"result: test accuracy {accuracy:.3f} (chance 0.100), loss "
            f"{loss:.3f}; dataset {FLAGS.dataset}, {task.num_workers} "
            f"worker(s), {strategy.num_replicas_in_sync} replica(s), global "
            f"batch {FLAGS.global_batch_size}, {train_time:.1f}s training",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)

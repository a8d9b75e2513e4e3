"""Local SGD / DiLoCo: MNIST-shaped data, replicas that sync every H steps.

Every replica trains on its own for `--sync_every` steps (no gradient
all-reduce), then the replicas all-reduce once and continue from the new
average (`--outer=avg`, local SGD) or from an outer Nesterov step
(`--outer=diloco`: SGD(0.7, momentum 0.5, Nesterov), which matched plain
averaging with an inner SGD + momentum and with an inner AdamW in
benchmarks/communication_efficiency.py; DiLoCo's published momentum 0.9
diverges on this inner optimizer in short runs, and LocalSGD warns).
Compare with `--sync_every=0` (synchronous SGD) and look at the all-reduce
count printed at the end.

    python examples/local_sgd.py --num_virtual_cpus=4 --sync_every=8
    python examples/local_sgd.py --num_virtual_cpus=4 --outer=diloco
    kerasdist-run --num_workers 2 -- python examples/local_sgd.py

Data: `--dataset=synthetic` (default, generated MNIST-shaped images) or
`--dataset=mnist` (`tfds.load`, downloads to `--data_dir`).
"""

import time

from absl import app, flags
from mnist_data import IMAGE_SHAPE, NUM_CLASSES, load_datasets

import kerasdist as kd

kd.flags.define_flags(epochs=2, global_batch_size=64, dataset="synthetic")
flags.DEFINE_integer("num_examples", 4096, "Synthetic training examples.",
                     lower_bound=1)
flags.DEFINE_integer("sync_every", 8, "Local steps between syncs (H); 0 "
                     "trains synchronously.", lower_bound=0)
flags.DEFINE_enum("outer", "avg", ["avg", "diloco"], "Outer optimizer: "
                  "plain averaging or DiLoCo's outer Nesterov SGD(0.7, "
                  "momentum 0.5).")
flags.DEFINE_enum("pseudo_gradient_compression", "none",
                  ["none", "fp16", "bf16", "int8"],
                  "All-reduce the pseudo-gradients in 16 bits, or in 8 "
                  "with error feedback.")
flags.register_validator(
    "dataset", lambda v: v in ("synthetic", "mnist"),
    "Invalid value for flag `--dataset`: expected 'synthetic' or 'mnist'.",
)
FLAGS = flags.FLAGS


def preprocess(image, label):
    import tensorflow as tf

    return tf.reshape(tf.cast(image, tf.float32) / 255.0, [-1]), label


def build_model():
    """A small MLP (fast on CPUs)."""
    import keras

    size = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    return keras.Sequential([
        keras.Input((size,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(NUM_CLASSES, activation="softmax"),
    ])


def main(argv):
    del argv
    strategy = kd.flags.strategy_from_flags(FLAGS)
    import keras

    task = kd.cluster.from_env()
    keras.utils.set_random_seed(FLAGS.seed)
    train, test = load_datasets(
        FLAGS.dataset, FLAGS.data_dir, FLAGS.num_examples, FLAGS.seed)
    train = train.map(preprocess).shuffle(10_000, seed=FLAGS.seed)
    if FLAGS.steps_per_epoch:
        train = train.repeat()
    train = kd.data.distribute(
        train, strategy, global_batch_size=FLAGS.global_batch_size)
    test = kd.data.distribute(
        test.map(preprocess), strategy,
        global_batch_size=FLAGS.global_batch_size)

    counter = None
    if strategy.num_replicas_in_sync > 1:
        counter = kd.callbacks.AllReduceCounter(strategy)
    callbacks = kd.flags.callbacks_from_flags(FLAGS)
    if FLAGS.sync_every:
        outer = None
        if FLAGS.outer == "diloco":
            outer = keras.optimizers.SGD(0.7, momentum=0.5, nesterov=True)
        # Before BackupAndRestore or after: either order resumes exactly.
        callbacks.insert(0, kd.callbacks.LocalSGD(
            FLAGS.sync_every, outer_optimizer=outer,
            compression=FLAGS.pseudo_gradient_compression))
    with strategy.scope():
        model = build_model()
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    start = time.time()
    model.fit(train, epochs=FLAGS.epochs,
              steps_per_epoch=FLAGS.steps_per_epoch, callbacks=callbacks,
              verbose=2 if task.is_chief else 0)
    train_time = time.time() - start
    calls = counter.calls if counter is not None else 0
    loss, accuracy = model.evaluate(test, verbose=0)
    if task.is_chief:
        mode = (f"local SGD H={FLAGS.sync_every} outer={FLAGS.outer}"
                if FLAGS.sync_every else "synchronous SGD")
        print(
            f"result: test accuracy {accuracy:.3f} (chance 0.100), loss "
            f"{loss:.3f}; {mode}, {strategy.num_replicas_in_sync} "
            f"replica(s), {calls} all-reduces, {train_time:.1f}s training",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)

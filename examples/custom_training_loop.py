"""A custom training loop with the same strategies as `model.fit`.

For when `fit` is not enough: the training step is written by hand with
`tf.GradientTape`, run on every replica with `strategy.run`, and losses and
counts are combined across replicas (and workers) with `strategy.reduce`.
The strategy, the global batch and the sharding are the same as for `fit`:
`kd.flags.strategy_from_flags` and `kd.data.distribute`, then
`strategy.experimental_distribute_dataset` to get per-replica batches.

Data: `--dataset=synthetic` (default, no download) is MNIST-shaped: 10
classes of fixed random stroke patterns, shifted, plus noise; a small MLP
reaches > 90% test accuracy in 2 epochs (chance: 10%). `--dataset=mnist`
loads the real MNIST with `tfds.load`.

    python examples/custom_training_loop.py
    python examples/custom_training_loop.py --num_virtual_cpus=2
    kerasdist-run --num_workers 2 -- python examples/custom_training_loop.py

The loss is the sum of per-example losses divided by the *global* batch
(`tf.nn.compute_average_loss`), so that the gradients the optimizer sums
over replicas are the gradient of the mean loss, as on one device.
"""

import time

from absl import app, flags
from mnist_data import NUM_CLASSES, load_datasets

import kerasdist as kd

kd.flags.define_flags(epochs=2, global_batch_size=64, dataset="synthetic")
flags.DEFINE_integer(
    "num_examples", 8192, "Synthetic training examples (test: 1/4 as many).",
    lower_bound=1,
)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.register_validator(
    "dataset", lambda v: v in ("synthetic", "mnist"),
    "Invalid value for flag `--dataset`: expected 'synthetic' or 'mnist'.",
)
flags.register_multi_flags_validator(
    ["backup_freq", "warmup_steps"],
    lambda v: not v["backup_freq"] and not v["warmup_steps"],
    "--backup_freq and --warmup_steps are Keras callbacks for model.fit; "
    "this custom loop does not use them (see examples/mnist.py).",
)
FLAGS = flags.FLAGS


def preprocess(image, label):
    import tensorflow as tf

    return tf.reshape(tf.cast(image, tf.float32) / 255.0, [784]), label


def main(argv):
    del argv
    strategy = kd.flags.strategy_from_flags(FLAGS)
    import keras
    import tensorflow as tf

    task = kd.cluster.from_env()
    keras.utils.set_random_seed(FLAGS.seed)
    global_batch = FLAGS.global_batch_size

    train, test = load_datasets(
        FLAGS.dataset, FLAGS.data_dir, FLAGS.num_examples, FLAGS.seed
    )
    train = train.map(preprocess).shuffle(
        10_000, seed=FLAGS.seed, reshuffle_each_iteration=True
    )
    if FLAGS.steps_per_epoch:
        train = train.repeat()
    # kd.data.distribute: global batches, checked against the replicas,
    # explicit shard policy; then per-replica batches for strategy.run.
    train = strategy.experimental_distribute_dataset(
        kd.data.distribute(
            train, strategy, global_batch_size=global_batch,
            drop_remainder=True,
        )
    )
    test = strategy.experimental_distribute_dataset(
        kd.data.distribute(
            test.map(preprocess), strategy, global_batch_size=global_batch
        )
    )

    with strategy.scope():
        model = keras.Sequential([
            keras.Input((784,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ])
        optimizer = keras.optimizers.Adam(FLAGS.learning_rate)
        # Create the optimizer's slots now, under the scope, not lazily in
        # the first replica step.
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )

    def correct_count(labels, logits):
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int64)
        return tf.reduce_sum(tf.cast(predicted == labels, tf.float32))

    def replica_train_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            # Mean over the *global* batch: replicas' gradients are summed.
            loss = tf.nn.compute_average_loss(
                loss_fn(labels, logits), global_batch_size=global_batch
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=True)
        )
        return loss, correct_count(labels, logits)

    @tf.function
    def train_step(batch):
        loss, correct = strategy.run(replica_train_step, args=batch)
        return (
            strategy.reduce("SUM", loss, axis=None),
            strategy.reduce("SUM", correct, axis=None),
        )

    @tf.function
    def test_step(batch):
        def replica_test_step(images, labels):
            logits = model(images, training=False)
            return correct_count(labels, logits), tf.cast(
                tf.shape(labels)[0], tf.float32
            )

        correct, count = strategy.run(replica_test_step, args=batch)
        return (
            strategy.reduce("SUM", correct, axis=None),
            strategy.reduce("SUM", count, axis=None),
        )

    start = time.time()
    for epoch in range(FLAGS.epochs):
        total_loss = total_correct = steps = 0.0
        iterator = iter(train)
        while FLAGS.steps_per_epoch is None or steps < FLAGS.steps_per_epoch:
            batch = next(iterator, None)
            if batch is None:
                break
            loss, correct = train_step(batch)
            total_loss += float(loss)
            total_correct += float(correct)
            steps += 1
        if task.is_chief:
            print(
                f"epoch {epoch + 1}/{FLAGS.epochs}: {int(steps)} steps, loss "
                f"{total_loss / steps:.4f}, accuracy "
                f"{total_correct / (steps * global_batch):.4f}",
                flush=True,
            )
    train_time = time.time() - start

    correct = count = 0.0
    for batch in test:
        c, n = test_step(batch)
        correct += float(c)
        count += float(n)
    if task.is_chief:
        print(
            f"result: test accuracy {correct / count:.3f} (chance 0.100) on "
            f"{int(count)} examples; custom loop, {task.num_workers} "
            f"worker(s), {strategy.num_replicas_in_sync} replica(s), global "
            f"batch {global_batch}, {train_time:.1f}s training",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)

"""Small models and generated data shared by the benchmarks."""

import keras
import numpy as np
import tensorflow as tf


def convnet(num_classes=10, width=32):
    """A compute-bound convnet for 32x32x3 inputs (CIFAR-sized)."""
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(num_classes),
    ])


def mlp(*widths):
    """A ReLU MLP: `mlp(64, 256, 256, 10)` takes 64 features to 10 logits."""
    return keras.Sequential(
        [keras.Input((widths[0],))]
        + [keras.layers.Dense(w, activation="relu") for w in widths[1:-1]]
        + [keras.layers.Dense(widths[-1])])


def example(i):
    """Example `i` of a generated 10-class dataset of 64 features, made in
    the pipeline (`Dataset.range(n).map(example)`), the same in every run."""
    x = tf.random.stateless_normal([64], seed=tf.stack([i, 0]))
    return x, i % 10


def compile_for_classification(model):
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def images(n=512, seed=0):
    """An endless dataset of random 32x32x3 images and labels (unbatched)."""
    rng = np.random.RandomState(seed)
    x = rng.uniform(size=(n, 32, 32, 3)).astype("float32")
    y = rng.randint(0, 10, n).astype("int64")
    return tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()


class StepTimer(keras.callbacks.Callback):
    """Wall time of the training steps after `warmup` steps."""

    def __init__(self, warmup):
        super().__init__()
        self.warmup = warmup
        self.start = self.end = None
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        import time

        now = time.perf_counter()
        if batch + 1 == self.warmup:
            self.start = now
        elif batch + 1 > self.warmup:
            self.end, self.steps = now, self.steps + 1

    @property
    def seconds_per_step(self):
        return (self.end - self.start) / self.steps

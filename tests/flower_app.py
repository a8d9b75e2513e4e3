"""Keras model and per-client data for the Flower tests (importable by
Flower's Ray workers and by flower-supernode processes)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

CLASSES = 4
FEATURES = 8


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(CLASSES, FEATURES)) * 2
    y = rng.integers(0, CLASSES, size=n)
    x = centers[y] + rng.normal(size=(n, FEATURES))
    return x.astype("float32"), y.astype("int64")


def model_fn():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(CLASSES),
    ])
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def data_fn(partition_id, num_partitions):
    x, y = make_data(400, seed=partition_id + 1)
    return (x[:320], y[:320]), (x[320:], y[320:])


def bad_data_fn(partition_id, num_partitions):
    x, y = make_data(40, seed=partition_id)
    return x, y  # not (train, validation)


TEST_DATA = make_data(500, seed=999)

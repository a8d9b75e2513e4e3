"""Worker for tests/test_elastic_batches.py: `fit` on 15 examples with a
global batch of 6 (a last batch of 3) under an elastic launcher."""

import numpy as np

import kerasdist as kd

strategy = kd.get_strategy("multi_worker", timeout_seconds=120)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

with strategy.scope():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
x = np.zeros((15, 2), "float32")
model.fit(kd.data.distribute(tf.data.Dataset.from_tensor_slices(
    (x, x[:, :1])), strategy, global_batch_size=6), verbose=0)
print("worker trained", flush=True)

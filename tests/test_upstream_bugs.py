"""Upstream Keras/TF behaviour that kerasdist works around still happens.

Each test shows the upstream problem with upstream code only. When one
starts to skip, upstream fixed it and the kerasdist workaround named in the
skip message (and in docs/guide/architecture.md) can be reconsidered. The
two Keras 3 `fit` bugs under MultiWorkerMirroredStrategy are shown by
tests/test_multi_worker.py, keras-team/keras#20582 by
tests/test_grad_accumulation.py.
"""

import os
import signal
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdist import _internals

_TWO_STRATEGIES = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(4)])


def all_reduce(strategy):
    @tf.function
    def step():
        ctx = lambda: tf.distribute.get_replica_context()
        return strategy.run(
            lambda: ctx().all_reduce("SUM", tf.constant(1.0)))
    return [float(v) for v in strategy.experimental_local_results(step())]


print("four", all_reduce(tf.distribute.MirroredStrategy(
    ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"])), flush=True)
try:
    print("two", all_reduce(tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"])), flush=True)
except Exception as e:  # noqa: BLE001 (the upstream error, reported)
    print("UPSTREAM-ERROR", str(e).splitlines()[0], flush=True)
"""


def test_two_mirrored_strategies_share_collective_keys_upstream():
    """Why kd.MirroredStrategy gives each instance its own key range."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _TWO_STRATEGIES],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out:\n{out[-3000:]}")
    assert "four [4.0, 4.0, 4.0, 4.0]" in out, out[-3000:]
    if "two [2.0, 2.0]" in out:
        pytest.skip("upstream MirroredStrategy instances no longer share "
                    "collective keys; strategies.set_collective_key_base "
                    "may be unnecessary")
    assert "UPSTREAM-ERROR" in out, out[-3000:]
    assert "is joining a group with size2, but that group has size 4" in out


def test_optimizer_slots_ignore_their_variable_device_upstream():
    """Why PipelineModel.compile builds slots on each variable's device."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with tf.init_scope(), tf.device("/cpu:1"):
        for v in model.weights:
            _internals.reinitialize_variable(v, tf.identity(v.value))
    assert all(v.value.device.endswith("CPU:1") for v in model.weights)
    # Keras builds the optimizer when `fit` first traces the train step.
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 4), "float32"), np.ones((4, 3), "float32"),
              verbose=0)
    slots = [v for v in model.optimizer.variables if "momentum" in v.path]
    assert len(slots) == len(model.trainable_variables)
    if all(s.value.device.endswith("CPU:1") for s in slots):
        pytest.skip("upstream Keras now creates slots beside their "
                    "variables; _build_optimizer_on_devices may go")
    assert all(s.value.device.endswith("CPU:0") for s in slots), [
        s.value.device for s in slots
    ]


def test_backup_and_restore_resumes_at_epoch_start_upstream(tmp_path):
    """Why kd.callbacks.BackupAndRestore resumes at the exact step."""
    x = np.ones((8, 2), "float32")
    y = np.zeros((8, 1), "float32")

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:  # after 3 of the 4 steps of epoch 0
                raise RuntimeError("interrupted")

    class Count(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.batches = []

        def on_train_batch_begin(self, batch, logs=None):
            self.batches.append(batch)

    def model():
        m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        m.compile(optimizer="sgd", loss="mse")
        return m

    backup = keras.callbacks.BackupAndRestore(str(tmp_path), save_freq=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        model().fit(x, y, batch_size=2, epochs=1, verbose=0,
                    callbacks=[backup, Interrupt()])
    count = Count()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path), save_freq=2)
    model().fit(x, y, batch_size=2, epochs=1, verbose=0,
                callbacks=[backup, count])
    if count.batches == [2, 3]:
        pytest.skip("upstream BackupAndRestore now resumes at the step")
    # Saved after step 2 of epoch 0, yet the whole epoch runs again.
    assert count.batches == [0, 1, 2, 3]


def test_fit_on_a_dataset_warns_about_shuffle_upstream():
    """Why kerasdist/__init__.py filters one warning (keras#22777)."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    ds = tf.data.Dataset.from_tensor_slices(
        (np.ones((4, 2), "float32"), np.zeros((4, 1), "float32"))
    ).batch(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(ds, epochs=1, verbose=0)
    messages = [str(w.message) for w in caught]
    if not any("`shuffle=True` was passed" in m for m in messages):
        pytest.skip("upstream Keras no longer warns on fit(dataset); the "
                    "filter in kerasdist/__init__.py may go")
    assert any("but will be ignored" in m for m in messages)

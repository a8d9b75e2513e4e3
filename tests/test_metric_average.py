"""MetricAverage: every worker sees the same logs and decides the same."""

import os
import types

import keras
import numpy as np
import pytest

import kerasdist as kd
from kerasdist.testing import run_scenario

HERE = os.path.dirname(os.path.abspath(__file__))


def _early_stopping_epoch(values, patience=1):
    """Epoch at which keras EarlyStopping stops on this sequence, or None."""
    stop = keras.callbacks.EarlyStopping("local_val", patience=patience,
                                         mode="min")
    stop.set_model(types.SimpleNamespace(stop_training=False))
    stop.on_train_begin()
    for epoch, value in enumerate(values):
        stop.on_epoch_end(epoch, {"local_val": value})
        if stop.model.stop_training:
            return epoch
    return None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_early_stopping_decides_the_same_on_both_workers(tmp_path):
    runs = run_scenario(os.path.join(HERE, "toolkit_worker.py"),
                        "metric_average", tmp_path)
    plain = [[e["local_val"] for e in r["plain"]["logs"]] for r in runs]
    averaged = [[e["local_val"] for e in r["averaged"]["logs"]]
                for r in runs]

    # Without MetricAverage the workers' logs differ, and EarlyStopping
    # would stop them at different epochs (the earlier one would leave the
    # other blocked in its next all-reduce).
    assert not np.allclose(plain[0], plain[1])
    alone = [_early_stopping_epoch(p) for p in plain]
    assert alone[0] != alone[1]

    # With it, both see the mean of the per-worker values, and stop at the
    # same epoch, the one the mean sequence dictates.
    assert averaged[0] == averaged[1]
    n = len(averaged[0])
    np.testing.assert_allclose(
        averaged[0], np.mean([p[:n] for p in plain], axis=0), rtol=1e-6)
    stopped = [r["averaged"]["stopped_epoch"] for r in runs]
    assert stopped[0] == stopped[1] == _early_stopping_epoch(averaged[0])
    assert runs[0]["averaged"]["epochs_run"] == runs[1]["averaged"][
        "epochs_run"] < len(plain[0])
    # Workers whose logs hold different keys all fail, at the same point.
    for r in runs:
        assert "different numeric log keys" in r["mismatch_error"]
    # Keras's own loss is already averaged by the strategy: untouched.
    for a, b in zip(runs[0]["plain"]["logs"], runs[1]["plain"]["logs"],
                    strict=True):
        assert a["loss"] == b["loss"]


def test_single_worker_logs_are_unchanged():
    strategy = kd.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
    seen = {}

    class Put(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["custom"] = 3.5
            logs["note"] = "text"

    class Read(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.update(logs)

    x = np.ones((8, 2), "float32")
    model.fit(x, x[:, :1], batch_size=4, verbose=0, callbacks=[
        Put(), kd.callbacks.MetricAverage(every_batch=True), Read()])
    assert seen["custom"] == 3.5 and seen["note"] == "text"


def test_invalid_argument():
    with pytest.raises(ValueError, match="every_batch='yes'"):
        kd.callbacks.MetricAverage(every_batch="yes")

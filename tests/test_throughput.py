"""Throughput: examples/sec, step time, scaling efficiency in the logs."""

import csv

import keras
import numpy as np
import pytest

import kerasdist as kd


def test_throughput_is_written_to_logs_and_csv(tmp_path):
    strategy = kd.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
    throughput = kd.callbacks.Throughput(global_batch_size=16,
                                         baseline_examples_per_sec=100.0)
    path = tmp_path / "log.csv"
    x = np.ones((16 * 6, 4), "float32")
    model.fit(x, x[:, :1], batch_size=16, epochs=2, verbose=0, callbacks=[
        throughput, keras.callbacks.CSVLogger(str(path))])

    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2
    for row in rows:
        eps = float(row["examples_per_sec"])
        step = float(row["step_time"])
        assert eps > 0 and step > 0
        assert float(row["examples_per_sec_per_replica"]) == (
            pytest.approx(eps / 2))
        assert float(row["scaling_efficiency"]) == pytest.approx(
            eps / (2 * 100.0))
    s = throughput.summary
    assert s["steps_timed"] == 2 * 6 - 1  # first step (tracing) skipped
    assert s["replicas"] == 2 and s["global_batch_size"] == 16
    assert s["scaling_efficiency"] == pytest.approx(
        s["examples_per_sec"] / 200.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"global_batch_size": 0}, "global_batch_size=0"),
        ({"global_batch_size": 8, "baseline_examples_per_sec": -1},
         "baseline_examples_per_sec=-1"),
        ({"global_batch_size": 8, "skip_steps": -1}, "skip_steps=-1"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kd.callbacks.Throughput(**kwargs)

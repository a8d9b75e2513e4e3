"""ChiefOnly: only the chief writes; other workers never touch the path."""

import csv
import json
import os

import keras
import numpy as np
import pytest

import kerasdist as kd
from kerasdist.testing import run_scenario

HERE = os.path.dirname(os.path.abspath(__file__))


def _task(index):
    return kd.cluster.parse(kd.cluster.make_tf_config(
        ["127.0.0.1:1", "127.0.0.1:2"], index))


def _fit(callbacks, epochs=2):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.ones((8, 2), "float32")
    model.fit(x, x[:, :1], batch_size=4, epochs=epochs, verbose=0,
              callbacks=callbacks)
    return model


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_files_are_written_by_the_chief_only_two_workers(tmp_path):
    chief, other = run_scenario(os.path.join(HERE, "toolkit_worker.py"),
                                "chief_only", tmp_path)
    shared = tmp_path / "shared"
    # Callbacks writing one file per process (named by pid): only the
    # chief's file exists in the shared directory.
    assert sorted(os.listdir(shared / "skip")) == [f"{chief['pid']}.txt"]
    assert sorted(os.listdir(shared / "temp")) == [f"{chief['pid']}.txt"]
    assert (shared / "temp" / f"{chief['pid']}.txt").read_text() == "0\n1\n"
    # The non-chief ran the temp_dir callback (it may hold collectives)
    # against its private directory, which is gone after training.
    assert other["pid_writer_epochs"] == 2
    assert other["pid_writer_log_dir"].startswith(
        other["pid_writer_temp_dir"])
    assert not os.path.exists(other["pid_writer_temp_dir"])
    # ModelCheckpoint runs on both (mode "auto" -> "temp_dir"); the shared
    # path holds the chief's checkpoints, loadable.
    assert chief["ckpt_mode"] == other["ckpt_mode"] == "temp_dir"
    assert chief["ckpt_filepath"] == str(shared / "model-{epoch}.keras")
    assert other["ckpt_filepath"].startswith(other["temp_dir"])
    assert other["temp_dir_exists"] is False
    for epoch in (1, 2):
        model = keras.saving.load_model(shared / f"model-{epoch}.keras")
        assert model.count_params() > 0
    rows = list(csv.DictReader((shared / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    # The run summary is printed by the chief only; both compute it.
    assert len(chief["summary_lines"]) == 1 and not other["summary_lines"]
    assert "workers=2 replicas=2 epochs=2 steps=6" in (
        chief["summary_lines"][0])
    assert chief["summary"]["final"] == other["summary"]["final"]


def test_non_chief_skips_file_writers(tmp_path):
    path = tmp_path / "log.csv"
    wrapped = kd.callbacks.ChiefOnly(keras.callbacks.CSVLogger(str(path)),
                                     task=_task(1))
    _fit([wrapped])
    assert wrapped.mode == "skip"
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_non_chief_checkpoint_goes_to_a_deleted_temp_dir(tmp_path):
    path = tmp_path / "ckpt.weights.h5"
    wrapped = kd.callbacks.ChiefOnly(
        keras.callbacks.ModelCheckpoint(str(path), save_weights_only=True),
        task=_task(1))
    saved = []
    clean = wrapped._clean  # noqa: SLF001 (kerasdist's own hook)

    def record_then_clean():  # ChiefOnly cleans its temp dir per epoch
        saved.append(os.path.exists(wrapped.callback.filepath))
        clean()

    wrapped._clean = record_then_clean  # noqa: SLF001
    _fit([wrapped])
    assert saved == [True, True]
    assert not path.exists() and list(tmp_path.iterdir()) == []
    assert not os.path.exists(wrapped.temp_dir)
    _fit([wrapped], epochs=1)  # a second fit works (the dir comes back)
    assert saved == [True, True, True] and not path.exists()


def test_chief_writes(tmp_path):
    path = tmp_path / "log.csv"
    wrapped = kd.callbacks.ChiefOnly(keras.callbacks.CSVLogger(str(path)),
                                     task=_task(0))
    _fit([wrapped])
    assert len(list(csv.DictReader(path.open()))) == 2
    assert wrapped.temp_dir is None


def test_chief_verbose(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(kd.cluster.make_tf_config(
        ["127.0.0.1:1", "127.0.0.1:2"], 1)))
    assert kd.callbacks.chief_verbose(2) == 0
    monkeypatch.setenv("TF_CONFIG", json.dumps(kd.cluster.make_tf_config(
        ["127.0.0.1:1", "127.0.0.1:2"], 0)))
    assert kd.callbacks.chief_verbose(2) == 2


def test_run_summary_on_chief():
    lines = []
    summary = kd.callbacks.RunSummary(print_fn=lines.append)
    _fit([summary])
    assert summary.summary["epochs"] == 2 and summary.summary["steps"] == 4
    assert "epochs=2 steps=4" in lines[0] and "final: loss=" in lines[0]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="Expected a keras.callbacks"):
        kd.callbacks.ChiefOnly("not a callback")
    with pytest.raises(ValueError, match="mode='never'"):
        kd.callbacks.ChiefOnly(keras.callbacks.History(), mode="never")
    with pytest.raises(ValueError, match="path_attrs"):
        kd.callbacks.ChiefOnly(keras.callbacks.History(), mode="temp_dir")
    with pytest.raises(ValueError, match="is not a path"):
        kd.callbacks.ChiefOnly(keras.callbacks.History(),
                               path_attrs=["model"])

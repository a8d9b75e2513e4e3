"""kd.callbacks.BackupAndRestore in one process: bad inputs, step-exact
resume, rotation, fallback, model mismatch, SIGTERM.

An interruption is an exception raised from a callback after a given step
(what a crash looks like to `fit`); the resumed run is a new model and a new
`fit` in the same process, as after a restart. Multi-worker behaviour is
covered with real processes in test_launch.py.
"""

import os
import signal
import warnings

import fault_worker as fw
import numpy as np
import pytest
from absl.testing import parameterized

import kerasdist as kd


def _fit(tmp_path, name, strategy=None, *, backup=None, on_step=None,
         epochs=3, hidden=16, restart=0, monkeypatch=None):
    """One `fit` of the deterministic job; returns (model, history)."""
    if monkeypatch is not None:
        monkeypatch.setenv("KERASDIST_RESTART_COUNT", str(restart))
    replicas = strategy.num_replicas_in_sync if strategy else 1
    callbacks = [fw.step_log_callback(
        str(tmp_path / f"{name}.jsonl"), replicas, on_step)]
    if backup is not None:
        callbacks.append(backup)
    with kd.scope_or_null(strategy):
        model = fw.build_model(hidden)
    history = model.fit(fw.make_dataset(strategy), epochs=epochs, verbose=0,
                        callbacks=callbacks)
    return model, history


class BadArgumentsTest(parameterized.TestCase):
    @parameterized.parameters(True, False, 0, -4, 2.5, "batch", None, "1")
    def test_rejects_save_freq(self, save_freq):
        with self.assertRaisesRegex(
            ValueError,
            r"Invalid value for argument `save_freq`. Received: "
            rf"save_freq={save_freq!r}\. Expected either 'epoch', 'auto' "
            r"or a positive integer",
        ):
            kd.callbacks.BackupAndRestore("/tmp/x", save_freq=save_freq)

    @parameterized.parameters(0, -1, True, 1.0)
    def test_rejects_keep(self, keep):
        with self.assertRaisesRegex(
            ValueError, rf"`keep`. Received: keep={keep!r}"
        ):
            kd.callbacks.BackupAndRestore("/tmp/x", keep=keep)

    def test_rejects_empty_dir(self):
        with self.assertRaisesRegex(ValueError, r"backup_dir=''"):
            kd.callbacks.BackupAndRestore("")

    def test_accepts_good_values(self):
        cb = kd.callbacks.BackupAndRestore("/tmp/x", save_freq=3, keep=1)
        self.assertEqual((cb.save_freq, cb.keep), (3, 1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted run without a strategy: weights, steps, history."""
    path = tmp_path_factory.mktemp("reference")
    model, history = _fit(path, "ref")
    return model.get_weights(), fw.read_steps(str(path / "ref.jsonl")), (
        history.history
    )


@pytest.mark.timeout(120)
def test_resumes_at_the_exact_step(tmp_path, reference, monkeypatch):
    backup_dir = tmp_path / "backup"
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", backup=kd.callbacks.BackupAndRestore(
            backup_dir, save_freq=5), on_step=fw.interrupt_at(1, 7))
    model, history = _fit(
        tmp_path, "run", restart=1, monkeypatch=monkeypatch,
        backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=5))
    ref_weights, ref_steps, ref_history = reference
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    # Backup at global step 15 = epoch 2, step 3: resumed there.
    resumed = next(r for r in steps if r["attempt"] == 1)
    assert (resumed["epoch"], resumed["step"]) == (1, 3)
    assert fw.retrained(steps) == 5  # steps 3..7 of epoch 2: < save_freq
    assert fw.fingerprints(fw.lineage(steps)) == fw.fingerprints(ref_steps)
    fw.assert_weights_equal(model.get_weights(), ref_weights)
    # fit's history starts at the interrupted epoch, and that epoch's
    # metrics include the steps trained before the interruption.
    assert history.epoch == [1, 2]
    np.testing.assert_allclose(history.history["loss"],
                               ref_history["loss"][1:], rtol=1e-6)
    np.testing.assert_allclose(history.history["accuracy"],
                               ref_history["accuracy"][1:], rtol=1e-6)


@pytest.mark.timeout(120)
def test_resumes_at_the_exact_step_under_mirrored(tmp_path, monkeypatch):
    strategy = kd.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    ref_model, _ = _fit(tmp_path, "ref", strategy)
    backup_dir = tmp_path / "backup"
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", strategy, on_step=fw.interrupt_at(2, 1),
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=4))
    model, history = _fit(
        tmp_path, "run", strategy, restart=1, monkeypatch=monkeypatch,
        backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=4))
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    ref_steps = fw.read_steps(str(tmp_path / "ref.jsonl"))
    resumed = next(r for r in steps if r["attempt"] == 1)
    assert (resumed["epoch"], resumed["step"]) == (2, 0)  # global step 24
    assert fw.fingerprints(fw.lineage(steps)) == fw.fingerprints(ref_steps)
    fw.assert_weights_equal(model.get_weights(), ref_model.get_weights())
    # The backup was taken after the last step of epoch 2, before its end
    # (epoch 2 is reported again, with its metrics, then epoch 3 trains).
    assert history.epoch == [1, 2]


@pytest.mark.timeout(120)
def test_epoch_freq_keeps_last_backups_and_finished_run_is_not_redone(
    tmp_path, reference, monkeypatch
):
    backup_dir = tmp_path / "backup"
    cb = kd.callbacks.BackupAndRestore(backup_dir, keep=2)
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", backup=cb, on_step=fw.interrupt_at(2, 4))
    names = sorted(n for n in os.listdir(backup_dir) if n.startswith("ckpt"))
    assert names == ["ckpt-000000000012.npz", "ckpt-000000000024.npz"]
    model, history = _fit(
        tmp_path, "run", restart=1, monkeypatch=monkeypatch,
        backup=kd.callbacks.BackupAndRestore(backup_dir, keep=2))
    assert history.epoch == [2]
    fw.assert_weights_equal(model.get_weights(), reference[0])
    # Running the finished job again restores the end state and trains
    # nothing (e.g. a group restarted after fit returned).
    again, history = _fit(
        tmp_path, "again", restart=2, monkeypatch=monkeypatch,
        backup=kd.callbacks.BackupAndRestore(backup_dir, keep=2))
    assert history.epoch == []
    assert not os.path.exists(tmp_path / "again.jsonl")
    fw.assert_weights_equal(again.get_weights(), reference[0])


@pytest.mark.timeout(120)
def test_unreadable_newest_backup_falls_back_with_warning(
    tmp_path, reference, monkeypatch
):
    backup_dir = tmp_path / "backup"
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", on_step=fw.interrupt_at(1, 11),
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=5))
    newest = backup_dir / "ckpt-000000000020.npz"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # torn write
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = _fit(
            tmp_path, "run", restart=1, monkeypatch=monkeypatch,
            backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=5))
    messages = [str(w.message) for w in caught]
    assert any(
        "ckpt-000000000020.npz is unreadable" in m
        and "falling back to the previous one" in m for m in messages
    ), messages
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    resumed = next(r for r in steps if r["attempt"] == 1)
    assert (resumed["epoch"], resumed["step"]) == (1, 3)  # global step 15
    assert fw.fingerprints(fw.lineage(steps)) == fw.fingerprints(reference[1])
    fw.assert_weights_equal(model.get_weights(), reference[0])


@pytest.mark.timeout(120)
def test_rejects_backup_of_a_different_model(tmp_path):
    backup_dir = tmp_path / "backup"
    _fit(tmp_path, "a", epochs=1,
         backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=4))
    with pytest.raises(
        kd.callbacks.BackupMismatchError,
        match=r"different model: its model variable '.*kernel' has shape "
        r"\(8, 16\) and dtype float32, but this model's is '.*kernel' with "
        r"shape \(8, 8\)",
    ):
        _fit(tmp_path, "b", hidden=8,
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=4))
    # Raised before any training step.
    assert not os.path.exists(tmp_path / "b.jsonl")


@pytest.mark.timeout(120)
def test_sigterm_saves_at_the_step_and_exits_with_restart_code(
    tmp_path, reference, monkeypatch
):
    def sigterm_at(epoch, step):
        def on_step(e, s):
            if (e, s) == (epoch, step):
                os.kill(os.getpid(), signal.SIGTERM)
        return on_step

    backup_dir = tmp_path / "backup"
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, "run", on_step=sigterm_at(1, 6),
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=50))
    assert exit_info.value.code == kd.launch.RESTART_EXIT_CODE == 75
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    model, _ = _fit(
        tmp_path, "run", restart=1, monkeypatch=monkeypatch,
        backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=50))
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    resumed = next(r for r in steps if r["attempt"] == 1)
    assert (resumed["epoch"], resumed["step"]) == (1, 7)
    assert fw.retrained(steps) == 0
    assert fw.fingerprints(fw.lineage(steps)) == fw.fingerprints(reference[1])
    fw.assert_weights_equal(model.get_weights(), reference[0])

"""Recovery hardening (issue 13, issue 14 point 3), in one process.

Each test interrupts a deterministic job (an exception raised from a
callback, as a crash looks to `fit`), resumes it with a new model and a new
`fit` as after a restart, and compares with the same job never interrupted:
the same weights, and each batch applied exactly once (per-step fingerprint
of the batch's example ids). The multi-worker cases are in
test_recovery_workers.py.
"""

import json
import os
import warnings

import fault_worker as fw
import keras
import numpy as np
import pytest

import kerasdist as kd


def _fit(path, name, *, backup=None, on_step=None, epochs=3, restart=0,
         monkeypatch=None, spe=1, num_examples=fw.NUM_EXAMPLES,
         validation=None, callbacks=(), model=None):
    """One `fit` of the deterministic job; returns (model, history)."""
    if monkeypatch is not None:
        monkeypatch.setenv("KERASDIST_RESTART_COUNT", str(restart))
    cbs = [fw.step_log_callback(str(path / f"{name}.jsonl"), 1, on_step)]
    cbs += list(callbacks)
    if backup is not None:
        cbs.append(backup)
    model = model or fw.build_model(steps_per_execution=spe)
    dataset = fw.make_dataset(None, num_examples)
    validation_data = {
        None: None,
        "same": dataset,
        "separate": fw.make_dataset(None, 64, seed=fw.SEED + 1),
    }[validation]
    history = model.fit(dataset, epochs=epochs, verbose=0, callbacks=cbs,
                        validation_data=validation_data)
    return model, history


def _meta(path):
    with np.load(path) as f:
        return json.loads(str(f["__meta__"]))


def _backups(backup_dir):
    return sorted(n for n in os.listdir(backup_dir) if n.startswith("ckpt-"))


# ----------------------------------------------------------------------
# Defect 1: steps_per_execution with a partial last execution.


@pytest.mark.timeout(240)
@pytest.mark.parametrize("spe", [1, 4])
def test_steps_per_execution_with_partial_last_execution(
    tmp_path, monkeypatch, spe
):
    # 176 examples: 11 batches per epoch, executions of 4, 4 and 3 batches.
    job = dict(spe=spe, num_examples=176)
    ref, ref_history = _fit(tmp_path, "ref", **job)
    ref_steps = fw.read_steps(str(tmp_path / "ref.jsonl"))
    backup_dir = tmp_path / "backup"
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", on_step=fw.interrupt_at(1, 7 if spe == 4 else 9),
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=4),
             **job)
    # The backups name the steps really trained (the optimizer's count).
    for name in _backups(backup_dir):
        meta = _meta(backup_dir / name)
        assert name == f"ckpt-{meta['global_step']:012d}.npz"
        assert meta["global_step"] == 11 * meta["epoch"] + meta["step"]
    model, history = _fit(
        tmp_path, "run", restart=1, monkeypatch=monkeypatch,
        backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=4), **job)
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    assert fw.fingerprints(fw.lineage(steps)) == fw.fingerprints(ref_steps)
    fw.assert_weights_equal(model.get_weights(), ref.get_weights())
    assert int(model.optimizer.iterations.numpy()) == 33
    np.testing.assert_allclose(history.history["loss"],
                               ref_history.history["loss"][1:], rtol=1e-6)


# ----------------------------------------------------------------------
# Defect 2: validation on the same reshuffling dataset, and a separate one.


@pytest.mark.timeout(240)
@pytest.mark.parametrize("validation", ["same", "separate"])
def test_validation_data_resumes_exactly(tmp_path, monkeypatch, validation):
    ref, ref_history = _fit(tmp_path, "ref", validation=validation)
    ref_steps = fw.read_steps(str(tmp_path / "ref.jsonl"))
    backup_dir = tmp_path / "backup"
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", on_step=fw.interrupt_at(2, 7),
             validation=validation,
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=5))
    model, history = _fit(
        tmp_path, "run", restart=1, monkeypatch=monkeypatch,
        validation=validation,
        backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=5))
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    resumed = next(r for r in steps if r["attempt"] == 1)
    assert (resumed["epoch"], resumed["step"]) == (2, 6)  # global step 30
    assert fw.fingerprints(fw.lineage(steps)) == fw.fingerprints(ref_steps)
    fw.assert_weights_equal(model.get_weights(), ref.get_weights())
    np.testing.assert_allclose(history.history["val_loss"],
                               ref_history.history["val_loss"][2:],
                               rtol=1e-6)


@pytest.mark.timeout(240)
def test_validation_on_training_dataset_under_a_strategy_is_refused(tmp_path):
    # Keras distributes the dataset into separate training and validation
    # wrappers; their interplay with the shuffle order cannot be replayed,
    # so the run is refused before its first step instead of resuming on
    # other batches.
    import tensorflow as tf

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = fw.build_model()
    dataset = fw.make_dataset(strategy)
    log = tmp_path / "steps.jsonl"
    with pytest.raises(
        kd.callbacks.backup_and_restore.BackupConfigError,
        match=r"Invalid value for argument `validation_data` of `fit`: it "
        r"is the training dataset itself .* under OneDeviceStrategy\. .* "
        r"Pass a separate validation dataset",
    ):
        model.fit(dataset, epochs=1, verbose=0, validation_data=dataset,
                  callbacks=[fw.step_log_callback(str(log)),
                             kd.callbacks.BackupAndRestore(tmp_path / "b")])
    assert not log.exists()


# ----------------------------------------------------------------------
# Defect 3: a backup taken at the last step of an epoch.


class _FailAtEpochEnd(keras.callbacks.Callback):
    """Raises at the end of `epoch` (after the step-12 backup was written)
    and reads `logs["loss"]` like many user callbacks do."""

    def __init__(self, epoch=None):
        super().__init__()
        self.epoch = epoch
        self.losses = []

    def on_epoch_end(self, epoch, logs=None):
        self.losses.append(float(logs["loss"]))  # KeyError on empty logs
        if epoch == self.epoch:
            raise fw.Interrupted()


@pytest.mark.timeout(240)
def test_resume_from_last_step_of_epoch_has_real_epoch_logs(
    tmp_path, monkeypatch
):
    ref, ref_history = _fit(tmp_path, "ref")
    backup_dir = tmp_path / "backup"
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", callbacks=[_FailAtEpochEnd(0)],
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=12))
    assert _meta(backup_dir / _backups(backup_dir)[-1])["step"] == 12
    reader = _FailAtEpochEnd()
    model, history = _fit(
        tmp_path, "run", restart=1, monkeypatch=monkeypatch,
        callbacks=[reader],
        backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=12))
    assert history.epoch == [0, 1, 2]
    np.testing.assert_allclose(history.history["loss"],
                               ref_history.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(reader.losses, ref_history.history["loss"],
                               rtol=1e-6)
    fw.assert_weights_equal(model.get_weights(), ref.get_weights())


# ----------------------------------------------------------------------
# Defect 4: every kept backup unreadable, then two more failures.


@pytest.mark.timeout(240)
def test_all_backups_corrupt_then_two_kills(tmp_path, monkeypatch):
    ref, _ = _fit(tmp_path, "ref")
    ref_steps = fw.read_steps(str(tmp_path / "ref.jsonl"))
    backup_dir = tmp_path / "backup"

    def backup():
        return kd.callbacks.BackupAndRestore(backup_dir, save_freq=5, keep=2)

    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", on_step=fw.interrupt_at(2, 11), backup=backup())
    assert _backups(backup_dir) == ["ckpt-000000000030.npz",
                                    "ckpt-000000000035.npz"]
    for name in _backups(backup_dir):
        (backup_dir / name).write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(fw.Interrupted):
            _fit(tmp_path, "run", on_step=fw.interrupt_at(0, 7), restart=1,
                 monkeypatch=monkeypatch, backup=backup())
    assert any("no backup in" in str(w.message) for w in caught)
    # The backup at step 5 survived rotation despite the corrupt "newer"
    # ones, so the next restart loses at most save_freq steps.
    assert "ckpt-000000000005.npz" in _backups(backup_dir)
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", on_step=fw.interrupt_at(1, 5), restart=2,
             monkeypatch=monkeypatch, backup=backup())
    model, _ = _fit(tmp_path, "run", restart=3, monkeypatch=monkeypatch,
                    backup=backup())
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    starts = [next(r for r in steps if r["attempt"] == a) for a in (2, 3)]
    assert [(r["epoch"], r["step"]) for r in starts] == [(0, 5), (1, 3)]
    assert fw.fingerprints(fw.lineage(steps)) == fw.fingerprints(ref_steps)
    fw.assert_weights_equal(model.get_weights(), ref.get_weights())


# ----------------------------------------------------------------------
# Defect 6 and issue 14 point 3: finished runs and re-used directories.


def _early_stopping():
    # Stops once the loss improves by less than 0.2 in an epoch: after 3 of
    # the 8 epochs for this job.
    return keras.callbacks.EarlyStopping(monitor="loss", min_delta=0.2,
                                         patience=1)


@pytest.mark.timeout(240)
def test_rerun_after_early_stopping_trains_no_more(tmp_path, monkeypatch):
    backup_dir = tmp_path / "backup"
    first, history = _fit(
        tmp_path, "run", epochs=8, callbacks=[_early_stopping()],
        backup=kd.callbacks.BackupAndRestore(backup_dir))
    assert len(history.epoch) < 8
    # The script failed after fit (or the group was restarted): run again.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again, history = _fit(
            tmp_path, "again", epochs=8, restart=1, monkeypatch=monkeypatch,
            callbacks=[_early_stopping()],
            backup=kd.callbacks.BackupAndRestore(backup_dir))
    assert history.epoch == []
    assert not os.path.exists(tmp_path / "again.jsonl")
    fw.assert_weights_equal(again.get_weights(), first.get_weights())
    assert any(
        f"backup in {str(backup_dir)!r} says training finished" in
        str(w.message) and "nothing to train" in str(w.message)
        for w in caught
    ), [str(w.message) for w in caught]


@pytest.mark.timeout(240)
def test_two_fits_of_fresh_models_with_the_same_dir_both_train(tmp_path):
    # The flow of TF's multi-worker tutorial: consecutive cells, each
    # building a fresh model and fitting it with the same backup dir.
    backup_dir = tmp_path / "backup"
    first, _ = _fit(tmp_path, "first", epochs=2,
                    backup=kd.callbacks.BackupAndRestore(backup_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second, history = _fit(
            tmp_path, "second", epochs=2,
            backup=kd.callbacks.BackupAndRestore(backup_dir))
    assert history.epoch == [0, 1]
    assert len(fw.read_steps(str(tmp_path / "second.jsonl"))) == 24
    fw.assert_weights_equal(second.get_weights(), first.get_weights())
    assert any("starts a new run" in str(w.message) for w in caught), [
        str(w.message) for w in caught]


@pytest.mark.timeout(240)
def test_delete_on_finish_removes_the_backups(tmp_path):
    backup_dir = tmp_path / "backup"
    _fit(tmp_path, "first", epochs=1, backup=kd.callbacks.BackupAndRestore(
        backup_dir, save_freq=4, delete_on_finish=True))
    assert not os.path.exists(backup_dir)


# ----------------------------------------------------------------------
# The state of other callbacks.


@pytest.mark.timeout(240)
def test_resumed_run_with_stateful_callbacks_equals_unfailed_run(
    tmp_path, monkeypatch
):
    def callbacks():
        return [
            keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5,
                                              min_delta=0.45, patience=0),
            _early_stopping(),
        ]

    ref_cbs = callbacks()
    ref, ref_history = _fit(tmp_path, "ref", epochs=8, callbacks=ref_cbs)
    stopped = ref_cbs[1].stopped_epoch
    assert 2 <= stopped < 7
    backup_dir = tmp_path / "backup"
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", epochs=8, callbacks=callbacks(),
             on_step=fw.interrupt_at(stopped, 5),
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=4))
    cbs = callbacks()
    model, history = _fit(
        tmp_path, "run", epochs=8, restart=1, monkeypatch=monkeypatch,
        callbacks=cbs,
        backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=4))
    assert cbs[1].stopped_epoch == stopped
    assert history.epoch[-1] == stopped
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    assert fw.fingerprints(fw.lineage(steps)) == fw.fingerprints(
        fw.read_steps(str(tmp_path / "ref.jsonl")))
    fw.assert_weights_equal(model.get_weights(), ref.get_weights())
    np.testing.assert_allclose(
        float(model.optimizer.learning_rate.numpy()),
        float(ref.optimizer.learning_rate.numpy()))


class _Counter(keras.callbacks.Callback):
    """A user callback with state, taking part through get/set_state."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def get_state(self):
        return {"batches": self.batches}

    def set_state(self, state):
        self.batches = state["batches"]


@pytest.mark.timeout(240)
def test_user_callback_state_is_saved_and_restored(tmp_path, monkeypatch):
    backup_dir = tmp_path / "backup"
    with pytest.raises(fw.Interrupted):
        _fit(tmp_path, "run", callbacks=[_Counter()],
             on_step=fw.interrupt_at(1, 7),
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=5))
    counter = _Counter()
    _fit(tmp_path, "run", restart=1, monkeypatch=monkeypatch,
         callbacks=[counter],
         backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=5))
    assert counter.batches == 36  # 15 restored + 21 trained after


# ----------------------------------------------------------------------
# Preemption signals: SIGUSR1 like SIGTERM, and a signal before fit.


@pytest.mark.timeout(240)
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_before_fit_is_acted_on_at_the_first_step(
    tmp_path, monkeypatch, signame
):
    import signal

    from kerasdist.callbacks import _backup_preemption

    ref, _ = _fit(tmp_path, "ref")
    previous = signal.getsignal(getattr(signal, signame))
    backup_dir = tmp_path / "backup"
    # What kd.MultiWorkerMirroredStrategy does when it is created.
    _backup_preemption.record_preemption_signals()
    os.kill(os.getpid(), getattr(signal, signame))  # before fit
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, "run",
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=50))
    assert exit_info.value.code == kd.launch.RESTART_EXIT_CODE
    assert signal.getsignal(getattr(signal, signame)) is previous
    assert _backups(backup_dir) == ["ckpt-000000000001.npz"]
    model, _ = _fit(
        tmp_path, "run", restart=1, monkeypatch=monkeypatch,
        backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=50))
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    assert fw.retrained(steps) == 0
    assert fw.fingerprints(fw.lineage(steps)) == fw.fingerprints(
        fw.read_steps(str(tmp_path / "ref.jsonl")))
    fw.assert_weights_equal(model.get_weights(), ref.get_weights())


@pytest.mark.timeout(240)
def test_sigusr1_during_fit_saves_and_exits_like_sigterm(
    tmp_path, monkeypatch
):
    import signal

    def sigusr1_at(epoch, step):
        def on_step(e, s):
            if (e, s) == (epoch, step):
                os.kill(os.getpid(), signal.SIGUSR1)
        return on_step

    ref, _ = _fit(tmp_path, "ref")
    backup_dir = tmp_path / "backup"
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, "run", on_step=sigusr1_at(1, 6),
             backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=50))
    assert exit_info.value.code == kd.launch.RESTART_EXIT_CODE
    model, _ = _fit(
        tmp_path, "run", restart=1, monkeypatch=monkeypatch,
        backup=kd.callbacks.BackupAndRestore(backup_dir, save_freq=50))
    steps = fw.read_steps(str(tmp_path / "run.jsonl"))
    resumed = next(r for r in steps if r["attempt"] == 1)
    assert (resumed["epoch"], resumed["step"]) == (1, 7)
    assert fw.retrained(steps) == 0
    fw.assert_weights_equal(model.get_weights(), ref.get_weights())


@pytest.mark.timeout(240)
def test_chief_only_passes_the_state_of_the_callback_it_wraps(tmp_path):
    backup_dir = tmp_path / "backup"
    wrapped = _early_stopping()
    _fit(tmp_path, "run", epochs=2, callbacks=[kd.callbacks.ChiefOnly(wrapped)],
         backup=kd.callbacks.BackupAndRestore(backup_dir))
    meta = _meta(backup_dir / _backups(backup_dir)[-1])
    state = meta["callbacks"]["0:EarlyStopping"]
    assert state["best"] == pytest.approx(wrapped.best)
    assert state["wait"] == wrapped.wait

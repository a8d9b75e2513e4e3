"""Multi-worker-safe backups that resume training at the exact step.

Differences from `keras.callbacks.BackupAndRestore` (Keras 3.15):

- every worker runs the same saving code, but only the chief keeps what it
  writes; other workers write to a temporary directory that is deleted (as in
  `tf_keras/distribute/distributed_file_utils.py`). Keras's callback makes
  all workers write the same `latest.weights.h5`, which fails with
  `BlockingIOError: unable to lock file` under MultiWorkerMirroredStrategy;
- each save is one file written aside and renamed into place, so a kill
  mid-save never damages a backup; the last `keep` are kept, and an
  unreadable newest one is skipped with a warning;
- a save taken mid-epoch resumes at that step: the batches already trained
  in the interrupted epoch are read from the input pipeline and dropped
  before training continues, so none is trained twice or lost (Keras resumes
  at the start of the epoch); the epoch's metrics are restored too;
- SIGTERM (preemption) saves at the next step boundary on every worker and
  exits with `kerasdist.launch.RESTART_EXIT_CODE` (Keras 3 dropped
  `save_before_preemption`).

The parts: `_backup_store` (files), `_backup_resume` (the cursor and the
step-exact resume), `_backup_preemption` (signals, agreement, heartbeats).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from typing import Any

import keras
import numpy as np
from absl import logging

from kerasdist import _internals
from kerasdist import cluster as cluster_lib
from kerasdist.callbacks import _backup_preemption
from kerasdist.callbacks import _backup_store as store
from kerasdist.callbacks._backup_resume import Cursor, InputTracker
from kerasdist.callbacks._backup_store import BackupMismatchError
from kerasdist.launch import protocol

__all__ = ["BackupAndRestore", "BackupMismatchError"]


def _check_save_freq(save_freq: Any) -> None:
    if save_freq == "epoch" and isinstance(save_freq, str):
        return
    if isinstance(save_freq, bool) or not isinstance(save_freq, int) or (
        save_freq < 1
    ):
        raise ValueError(
            "Invalid value for argument `save_freq`. "
            f"Received: save_freq={save_freq!r}. "
            "Expected either 'epoch' or a positive integer (steps)."
        )


class BackupAndRestore(keras.callbacks.Callback):
    """Backs up training and resumes it at the exact step after a restart.

    Saves the model's variables, the optimizer state, the metric state and
    the position in training (epoch, step, and the input pipeline's
    position). Every save is atomic; the last `keep` are kept. At the start
    of `fit`, the newest readable backup is restored and training continues
    at the step after it: the epoch counter, the progress bar and the epoch's
    metrics continue where they were, and the batches already trained in
    that epoch are skipped. With a deterministic input pipeline (fixed seeds;
    `reshuffle_each_iteration=True` is fine) the result equals a run that was
    never interrupted.

    Works with no strategy, `kd.MirroredStrategy` and
    `kd.MultiWorkerMirroredStrategy`. Every worker runs the same code (so any
    collective a save needs is joined by all); only the chief keeps the
    backup, other workers write to a temporary directory that is deleted.
    With several workers, `backup_dir` must be on a file system all workers
    see (it is how they find the backup and agree on preemption).

    On SIGTERM, all workers save at the same step boundary (within two steps
    of the signal) and exit with `kerasdist.launch.RESTART_EXIT_CODE` (75),
    which `kerasdist-run` treats as "restart", so no step is lost. Under
    `kerasdist-run` the callback also touches the worker's heartbeat file
    (`KERASDIST_HEARTBEAT_FILE`) about once a second, which is what
    `--timeout` watches.

    The backups are kept after `fit` ends: running the same script again
    (e.g. the launcher restarting a group that failed after `fit`) restores
    the final state and `fit` returns at once. Use a new `backup_dir` for a
    new run.

    Args:
        backup_dir: str or path. Directory for the backups; created if
            missing. Use it for one training run only.
        save_freq: `"epoch"` or int. `"epoch"` saves at the end of every
            epoch; an integer `n` saves every `n` training steps (counted
            over the whole run, across restarts). Defaults to `"epoch"`.
        keep: int. How many of the newest backups to keep, at least 1. With
            2 or more, an unreadable newest backup falls back to the previous
            one. Defaults to 2.

    Raises:
        ValueError: if `backup_dir` is empty, `save_freq` is neither
            `"epoch"` nor a positive integer (booleans are rejected), or
            `keep` is not a positive integer.

    Example:

    ```python
    strategy = kd.get_strategy()
    with strategy.scope():
        model = build_model()
        model.compile(optimizer="adam", loss="mse")
    model.fit(dataset, epochs=10, callbacks=[
        kd.callbacks.BackupAndRestore("/ckpt/run1", save_freq=200)])
    ```
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike,
        save_freq: str | int = "epoch",
        keep: int = 2,
    ):
        super().__init__()
        if not backup_dir or not isinstance(backup_dir, (str, os.PathLike)):
            raise ValueError(
                "Invalid value for argument `backup_dir`. "
                f"Received: backup_dir={backup_dir!r}. Expected a non-empty "
                "directory path."
            )
        _check_save_freq(save_freq)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(
                "Invalid value for argument `keep`. "
                f"Received: keep={keep!r}. Expected a positive integer."
            )
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.keep = keep
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._task = cluster_lib.TaskInfo()
        self._cursor = Cursor()
        self._saved_at: int | None = None
        self._batch_begin = 0
        self._tracker: InputTracker | None = None
        self._resume_metrics: list[np.ndarray] | None = None
        self._resume_epoch: int | None = None
        self._preemption: _backup_preemption.Preemption | None = None
        self._heartbeat = _backup_preemption.Heartbeat()

    def _variables(self) -> tuple[list, list, list]:
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        opt_vars = list(optimizer.variables) if optimizer is not None else []
        return list(model.variables), opt_vars, list(model.metrics_variables)

    # ------------------------------------------------------------------
    # Keras hooks.

    def on_train_begin(self, logs=None):
        self._reset_run_state()
        self._task = cluster_lib.from_env()
        model = self.model
        if not model.built:
            raise ValueError(
                "kd.callbacks.BackupAndRestore needs a built model. Model "
                f"{model.name!r} is not built; build it (e.g. with "
                "`keras.Input` or by calling it on a batch) before `fit`."
            )
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            with model.distribute_strategy.scope():
                optimizer.build(model.trainable_variables)
        self._preemption = _backup_preemption.Preemption(
            self.backup_dir, model, self._task.worker_rank,
            self._task.num_workers)
        epoch_iterator = _internals.find_epoch_iterator(model)
        if self._task.is_chief:
            os.makedirs(self.backup_dir, exist_ok=True)
            self._preemption.clear()
            store.remove_temporaries(self.backup_dir)
        meta = self._restore(epoch_iterator)
        saved = Cursor.from_meta(meta) if meta is not None else None
        if epoch_iterator is not None:
            self._tracker = InputTracker(epoch_iterator, self._cursor)
            self._tracker.install(saved, self.backup_dir)
        elif saved is not None and saved.step > 0:
            warnings.warn(
                "kd.callbacks.BackupAndRestore could not find the training "
                "loop's input iterator (it needs the TensorFlow trainer's "
                "`fit`), so the interrupted epoch restarts from its first "
                "batch and some batches are trained twice.",
                stacklevel=2,
            )
        self._preemption.install()
        self._heartbeat.start()

    def on_epoch_begin(self, epoch, logs=None):
        self._cursor.epoch = epoch
        self._cursor.step = 0
        if self._resume_epoch == epoch and self._resume_metrics is not None:
            # `fit` reset the metrics just before this hook; put back the
            # part of the epoch trained before the interruption.
            for v, value in zip(
                self._variables()[2], self._resume_metrics, strict=True
            ):
                v.assign(value)
        self._resume_metrics = None
        self._resume_epoch = None

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_begin = batch

    def on_train_batch_end(self, batch, logs=None):
        steps = batch - self._batch_begin + 1
        self._cursor.advance(steps)
        self._cursor.step = batch + 1
        self._heartbeat.beat()
        global_step = self._cursor.global_step
        if isinstance(self.save_freq, int) and (
            global_step // self.save_freq
            > (global_step - steps) // self.save_freq
        ):
            self._save()
        if self._preemption.should_stop(global_step, steps):
            self._stop_for_preemption()

    def on_test_batch_end(self, batch, logs=None):
        self._heartbeat.beat()

    def on_epoch_end(self, epoch, logs=None):
        self._cursor.end_epoch(epoch)
        if self.save_freq == "epoch":
            self._save()
        self._heartbeat.beat()

    def on_train_end(self, logs=None):
        if self._saved_at != self._cursor.global_step:
            self._save()  # So a rerun of the script finds training done.
        self._preemption.uninstall()
        if self._tracker is not None:
            self._tracker.uninstall()
            self._tracker = None
        _internals.set_initial_epoch(self.model, None)
        if self._preemption.requested:
            self._exit_for_restart()

    # ------------------------------------------------------------------
    # Saving.

    def _save(self) -> None:
        model_vars, opt_vars, metric_vars = self._variables()
        variables = model_vars + opt_vars + metric_vars
        # Every worker reads every variable, in the same order: reading a
        # sync-on-read variable under MultiWorkerMirroredStrategy is a
        # collective, which all workers must join.
        values = [np.asarray(v.numpy()) for v in variables]
        meta = {
            "format": store.FORMAT_VERSION,
            **self._cursor.to_meta(),
            "num_model": len(model_vars),
            "num_optimizer": len(opt_vars),
            "num_metrics": len(metric_vars),
            "names": [v.path for v in variables],
            "time": time.time(),
        }
        name = store.ckpt_name(self._cursor.global_step)
        if self._task.is_chief:
            os.makedirs(self.backup_dir, exist_ok=True)
            path = os.path.join(self.backup_dir, name)
            store.write_backup(path, meta, values)
            store.rotate(self.backup_dir, self.keep, path)
        else:
            scratch = tempfile.mkdtemp(prefix="kerasdist-backup-worker-")
            try:
                store.write_backup(os.path.join(scratch, name), meta, values)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        self._saved_at = self._cursor.global_step

    # ------------------------------------------------------------------
    # Restoring.

    def _restore(self, epoch_iterator) -> dict | None:
        meta, values = None, None
        paths = store.list_backups(self.backup_dir)
        for path in paths:
            try:
                meta, values = store.read(path)
                break
            except Exception as e:  # any damage: fall back
                warnings.warn(
                    f"kd.callbacks.BackupAndRestore: backup {path} is "
                    f"unreadable ({type(e).__name__}: {e}); falling back to "
                    "the previous one.",
                    stacklevel=2,
                )
        if paths and meta is None:
            warnings.warn(
                "kd.callbacks.BackupAndRestore: no backup in "
                f"{self.backup_dir!r} is readable; training starts from the "
                "beginning.",
                stacklevel=2,
            )
        self._check_same_backup_everywhere(meta)
        if meta is None:
            return None
        model_vars, opt_vars, metric_vars = self._variables()
        store.check_compatible(self.backup_dir, meta, values, [
            (kind, [(v.path, tuple(v.shape), v.dtype) for v in variables])
            for kind, variables in (("model", model_vars),
                                    ("optimizer", opt_vars))
        ])
        n_state = meta["num_model"] + meta["num_optimizer"]
        if meta["step"] > 0 and len(metric_vars) != meta["num_metrics"]:
            _internals.build_metrics_now(self.model, epoch_iterator)
            metric_vars = self._variables()[2]
        for v, value in zip(
            model_vars + opt_vars, values[:n_state], strict=True
        ):
            v.assign(value)
        cursor = Cursor.from_meta(meta)
        self._cursor.epoch = cursor.epoch
        self._cursor.step = cursor.step
        self._cursor.global_step = cursor.global_step
        self._preemption.set_restored_step(cursor.global_step)
        self._saved_at = cursor.global_step
        saved_metrics = values[n_state:]
        if meta["step"] > 0 and [v.shape for v in saved_metrics] == [
            tuple(v.shape) for v in metric_vars
        ]:
            self._resume_epoch = meta["epoch"]
            self._resume_metrics = saved_metrics
        elif meta["step"] > 0:
            warnings.warn(
                "kd.callbacks.BackupAndRestore: the backup's metrics do not "
                "match the model's (was it compiled with other metrics?); "
                "the resumed epoch's metrics count only the steps after the "
                "restart.",
                stacklevel=2,
            )
        _internals.set_initial_epoch(self.model, meta["epoch"])
        if self._task.is_chief:
            logging.info(
                "kerasdist: restored %s: resuming at epoch %d, step %d "
                "(step %d of the run)",
                store.ckpt_name(meta["global_step"]),
                meta["epoch"] + 1,
                meta["step"],
                meta["global_step"],
            )
        return meta

    def _check_same_backup_everywhere(self, meta: dict | None) -> None:
        """With several workers, all must restore the same backup."""
        strategy = self.model.distribute_strategy
        if self._task.num_workers == 1 or not _internals.in_multi_worker_mode(
            strategy
        ):
            return
        import tensorflow as tf

        step = -1 if meta is None else meta["global_step"]
        mine = tf.constant([step, step * step], tf.int64)

        @tf.function
        def total():
            def replica_fn():
                ctx = tf.distribute.get_replica_context()
                return ctx.all_reduce(tf.distribute.ReduceOp.SUM, mine)

            return strategy.run(replica_fn)

        sums = strategy.experimental_local_results(total())[0].numpy()
        n = strategy.num_replicas_in_sync
        # Sum and sum of squares equal n*s and n*s^2 only if all are s.
        if int(sums[0]) != n * step or int(sums[1]) != n * step * step:
            found = store.ckpt_name(step) if step >= 0 else "none"
            raise RuntimeError(
                "kd.callbacks.BackupAndRestore: the workers found different "
                f"backups in {self.backup_dir!r} (this worker found "
                f"{found}). `backup_dir` must be on a file system that every "
                "worker sees (e.g. NFS or a shared volume)."
            )

    # ------------------------------------------------------------------
    # Preemption.

    def _stop_for_preemption(self) -> None:
        if self._saved_at != self._cursor.global_step:
            self._save()
        if self._task.is_chief:
            logging.warning(
                "kerasdist: preempted (SIGTERM); saved at epoch %d, step %d; "
                "exiting with restart code %d",
                self._cursor.epoch + 1,
                self._cursor.step,
                protocol.RESTART_EXIT_CODE,
            )
        self._exit_for_restart()

    def _exit_for_restart(self) -> None:
        self._preemption.uninstall()
        protocol.exit_for_restart()

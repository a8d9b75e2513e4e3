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
- SIGTERM or SIGUSR1 (preemption) saves at the next step boundary on every
  worker and exits through `kerasdist.launch.protocol.exit_for_restart`
  (Keras 3 dropped `save_before_preemption`);
- the state of stateful callbacks (EarlyStopping, ReduceLROnPlateau, ...)
  is saved too, and a finished run is recorded as finished.

The parts: `_backup_store` (files), `_backup_resume` (the cursor and the
step-exact resume), `_backup_preemption` (signals, agreement, heartbeats),
`_callback_state` (other callbacks' state).
"""

from __future__ import annotations

import numbers
import os
import shutil
import tempfile
import time
import warnings
from typing import Any

import keras
import numpy as np
from absl import logging

from kerasdist import _internals, _validate
from kerasdist import cluster as cluster_lib
from kerasdist.callbacks import _backup_preemption, _callback_state
from kerasdist.callbacks import _backup_store as store
from kerasdist.callbacks._backup_resume import Cursor, InputTracker
from kerasdist.callbacks._backup_store import (
    BackupConfigError,
    BackupMismatchError,
)
from kerasdist.launch import protocol

__all__ = ["BackupAndRestore", "BackupConfigError", "BackupMismatchError"]

# Backup directories whose `fit` finished in this process, with the
# launcher's restart count then: a later `fit` with the same directory and
# count is a new run (consecutive cells of a notebook), not a rerun.
_FINISHED_HERE: dict[str, int] = {}


def _check_save_freq(save_freq: Any) -> str | int:
    if isinstance(save_freq, str) and save_freq == "epoch":
        return save_freq
    if isinstance(save_freq, bool) or not isinstance(
        save_freq, numbers.Integral
    ) or save_freq < 1:
        raise BackupConfigError(
            "Invalid value for argument `save_freq`. "
            f"Received: save_freq={save_freq!r}. "
            "Expected either 'epoch' or a positive integer (steps)."
        )
    return int(save_freq)


class _EpochLogs(keras.callbacks.Callback):
    """Runs first at each epoch end: gives an epoch whose every step was
    trained before the restart its real metrics (fit passes `{}` when no
    step ran in this attempt)."""

    def __init__(self, owner: BackupAndRestore):
        super().__init__()
        self.owner = owner

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.owner._steps_this_epoch == 0 and (
            self.owner._resumed_epoch == epoch
        ):
            results = self.model.get_metrics_result()
            logs.update({k: v for k, v in results.items() if k not in logs})


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

    On SIGTERM or SIGUSR1 (`kerasdist.launch.protocol.PREEMPTION_SIGNALS`),
    also one received after a `kd.MultiWorkerMirroredStrategy` was created
    and before `fit` started, all workers save at the same step boundary
    (within two steps of the signal) and leave through
    `kerasdist.launch.protocol.exit_for_restart()` (exit code 75 under
    `kerasdist-run`, which restarts them), so no step is lost. Under
    `kerasdist-run` the callback also touches the worker's heartbeat file
    (`KERASDIST_HEARTBEAT_FILE`) about once a second, which is what
    `--timeout` watches.

    The state of stateful callbacks of the same `fit` is saved and restored
    too: Keras's `EarlyStopping`, `ReduceLROnPlateau` and `ModelCheckpoint`,
    and any callback with `get_state() -> dict` and `set_state(dict)` (a
    JSON-able dict).

    When `fit` ends (all epochs, or stopped early), the last backup records
    that training finished. Running the same script again (e.g. the launcher
    restarting a group that failed after `fit`) restores the final state
    and `fit` returns at once, with a warning saying so; asking for more
    epochs than the finished run had continues training. A second `fit`
    with the same `backup_dir` in the same process (consecutive notebook
    cells) starts a new run, with a warning, and replaces the backups. With
    `delete_on_finish=True` the backups are deleted when `fit` ends, as
    Keras's `delete_checkpoint=True` does, and a rerun trains again.

    Args:
        backup_dir: str or path. Directory for the backups; created if
            missing. Use it for one training run only. A local or mounted
            file system path (URLs such as `gs://` are refused).
        save_freq: `"epoch"` or int. `"epoch"` saves at the end of every
            epoch; an integer `n` saves every `n` training steps (counted
            over the whole run, across restarts). Defaults to `"epoch"`.
        keep: int. How many of the newest backups to keep, at least 1. With
            2 or more, an unreadable newest backup falls back to the previous
            one. Defaults to 2.
        delete_on_finish: bool. Delete the backups when `fit` ends without
            an error. Defaults to False (keep them, so a rerun of a
            finished job does not train again).

    Raises:
        BackupConfigError: (a `ValueError` and a
            `kerasdist.errors.PermanentError`) if `backup_dir` is blank or
            a URL, `save_freq` is neither `"epoch"` nor a positive integer
            (booleans are rejected), or `keep` is not a positive integer;
            at the start of `fit`, if `backup_dir` cannot be created or
            written, or the backup was made with another
            `steps_per_execution`.
        BackupMismatchError: at the start of `fit`, if the backup was made
            by a different model.

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
        delete_on_finish: bool = False,
    ):
        super().__init__()
        self.backup_dir = store.check_path(backup_dir)
        self.save_freq = _check_save_freq(save_freq)
        try:
            self.keep = _validate.check_int("keep", keep)
        except ValueError as e:
            raise BackupConfigError(str(e)) from None
        self.delete_on_finish = bool(delete_on_finish)
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._task = cluster_lib.TaskInfo()
        self._cursor = Cursor()
        self._saved_at: int | None = None
        self._batch_begin = 0
        self._iterations = None
        self._steps_this_epoch = 0
        self._returned_at_once = False
        self._resumed_epoch: int | None = None
        self._tracker: InputTracker | None = None
        self._resume_metrics: list[np.ndarray] | None = None
        self._callbacks: list = []
        self._callback_states: tuple[dict, list] | None = None
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
        # Record preemption signals before the (slow) restore.
        self._preemption = _backup_preemption.Preemption(
            self.backup_dir, model, self._task.worker_rank,
            self._task.num_workers)
        self._preemption.install()
        try:
            self._begin(model)
        except BaseException:
            self._preemption.uninstall()  # `fit` will not call on_train_end
            raise

    def _begin(self, model) -> None:
        """Checks the directory, restores, prepares the step-exact resume."""
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
        epoch_iterator = _internals.find_epoch_iterator(model)
        self._take_callback_order()
        new_run = self._is_new_run_in_this_process()
        if self._task.is_chief:
            store.check_writable(self.backup_dir)
            self._preemption.clear()
            store.remove_temporaries(self.backup_dir)
        meta = self._restore(epoch_iterator, check_only=new_run)
        if new_run and self._task.is_chief:
            store.delete_all(self.backup_dir)
            os.makedirs(self.backup_dir, exist_ok=True)
        saved = Cursor.from_meta(meta) if meta is not None else None
        if epoch_iterator is not None:
            self._tracker = InputTracker(epoch_iterator, self._cursor)
            self._tracker.install(saved, self.backup_dir,
                                  meta.get("steps_per_execution") if meta
                                  else None)
        elif saved is not None and saved.step > 0:
            warnings.warn(
                "kd.callbacks.BackupAndRestore could not find the training "
                "loop's input iterator (it needs the TensorFlow trainer's "
                "`fit`), so the interrupted epoch restarts from its first "
                "batch and some batches are trained twice.",
                stacklevel=2,
            )
        if meta is not None and meta.get("finished"):
            self._finish_or_extend(meta)
        self._heartbeat.start()

    def on_epoch_begin(self, epoch, logs=None):
        self._cursor.epoch = epoch
        self._steps_this_epoch = 0
        if self._resumed_epoch != epoch:
            self._cursor.step = 0
        if self._resume_metrics is not None and self._resumed_epoch == epoch:
            # `fit` reset the metrics just before this hook; put back the
            # part of the epoch trained before the interruption.
            for v, value in zip(
                self._variables()[2], self._resume_metrics, strict=True
            ):
                v.assign(value)
        self._resume_metrics = None
        if self._callback_states is not None:
            # After every callback's on_train_begin (which resets them).
            _callback_state.restore(self._callbacks, *self._callback_states)
            self._callback_states = None

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_begin = batch

    def on_train_batch_end(self, batch, logs=None):
        steps = self._steps_done(self._batch_begin, batch)
        self._cursor.advance(steps)
        self._cursor.step = self._batch_begin + steps
        self._steps_this_epoch += steps
        self._heartbeat.beat()
        global_step = self._cursor.global_step
        if isinstance(self.save_freq, int) and (
            global_step // self.save_freq
            > (global_step - steps) // self.save_freq
        ):
            self._save()
        if self._preemption.should_stop(global_step, steps):
            self._stop_for_preemption()

    def on_test_begin(self, logs=None):
        if self._tracker is not None:
            self._tracker.track_evaluation(
                _internals.eval_epoch_iterator(self.model))

    def on_test_batch_end(self, batch, logs=None):
        self._heartbeat.beat()

    def on_epoch_end(self, epoch, logs=None):
        self._cursor.end_epoch(epoch)
        self._resumed_epoch = None
        if self.save_freq == "epoch":
            self._save()
        self._heartbeat.beat()

    def on_train_end(self, logs=None):
        if not self._returned_at_once:
            self._save(finished=True)  # A rerun of the script trains no more.
        self._preemption.uninstall()
        if self._tracker is not None:
            self._tracker.uninstall()
            self._tracker = None
        _internals.set_initial_epoch(self.model, None)
        _FINISHED_HERE[os.path.realpath(self.backup_dir)] = (
            protocol.restart_count())
        if self.delete_on_finish and self._task.is_chief:
            store.delete_all(self.backup_dir)
        if self._preemption.requested:
            self._exit_for_restart()

    # ------------------------------------------------------------------
    # Steps, callbacks and finished runs.

    def _steps_done(self, begin: int, end: int) -> int:
        """Steps the last execution really trained.

        The last execution of an epoch trains fewer than
        `steps_per_execution` steps when the epoch's size is not a multiple
        of it, but Keras reports the full range.
        """
        nominal = end - begin + 1
        if nominal == 1:
            return 1
        size = (self.params or {}).get("steps")
        if size:
            return max(min(end, size - 1) - begin + 1, 0)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None or getattr(
            optimizer, "gradient_accumulation_steps", None
        ):
            return nominal
        # Unknown epoch size: the optimizer counts the steps applied.
        iterations = int(optimizer.iterations.numpy())
        previous, self._iterations = self._iterations, iterations
        if previous is None:
            previous = iterations - nominal
        done = iterations - previous
        return done if 0 < done <= nominal else nominal

    def _take_callback_order(self) -> None:
        """Runs this callback last (so a save at an epoch end sees the
        other callbacks' state after that epoch) and `_EpochLogs` first."""
        callback_list = _internals.fit_local(self.model, "callbacks")
        if callback_list is None or not hasattr(callback_list, "callbacks"):
            return
        others = [c for c in callback_list.callbacks
                  if c is not self and not isinstance(c, _EpochLogs)]
        filler = _EpochLogs(self)
        filler.set_model(self.model)
        # A new list: Keras is iterating the old one right now.
        callback_list.callbacks = [filler, *others, self]
        self._callbacks = others

    def _is_new_run_in_this_process(self) -> bool:
        finished = _FINISHED_HERE.pop(os.path.realpath(self.backup_dir), None)
        if finished is None or finished != protocol.restart_count():
            return False
        warnings.warn(
            "kd.callbacks.BackupAndRestore: a `fit` with backup_dir "
            f"{self.backup_dir!r} already finished in this process; this "
            "`fit` starts a new run and replaces its backups. Use a new "
            "`backup_dir` for each run to keep them.",
            stacklevel=3,
        )
        return True

    def _finish_or_extend(self, meta: dict) -> None:
        epochs = int((self.params or {}).get("epochs") or 0)
        done = int(meta["epoch"])
        if not meta.get("stopped_early") and epochs > int(meta["epochs"]):
            return  # More epochs than the finished run: train them.
        message = (
            f"kd.callbacks.BackupAndRestore: the backup in "
            f"{self.backup_dir!r} says training finished (fit ended after "
            f"epoch {done} of {meta['epochs']}"
            f"{', stopped early' if meta.get('stopped_early') else ''}); "
            "nothing to train, so fit returns at once with the final "
            "weights. This is right for a rerun of a finished job; to train "
            "a new model, use a new `backup_dir`, delete this one, or pass "
            "delete_on_finish=True."
        )
        warnings.warn(message, stacklevel=3)
        if self._task.is_chief:
            logging.warning("kerasdist: %s", message)
        _internals.set_initial_epoch(self.model, max(epochs, done))
        self._returned_at_once = True

    # ------------------------------------------------------------------
    # Saving.

    def _save(self, finished: bool = False) -> None:
        model_vars, opt_vars, metric_vars = self._variables()
        variables = model_vars + opt_vars + metric_vars
        # Every worker reads every variable, in the same order: reading a
        # sync-on-read variable under MultiWorkerMirroredStrategy is a
        # collective, which all workers must join.
        values = [np.asarray(v.numpy()) for v in variables]
        states, arrays = _callback_state.collect(self._callbacks)
        epochs = int((self.params or {}).get("epochs") or 0)
        meta = {
            "format": store.FORMAT_VERSION,
            **self._cursor.to_meta(),
            "num_model": len(model_vars),
            "num_optimizer": len(opt_vars),
            "num_metrics": len(metric_vars),
            "names": [v.path for v in variables],
            "callbacks": states,
            "steps_per_execution": self._steps_per_execution(),
            "time": time.time(),
        }
        if finished:
            meta.update(finished=True, epochs=epochs,
                        stopped_early=self._cursor.epoch < epochs)
        values += arrays
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

    def _steps_per_execution(self) -> int:
        if self._tracker is not None:
            return self._tracker.steps_per_execution
        return int(getattr(self.model, "steps_per_execution", 1) or 1)

    # ------------------------------------------------------------------
    # Restoring.

    def _restore(self, epoch_iterator, check_only: bool = False
                 ) -> dict | None:
        """Restores the newest readable backup; returns its metadata.

        With `check_only`, only checks that it fits the model.
        """
        meta, values = None, None
        paths = store.list_backups(self.backup_dir)
        unreadable = []
        for path in paths:
            try:
                meta, values = store.read(path)
                break
            except Exception as e:  # any damage: fall back
                unreadable.append(path)
                warnings.warn(
                    f"kd.callbacks.BackupAndRestore: backup {path} is "
                    f"unreadable ({type(e).__name__}: {e}); falling back to "
                    "the previous one.",
                    stacklevel=3,
                )
        if paths and meta is None:
            warnings.warn(
                "kd.callbacks.BackupAndRestore: no backup in "
                f"{self.backup_dir!r} is readable; training starts from the "
                "beginning.",
                stacklevel=3,
            )
        self._check_same_backup_everywhere(meta)
        if self._task.is_chief:
            # Unreadable backups newer than the one restored: set aside, so
            # rotation never prefers them to the backups written from now.
            for path in unreadable:
                store.set_aside(path)
        if meta is None:
            return None
        model_vars, opt_vars, metric_vars = self._variables()
        store.check_compatible(self.backup_dir, meta, values, [
            (kind, [(v.path, tuple(v.shape), v.dtype) for v in variables])
            for kind, variables in (("model", model_vars),
                                    ("optimizer", opt_vars))
        ])
        if check_only:
            return None
        n_state = meta["num_model"] + meta["num_optimizer"]
        n_values = len(meta["names"])
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
        self._callback_states = (meta.get("callbacks", {}),
                                 values[n_values:])
        saved_metrics = values[n_state:n_values]
        if meta["step"] > 0:
            self._resumed_epoch = meta["epoch"]
            if [v.shape for v in saved_metrics] == [
                tuple(v.shape) for v in metric_vars
            ]:
                self._resume_metrics = saved_metrics
            else:
                warnings.warn(
                    "kd.callbacks.BackupAndRestore: the backup's metrics do "
                    "not match the model's (was it compiled with other "
                    "metrics?); the resumed epoch's metrics count only the "
                    "steps after the restart.",
                    stacklevel=3,
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
                "kerasdist: preempted (%s); saved at epoch %d, step %d; "
                "leaving to be restarted",
                self._preemption.signal_name or "signal",
                self._cursor.epoch + 1,
                self._cursor.step,
            )
        self._exit_for_restart()

    def _exit_for_restart(self) -> None:
        self._preemption.uninstall()
        protocol.exit_for_restart()

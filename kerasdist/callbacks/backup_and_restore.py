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

import dataclasses
import numbers
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from absl import logging

from kerasdist import _internals, _validate, elastic
from kerasdist import cluster as cluster_lib
from kerasdist import data as data_lib
from kerasdist.callbacks import _backup_interval as interval_lib
from kerasdist.callbacks import _backup_preemption, _callback_state
from kerasdist.callbacks import _backup_restore as restore_lib
from kerasdist.callbacks import _backup_store as store
from kerasdist.callbacks._backup_resume import (
    Cursor,
    EpochLogs,
    InputTracker,
    run_last,
    steps_done,
)
from kerasdist.callbacks._backup_store import (
    BackupConfigError,
    BackupMismatchError,
)
from kerasdist.launch import goodput as goodput_lib
from kerasdist.launch import protocol

__all__ = [
    "BackupAndRestore",
    "BackupConfigError",
    "BackupMismatchError",
    "SavedBackup",
]


def _check_save_freq(save_freq: Any) -> str | int:
    if isinstance(save_freq, str) and save_freq in ("epoch", "auto"):
        return save_freq
    if isinstance(save_freq, bool) or not isinstance(
        save_freq, numbers.Integral
    ) or save_freq < 1:
        raise BackupConfigError(
            "Invalid value for argument `save_freq`. "
            f"Received: save_freq={save_freq!r}. "
            "Expected either 'epoch', 'auto' or a positive integer "
            "(steps)."
        )
    return int(save_freq)


@dataclasses.dataclass(frozen=True)
class SavedBackup:
    """One backup just committed, as `BackupAndRestore.on_backup_saved`
    receives it.

    Attributes:
        path: str or None. The backup file (`backup_dir/ckpt-<n>.npz`) on
            the chief; None on the other workers (they write to a
            temporary directory that is deleted).
        epoch: int. The epoch in progress (0-based; after an epoch end,
            the next one).
        step: int. Steps done in that epoch.
        global_step: int. Steps done in the whole run (across restarts).
        updates: int. Optimizer updates done (steps / accumulation steps);
            backups are named by it.
        seconds: float. How long the save took on this worker.
        finished: bool. The last backup of a `fit` that ended.
        preempted: bool. Taken on a preemption signal, before leaving to
            be restarted.
        logs: dict. The logs of the last step (or epoch) before the save.

    Example:

    ```python
    def report(backup: kd.callbacks.SavedBackup) -> None:
        if backup.path is not None:  # the chief
            print(f"step {backup.global_step}: {backup.path}")

    kd.callbacks.BackupAndRestore("/ckpt/run1", 200, on_saved=report)
    ```
    """

    path: str | None
    epoch: int
    step: int
    global_step: int
    updates: int
    seconds: float
    finished: bool = False
    preempted: bool = False
    logs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _RunState:
    """What the callback knows during one `fit` (reset at its start)."""

    task: cluster_lib.TaskInfo = dataclasses.field(
        default_factory=cluster_lib.TaskInfo)
    cursor: Cursor = dataclasses.field(default_factory=Cursor)
    saved_at: int | None = None  # global step of the newest backup
    batch_begin: int = 0
    # Monotonic time the step being trained began: the end of the last
    # step's callbacks (saves excluded), or the first batch's begin.
    step_clock: float | None = None
    iterations: int | None = None
    steps_this_epoch: int = 0
    returned_at_once: bool = False
    resumed_epoch: int | None = None
    tracker: InputTracker | None = None
    resume_metrics: list[np.ndarray] | None = None
    callbacks: list = dataclasses.field(default_factory=list)
    callback_states: tuple[dict, list] | None = None
    preemption: _backup_preemption.Preemption | None = None
    heartbeat: _backup_preemption.Heartbeat = dataclasses.field(
        default_factory=_backup_preemption.Heartbeat)
    restored: Cursor | None = None
    save_pending: bool = False
    stop_pending: bool = False
    logs: dict = dataclasses.field(default_factory=dict)
    clock: interval_lib.RunClock = dataclasses.field(
        default_factory=interval_lib.RunClock)
    auto: interval_lib.AutoInterval | None = None
    facts: interval_lib.Facts = dataclasses.field(
        default_factory=interval_lib.Facts)


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
        save_freq: `"epoch"`, `"auto"` or int. `"epoch"` saves at the end
            of every epoch; an integer `n` saves every `n` training steps
            (counted over the whole run, across restarts); `"auto"` saves
            every `sqrt(2 C M)` seconds of training (Young; Daly's
            refinement), with `C` the measured cost of a save and `M` the
            mean time between failures (see `mtbf`), re-evaluated at every
            save and logged when it changes: the first save comes after
            20 steps, to measure `C`. Saves stay on optimizer-update
            boundaries. Defaults to `"epoch"`.
        keep: int. How many of the newest backups to keep, at least 1. With
            2 or more, an unreadable newest backup falls back to the previous
            one. Defaults to 2.
        delete_on_finish: bool. Delete the backups when `fit` ends without
            an error. Defaults to False (keep them, so a rerun of a
            finished job does not train again).
        mtbf: float, str or None. For `save_freq="auto"`: an estimate of
            the mean time between failures of the whole job, in seconds or
            as `"45s"`, `"30m"`, `"3h"`, `"2d"`. Combined with the
            failures the run has seen (`M = (T + mtbf) / (failures + 1)`
            over the run's wall time `T`). Defaults to None: the
            `KERASDIST_MTBF` environment variable (a launcher may set it),
            else only what the run has seen (`T / failures`; `max(T, 1h)`
            before the first failure).
        on_saved: callable or None. Called with a `kd.callbacks.
            SavedBackup` on every worker right after each backup is
            committed (as `on_backup_saved` is). Defaults to None.

    Raises:
        BackupConfigError: (a `ValueError` and a
            `kerasdist.errors.PermanentError`) if `backup_dir` is blank or
            a URL, `save_freq` is neither `"epoch"`, `"auto"` nor a
            positive integer (booleans are rejected), `keep` is not a
            positive integer, `mtbf` (or, at the start of `fit`,
            `KERASDIST_MTBF`) is not a positive duration, or `on_saved`
            is not callable;
            at the start of `fit`, if `backup_dir` cannot be created or
            written, the backup was made with another
            `steps_per_execution`, or `validation_data` is the training
            dataset itself under a strategy (its effect on the shuffle
            order cannot be replayed; pass a separate one).
        BackupMismatchError: at the start of `fit`, if the backup was made
            by a different model, or with another global batch (the
            number of workers may change between runs; the global batch
            may not).
        kerasdist.elastic.ElasticConfigError: at the start of `fit` under
            an elastic launcher, if some allowed group size cannot split
            the global batch.

    Every worker writes its goodput facts (`goodput_facts`: step and save
    times, steps retrained after a restore) into the launcher's heartbeat
    file about once a second; see the "Running at scale" guide.

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
        mtbf: float | str | None = None,
        on_saved: Callable[[SavedBackup], None] | None = None,
    ):
        super().__init__()
        self.backup_dir = store.check_path(backup_dir)
        self.save_freq = _check_save_freq(save_freq)
        try:
            self.keep = _validate.check_int("keep", keep)
        except ValueError as e:
            raise BackupConfigError(str(e)) from None
        self.delete_on_finish = bool(delete_on_finish)
        self.mtbf = interval_lib.parse_mtbf(mtbf)
        if self.mtbf is not None and self.save_freq != "auto":
            warnings.warn(
                f"kd.callbacks.BackupAndRestore: mtbf={mtbf!r} is used only "
                f"with save_freq='auto'; save_freq={self.save_freq!r} "
                "ignores it.", stacklevel=2)
        if on_saved is not None and not callable(on_saved):
            raise BackupConfigError(
                "Invalid value for argument `on_saved`. Received: "
                f"on_saved={on_saved!r}. Expected a callable taking a "
                "kd.callbacks.SavedBackup, or None.")
        self.on_saved = on_saved
        self._reset_run_state()

    @property
    def auto_interval(self) -> dict | None:
        """The interval `save_freq="auto"` chose last, or None.

        A dict with `save_seconds` (C, the measured cost of a save,
        averaged over the workers), `step_seconds` (the measured time of a
        step), `mtbf` (M, seconds), `interval_seconds` (Daly's interval
        for C and M) and `interval_steps` (that interval in steps, a
        multiple of the gradient accumulation steps).
        """
        auto = self._run.auto
        return dict(auto.chosen) if auto is not None and auto.chosen else (
            None)

    @property
    def goodput_facts(self) -> dict:
        """This worker's time facts of the current (or last) `fit`.

        The fields the heartbeat file holds: `attempt`, `rank`,
        `train_begin`, `first_step`, `first_step_seconds`, `restored_step`,
        `global_step`, `steps`, `step_seconds`, `retrained_steps`,
        `retrained_seconds`, `saves`, `save_seconds`, `saved_step`,
        `finished`, `updated` (see the "Running at scale" guide). Without
        a launcher, the chief logs the run's goodput from them when `fit`
        ends.
        """
        return self._run.facts.as_dict()

    def on_backup_saved(self, backup: SavedBackup) -> None:
        """Called on every worker right after each backup is committed.

        Override it (calling `super()`) or pass `on_saved=` to act on
        exactly the saves that happened: report a checkpoint to a tracker,
        copy it elsewhere. Every worker calls it at the same step, so it
        may run a collective. The Ray Train subclass reports each backup
        to Ray here.

        Args:
            backup: SavedBackup. Where and at which step it was saved.

        Example:

        ```python
        class Reporting(kd.callbacks.BackupAndRestore):
            def on_backup_saved(self, backup):
                super().on_backup_saved(backup)
                if backup.path:
                    print("saved", backup.path, "at", backup.global_step)
        ```
        """
        if self.on_saved is not None:
            self.on_saved(backup)

    def _reset_run_state(self) -> None:
        self._run = _RunState()

    def _variables(self) -> tuple[list, list, list]:
        return restore_lib.variables(self.model)

    # ------------------------------------------------------------------
    # Keras hooks.

    def on_train_begin(self, logs=None):
        self._reset_run_state()
        run = self._run
        run.task = cluster_lib.from_env()
        prior_mtbf = self._prior_mtbf()  # Raises before anything is done.
        attempt = protocol.restart_count()
        run.clock = interval_lib.RunClock(attempt=attempt, failures=attempt)
        run.facts = interval_lib.Facts(
            attempt=attempt, rank=run.task.worker_rank,
            train_begin=time.time())
        run.heartbeat = _backup_preemption.Heartbeat(self._send_facts)
        if self.save_freq == "auto":
            run.auto = interval_lib.AutoInterval(
                prior_mtbf, 1, self._agree, log=run.task.is_chief)
        model = self.model
        # Record preemption signals before the (slow) restore.
        self._run.preemption = _backup_preemption.Preemption(
            self.backup_dir, model, self._run.task.worker_rank,
            self._run.task.num_workers)
        self._run.preemption.install()
        try:
            self._begin(model)
        except BaseException:
            self._run.preemption.uninstall()  # `fit` will not call on_train_end
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
        shared_validation = self._check_validation_data(epoch_iterator)
        self._check_shuffle_seeded()
        self._record_world(model, epoch_iterator)
        self._run.callbacks = run_last(self, EpochLogs(self))
        new_run = self._is_new_run_in_this_process()
        if self._run.task.is_chief:
            store.check_writable(self.backup_dir)
            self._run.preemption.clear()
            store.remove_temporaries(self.backup_dir)
        if self._run.auto is not None:
            self._run.auto.set_accumulation(
                self._run.cursor.accumulation_steps)
        meta = self._restore(epoch_iterator, check_only=new_run)
        if new_run and self._run.task.is_chief:
            store.delete_all(self.backup_dir)
            os.makedirs(self.backup_dir, exist_ok=True)
        if not new_run:
            facts = self._run.facts
            facts.high_water, facts.earlier = interval_lib.read_progress(
                self.backup_dir)
        saved = self._run.restored if meta is not None else None
        if epoch_iterator is not None:
            self._run.tracker = InputTracker(epoch_iterator, self._run.cursor,
                                         shared_validation)
            self._run.tracker.install(saved, self.backup_dir,
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
        self._run.heartbeat.start()

    def on_epoch_begin(self, epoch, logs=None):
        run = self._run
        run.step_clock = None  # Not the time of epoch ends or validation.
        run.cursor.epoch = epoch
        run.steps_this_epoch = 0
        if run.resumed_epoch != epoch:
            run.cursor.step = 0
        if run.resume_metrics is not None and run.resumed_epoch == epoch:
            # `fit` reset the metrics just before this hook; put back the
            # part of the epoch trained before the interruption.
            for v, value in zip(
                self._variables()[2], self._run.resume_metrics, strict=True
            ):
                v.assign(value)
        self._run.resume_metrics = None
        if self._run.callback_states is not None:
            # After every callback's on_train_begin (which resets them).
            _callback_state.restore(run.callbacks, *run.callback_states)
            self._run.callback_states = None

    def on_train_batch_begin(self, batch, logs=None):
        self._run.batch_begin = batch
        if self._run.step_clock is None:
            self._run.step_clock = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        try:
            self._train_batch_end(batch, logs)
        finally:
            self._run.step_clock = time.monotonic()

    def _train_batch_end(self, batch: int, logs: dict | None) -> None:
        global_step, steps = self._count_steps(batch, logs)
        if (isinstance(self.save_freq, int) and (
            global_step // self.save_freq
            > (global_step - steps) // self.save_freq
        )) or (self._run.auto is not None and self._run.auto.due(global_step)):
            self._run.save_pending = True
        if self._run.preemption.should_stop(global_step, steps):
            self._run.stop_pending = True
        # With gradient accumulation, only between optimizer updates: a
        # backup never holds half-accumulated gradients, so it can resume
        # with another accumulation (another world size).
        if not self._run.cursor.at_update_boundary():
            return
        if self._run.save_pending:
            self._save()
        if self._run.stop_pending:
            self._stop_for_preemption()

    def _count_steps(self, batch: int, logs: dict | None) -> tuple[int, int]:
        """Advances the cursor and the clocks past the last execution;
        returns (global step, steps it trained)."""
        run = self._run
        seconds = time.monotonic() - (run.step_clock or time.monotonic())
        steps, run.iterations = steps_done(
            run.batch_begin, batch, (self.params or {}).get("steps"),
            getattr(self.model, "optimizer", None), run.iterations)
        run.cursor.advance(steps)
        run.cursor.step = run.batch_begin + steps
        run.steps_this_epoch += steps
        run.logs = dict(logs or {})
        global_step = run.cursor.global_step
        if run.auto is not None and run.facts.steps and steps:
            # The first execution of an attempt includes tracing.
            run.auto.record_step(steps, seconds)
        if steps:
            run.facts.record_step(global_step, steps, seconds)
        run.heartbeat.beat()
        return global_step, steps

    def on_test_begin(self, logs=None):
        if self._run.tracker is not None:
            self._run.tracker.track_evaluation(
                _internals.eval_epoch_iterator(self.model))

    def on_test_batch_end(self, batch, logs=None):
        self._run.heartbeat.beat()

    def on_epoch_end(self, epoch, logs=None):
        self._run.logs = dict(logs or {})
        self._run.cursor.end_epoch(epoch)
        self._run.resumed_epoch = None
        if self.save_freq == "epoch":
            self._run.save_pending = True
        if self._run.save_pending and self._run.cursor.at_update_boundary():
            self._save()
        self._run.heartbeat.beat()

    def on_train_end(self, logs=None):
        if not self._run.returned_at_once:
            self._save(finished=True)  # A rerun of the script trains no more.
        self._run.preemption.uninstall()
        if self._run.tracker is not None:
            self._run.tracker.uninstall()
            self._run.tracker = None
        _internals.set_initial_epoch(self.model, None)
        restore_lib.record_finished(self.backup_dir)
        self._run.facts.finished = True
        self._run.heartbeat.beat(now=True)
        self._log_goodput()
        if self.delete_on_finish and self._run.task.is_chief:
            store.delete_all(self.backup_dir)
        if self._run.preemption.requested:
            self._exit_for_restart()

    # ------------------------------------------------------------------
    # Steps, callbacks and finished runs.

    def _check_validation_data(self, epoch_iterator) -> bool:
        """True if validation reads the training dataset object itself.

        Its evaluations then advance the training order's shuffle seed
        generator, and are replayed on resume. When Keras distributes the
        dataset into separate wrappers for training and validation (under a
        strategy), that cannot be replayed exactly: refused.
        """
        x, val_x = _internals.fit_inputs(self.model)
        if x is None or val_x is not x or epoch_iterator is None:
            return False
        if _internals.reads_dataset_as_given(epoch_iterator, x):
            return True
        raise BackupConfigError(
            "Invalid value for argument `validation_data` of `fit`: it is "
            f"the training dataset itself ({type(x).__name__}), under "
            f"{type(self.model.distribute_strategy).__name__}. Each "
            "evaluation advances its shuffle order, and "
            "kd.callbacks.BackupAndRestore cannot replay that exactly after "
            "a restart, so a resumed run would train on other batches. Pass "
            "a separate validation dataset (e.g. built by the same function "
            "with another seed, or without shuffle)."
        )

    def _check_shuffle_seeded(self) -> None:
        """Refuses an unseeded shuffle that workers shard by data (issue
        23.7): each worker draws its own order, so no resume can read the
        same batches again."""
        x, _ = _internals.fit_inputs(self.model)
        workers = self._run.task.num_workers
        if not data_lib.shuffles_differently(x, workers):
            return
        raise BackupConfigError(
            "Invalid value for argument `x` of `fit`: the dataset shuffles "
            f"without a seed and is sharded by data over {workers} workers, "
            "so each worker reads every example in its own random order "
            "and kd.callbacks.BackupAndRestore cannot resume on the same "
            "batches (nor do the workers split the examples). Expected a "
            "seeded shuffle: dataset.shuffle(buffer_size, seed=1) (the "
            "order still changes every epoch, the same on every worker), "
            "or tf.random.set_seed(...) before building the dataset."
        )

    def _record_world(self, model, epoch_iterator) -> None:
        """Puts the batch sizes and the world size in the cursor, and
        checks the global batch against every size an elastic launcher
        allows."""
        strategy = model.distribute_strategy
        optimizer = getattr(model, "optimizer", None)
        accumulation = int(
            getattr(optimizer, "gradient_accumulation_steps", None) or 1)
        x, _ = _internals.fit_inputs(model)
        global_batch, step_batch = data_lib.batch_sizes_of(x)
        if step_batch is None and epoch_iterator is not None:
            step_batch = _internals.fit_batch_size(epoch_iterator)
        if step_batch and global_batch and (
            step_batch * accumulation != global_batch
        ):
            raise BackupConfigError(
                "Invalid value for argument `accumulation_steps` of "
                f"kd.data.distribute: the dataset is batched by {step_batch}"
                f" for a global batch of {global_batch}, but the optimizer "
                f"accumulates {accumulation} step(s). Expected the same "
                "accumulation_steps for kd.data.distribute and "
                "kd.accumulate_gradients (kd.elastic.batch_plan gives both)."
            )
        if step_batch:
            global_batch = step_batch * accumulation
            elastic.check_global_batch(global_batch, strategy)
        cursor = self._run.cursor
        cursor.global_batch_size = int(global_batch or 0)
        cursor.step_batch_size = int(step_batch or 0)
        cursor.accumulation_steps = accumulation
        cursor.num_replicas = int(strategy.num_replicas_in_sync)
        cursor.num_workers = int(self._run.task.num_workers)

    def _check_same_global_batch(self, meta: dict) -> None:
        """Refuses a backup made with another global batch (resuming it
        would train other batches: not the same run at another size)."""
        saved = int(meta.get("global_batch_size") or 0)
        current = self._run.cursor.global_batch_size
        if not saved or not current or saved == current:
            return
        replicas = int(meta.get("num_replicas") or 0)
        raise BackupMismatchError(
            f"The backup in {self.backup_dir!r} was made with a global "
            f"batch of {saved} examples per optimizer update"
            + (f" ({replicas} replicas in sync)" if replicas else "")
            + f"; this run uses global_batch_size={current} "
            f"({self._run.cursor.num_replicas} replicas in sync). The global "
            "batch must not change when the number of workers does: "
            f"resume with global_batch_size={saved} (kd.data.distribute("
            f"..., global_batch_size={saved}) or fit(..., batch_size="
            f"{saved})), not a per-worker batch times the workers; or "
            "start a new run with a new `backup_dir`."
        )

    def _is_new_run_in_this_process(self) -> bool:
        return restore_lib.new_run_in_this_process(self.backup_dir)

    def _finish_or_extend(self, meta: dict) -> None:
        epochs = int((self.params or {}).get("epochs") or 0)
        message = restore_lib.finished_message(self.backup_dir, meta, epochs)
        if message is None:
            return  # More epochs than the finished run: train them.
        warnings.warn(message, stacklevel=3)
        if self._run.task.is_chief:
            logging.warning("kerasdist: %s", message)
        _internals.set_initial_epoch(self.model,
                                     max(epochs, int(meta["epoch"])))
        self._run.returned_at_once = True

    # ------------------------------------------------------------------
    # Saving.

    def _save(self, finished: bool = False, preempted: bool = False) -> None:
        """Saves a backup, then tells `on_backup_saved`."""
        run = self._run
        started = time.monotonic()
        updates = run.cursor.updates()
        self._write_backup(finished, preempted)
        path = (os.path.join(self.backup_dir, store.ckpt_name(updates))
                if run.task.is_chief else None)
        global_step = run.cursor.global_step
        backup = SavedBackup(
            path=path, epoch=run.cursor.epoch, step=run.cursor.step,
            global_step=global_step, updates=updates,
            seconds=time.monotonic() - started, finished=finished,
            preempted=preempted, logs=dict(run.logs))
        self.on_backup_saved(backup)
        seconds = time.monotonic() - started
        run.facts.record_save(global_step, seconds)
        if run.auto is not None and not (finished or preempted):
            run.auto.after_save(global_step, seconds, run.clock)
        run.heartbeat.beat(now=True)

    def _write_backup(self, finished: bool, preempted: bool) -> None:
        model_vars, opt_vars, metric_vars = self._variables()
        variables = model_vars + opt_vars + metric_vars
        # Every worker reads every variable, in the same order: reading a
        # sync-on-read variable under MultiWorkerMirroredStrategy is a
        # collective, which all workers must join.
        values = [np.asarray(v.numpy()) for v in variables]
        states, arrays = _callback_state.collect(self._run.callbacks)
        epochs = int((self.params or {}).get("epochs") or 0)
        meta = {
            "format": store.FORMAT_VERSION,
            **self._run.cursor.to_meta(),
            "num_model": len(model_vars),
            "num_optimizer": len(opt_vars),
            "num_metrics": len(metric_vars),
            "names": [v.path for v in variables],
            "callbacks": states,
            "steps_per_execution": self._steps_per_execution(),
            "time": time.time(),
            "run": self._run.clock.to_meta(),
            "preempted": preempted,
        }
        if self._run.auto is not None:
            meta["auto"] = self._run.auto.to_meta(self._run.clock.elapsed())
        if finished:
            meta.update(finished=True, epochs=epochs,
                        stopped_early=self._run.cursor.epoch < epochs)
        values += arrays
        # Named by optimizer updates: the same order at every world size.
        store.save(self.backup_dir, self._run.cursor.updates(), meta, values,
                   self.keep, keep_it=self._run.task.is_chief)
        self._run.saved_at = self._run.cursor.global_step
        self._run.save_pending = False

    def _steps_per_execution(self) -> int:
        if self._run.tracker is not None:
            return self._run.tracker.steps_per_execution
        return int(getattr(self.model, "steps_per_execution", 1) or 1)

    # ------------------------------------------------------------------
    # Restoring.

    def _restore(self, epoch_iterator, check_only: bool = False
                 ) -> dict | None:
        """Restores the newest readable backup; returns its metadata.

        With `check_only`, only checks that it fits the model.
        """
        meta, values = restore_lib.read_newest(
            self.backup_dir, set_aside=self._run.task.is_chief,
            agree=lambda m: restore_lib.agree_on_backup(
                self.model, self._run.task.num_workers, self.backup_dir, m))
        if meta is None:
            return None
        cursor = None
        if not check_only:
            # Both checks raise before anything is assigned.
            self._check_same_global_batch(meta)
            cursor = Cursor.from_meta(meta).converted(
                self._run.cursor.step_batch_size,
                self._run.cursor.accumulation_steps, self.backup_dir)
        metrics = restore_lib.load(self.model, self.backup_dir, meta, values,
                                   epoch_iterator, check_only)
        if cursor is None:
            return None
        self._run.restored = cursor
        restore_lib.set_optimizer_updates(
            self.model, cursor.updates(), self._run.cursor.accumulation_steps,
            int(meta.get("accumulation_steps") or 1))
        self._run.cursor.epoch = cursor.epoch
        self._run.cursor.step = cursor.step
        self._run.cursor.global_step = cursor.global_step
        self._run.preemption.set_restored_step(cursor.global_step)
        self._resume_clocks(meta, cursor.global_step)
        self._run.callback_states = (meta.get("callbacks", {}),
                                 values[len(meta["names"]):])
        if cursor.step > 0:
            self._run.resumed_epoch = cursor.epoch
            self._run.resume_metrics = metrics
        _internals.set_initial_epoch(self.model, cursor.epoch)
        if self._run.task.is_chief:
            logging.info(
                "kerasdist: restored %s: resuming at epoch %d, step %d "
                "(step %d of the run)",
                store.ckpt_name(cursor.updates()), cursor.epoch + 1,
                cursor.step, cursor.global_step,
            )
            if cursor.num_replicas and (
                cursor.num_replicas != self._run.cursor.num_replicas
            ):
                logging.info(
                    "kerasdist: the backup was made with %d worker(s), %d "
                    "replicas; resuming with %d worker(s), %d replicas and "
                    "the same global batch of %d",
                    cursor.num_workers, cursor.num_replicas,
                    self._run.cursor.num_workers, self._run.cursor.num_replicas,
                    self._run.cursor.global_batch_size,
                )
        return meta

    def _resume_clocks(self, meta: dict, global_step: int) -> None:
        run = self._run
        run.saved_at = global_step
        run.clock = interval_lib.RunClock.resumed(meta, run.clock.attempt)
        run.facts.restored_step = run.facts.global_step = global_step
        run.facts.saved_step = global_step
        if run.auto is not None:
            run.auto.resume(meta, run.clock, global_step)

    # ------------------------------------------------------------------
    # Save cost, failure rate and goodput facts.

    def _prior_mtbf(self) -> float | None:
        """`mtbf=`, else `KERASDIST_MTBF`, else None (checked at once)."""
        if self.save_freq != "auto" or self.mtbf is not None:
            return self.mtbf
        return interval_lib.parse_mtbf(
            os.environ.get(interval_lib.ENV_MTBF), interval_lib.ENV_MTBF)

    def _agree(self, values: list[float]) -> list[float]:
        """`values` averaged over the workers (a collective)."""
        return restore_lib.all_reduce_mean(
            self.model, self._run.task.num_workers, values)

    def _log_goodput(self) -> None:
        """Without a launcher to report it (SLURM, Ray Train, a plain
        script), the chief logs the run's goodput from its own facts of
        every attempt (kept in the progress file)."""
        if not self._run.task.is_chief or os.environ.get(
            protocol.ENV_HEARTBEAT_FILE
        ):
            return
        report = goodput_lib.from_facts(self._run.facts.attempts())
        # WARNING, so that it shows without absl flags (INFO does not).
        logging.warning("kerasdist: %s", report.line())

    def _send_facts(self) -> None:
        """Writes the goodput facts into the launcher's heartbeat file,
        and (the chief) the run's progress into `backup_dir`."""
        run = self._run
        text = run.facts.to_json()
        heartbeat = os.environ.get(protocol.ENV_HEARTBEAT_FILE)
        try:
            if heartbeat:
                store.write_text_atomic(heartbeat, text + "\n")
            if run.task.is_chief and os.path.isdir(self.backup_dir):
                store.write_text_atomic(
                    interval_lib.progress_path(self.backup_dir),
                    run.facts.progress_json())
        except OSError:
            pass  # A full disk must not stop training; the save will say.

    # ------------------------------------------------------------------
    # Preemption.

    def _stop_for_preemption(self) -> None:
        if self._run.saved_at != self._run.cursor.global_step:
            self._save(preempted=True)
        if self._run.task.is_chief:
            logging.warning(
                "kerasdist: preempted (%s); saved at epoch %d, step %d; "
                "leaving to be restarted",
                self._run.preemption.signal_name or "signal",
                self._run.cursor.epoch + 1,
                self._run.cursor.step,
            )
        self._exit_for_restart()

    def _exit_for_restart(self) -> None:
        self._run.preemption.uninstall()
        protocol.exit_for_restart()

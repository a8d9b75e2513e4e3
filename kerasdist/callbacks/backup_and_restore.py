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

How the step-exact resume works. Keras's TF trainer (`fit` in
`keras/src/backend/tensorflow/trainer.py`) iterates a `TFEpochIterator` that
calls `iter()` on the distributed dataset at the start of each epoch (and once
more at the end of each epoch). A `tf.data` pipeline with
`shuffle(seed=..., reshuffle_each_iteration=True)` draws each new iterator's
order from a seed generator that advances on every `iter()`, so epoch `e`
sees the same order in two runs only if the same number of iterators was
created before it. The callback counts the iterators `fit` creates and the
batches taken from the current one, stores both with each backup, and on
restore re-creates the same number of iterators (without reading them),
advances the current one past the batches already trained, and starts
Keras's step counter at the saved step. `model._initial_epoch` starts the
epoch counter, as Keras's own callback does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

import keras
import numpy as np
from absl import logging

from kerasdist import cluster as cluster_lib
from kerasdist.launch import protocol

__all__ = ["BackupAndRestore", "BackupMismatchError"]

_FORMAT_VERSION = 1
_PREFIX = "ckpt-"
_SUFFIX = ".npz"
_META_KEY = "__meta__"
_PREEMPT_DIR = "preempt"
_HEARTBEAT_SECONDS = 1.0


class BackupMismatchError(ValueError):
    """The backup was made by a different model; nothing was loaded.

    Recovery does not retry this: the backup directory belongs to another
    model (or the model's code changed). Use a new `backup_dir` or delete
    the old one.
    """


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


def _normalized(path: str) -> str:
    # Keras suffixes auto-generated names (`dense_3`, `sequential_1`) with a
    # counter that depends on how many models the process built before; the
    # structure is what identifies the model.
    return re.sub(r"_\d+(?=$|/|_)", "", path)


def _ckpt_name(global_step: int) -> str:
    return f"{_PREFIX}{global_step:012d}{_SUFFIX}"


def _list_backups(backup_dir: str) -> list[str]:
    """Backup files in `backup_dir`, newest first."""
    try:
        names = os.listdir(backup_dir)
    except FileNotFoundError:
        return []
    names = [
        n for n in names if n.startswith(_PREFIX) and n.endswith(_SUFFIX)
    ]
    return [os.path.join(backup_dir, n) for n in sorted(names, reverse=True)]


def _write_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes an `.npz` next to `path`, then renames it into place."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read(path: str) -> tuple[dict, list[np.ndarray]]:
    """Reads a backup; raises on any damage (zip CRCs are checked)."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f[_META_KEY]))
        if meta.get("format") != _FORMAT_VERSION:
            raise ValueError(f"unknown backup format {meta.get('format')!r}")
        values = [f[f"v{i:05d}"] for i in range(len(meta["names"]))]
    return meta, values


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

    # ------------------------------------------------------------------
    # Run state.

    def _reset_run_state(self) -> None:
        self._task = cluster_lib.TaskInfo()
        self._epoch = 0
        self._step = 0  # steps done in the current epoch
        self._global_step = 0  # steps done in the whole run
        self._restored_step = 0
        self._saved_at: int | None = None
        self._batch_begin = 0
        self._created = 0  # iterators fit created on the training dataset
        self._consumed = 0  # batches taken from the newest iterator
        self._prepared: tuple[Any, int] | None = None
        self._epoch_iterator = None
        self._resume_metrics: list[np.ndarray] | None = None
        self._resume_epoch: int | None = None
        self._term_requested = False
        self._announced = False
        self._old_handler: Any = None
        self._last_beat = 0.0

    @property
    def _preempt_dir(self) -> str:
        return os.path.join(self.backup_dir, _PREEMPT_DIR)

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
        self._epoch_iterator = _find_epoch_iterator(model)
        if self._task.is_chief:
            os.makedirs(self.backup_dir, exist_ok=True)
            shutil.rmtree(self._preempt_dir, ignore_errors=True)
            for name in os.listdir(self.backup_dir):
                if name.startswith(".tmp-"):  # left by a kill mid-save
                    try:
                        os.unlink(os.path.join(self.backup_dir, name))
                    except OSError:
                        pass
        meta = self._restore()
        if self._epoch_iterator is not None:
            self._track_input(meta)
        elif meta is not None and meta["step"] > 0:
            warnings.warn(
                "kd.callbacks.BackupAndRestore could not find the training "
                "loop's input iterator (it needs the TensorFlow trainer's "
                "`fit`), so the interrupted epoch restarts from its first "
                "batch and some batches are trained twice.",
                stacklevel=2,
            )
        self._install_signal_handler()
        protocol.touch_heartbeat()
        self._last_beat = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._step = 0
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
        self._global_step += steps
        self._consumed += steps
        self._step = batch + 1
        self._beat()
        if isinstance(self.save_freq, int) and (
            self._global_step // self.save_freq
            > (self._global_step - steps) // self.save_freq
        ):
            self._save()
        self._maybe_preempt(steps)

    def on_test_batch_end(self, batch, logs=None):
        self._beat()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        self._step = 0
        if self.save_freq == "epoch":
            self._save()
        self._beat()

    def on_train_end(self, logs=None):
        if self._saved_at != self._global_step:
            self._save()  # So a rerun of the script finds training done.
        self._restore_signal_handler()
        if self._epoch_iterator is not None:
            self._epoch_iterator.__dict__.pop("_get_iterator", None)
            self._epoch_iterator.__dict__.pop("_enumerate_iterator", None)
            self._epoch_iterator = None
        self.model._initial_epoch = None
        if self._term_requested:
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
            "format": _FORMAT_VERSION,
            "epoch": self._epoch,
            "step": self._step,
            "global_step": self._global_step,
            "iterators_created": self._created,
            "batches_consumed": self._consumed,
            "num_model": len(model_vars),
            "num_optimizer": len(opt_vars),
            "num_metrics": len(metric_vars),
            "names": [v.path for v in variables],
            "time": time.time(),
        }
        arrays = {f"v{i:05d}": a for i, a in enumerate(values)}
        arrays[_META_KEY] = np.array(json.dumps(meta))
        name = _ckpt_name(self._global_step)
        if self._task.is_chief:
            os.makedirs(self.backup_dir, exist_ok=True)
            _write_atomic(os.path.join(self.backup_dir, name), arrays)
            for old in _list_backups(self.backup_dir)[self.keep:]:
                try:
                    os.unlink(old)
                except OSError:
                    pass
        else:
            scratch = tempfile.mkdtemp(prefix="kerasdist-backup-worker-")
            try:
                _write_atomic(os.path.join(scratch, name), arrays)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        self._saved_at = self._global_step

    # ------------------------------------------------------------------
    # Restoring.

    def _restore(self) -> dict | None:
        meta, values = None, None
        paths = _list_backups(self.backup_dir)
        for path in paths:
            try:
                meta, values = _read(path)
                break
            except Exception as e:  # noqa: BLE001 (any damage: fall back)
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
        self._check_compatible(meta, values)
        model_vars, opt_vars, metric_vars = self._variables()
        n_state = meta["num_model"] + meta["num_optimizer"]
        if meta["step"] > 0 and len(metric_vars) != meta["num_metrics"]:
            metric_vars = self._build_metrics()
        for v, value in zip(
            model_vars + opt_vars, values[:n_state], strict=True
        ):
            v.assign(value)
        self._epoch = meta["epoch"]
        self._step = meta["step"]
        self._global_step = self._restored_step = meta["global_step"]
        self._saved_at = self._global_step
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
        self.model._initial_epoch = meta["epoch"]
        if self._task.is_chief:
            logging.info(
                "kerasdist: restored %s: resuming at epoch %d, step %d "
                "(step %d of the run)",
                _ckpt_name(meta["global_step"]),
                meta["epoch"] + 1,
                meta["step"],
                meta["global_step"],
            )
        return meta

    def _check_same_backup_everywhere(self, meta: dict | None) -> None:
        """With several workers, all must restore the same backup."""
        strategy = self.model.distribute_strategy
        if self._task.num_workers == 1 or not getattr(
            strategy.extended, "_in_multi_worker_mode", lambda: False
        )():
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
            raise RuntimeError(
                "kd.callbacks.BackupAndRestore: the workers found different "
                f"backups in {self.backup_dir!r} (this worker found "
                f"{_ckpt_name(step) if step >= 0 else 'none'}). `backup_dir` "
                "must be on a file system that every worker sees (e.g. NFS "
                "or a shared volume)."
            )

    def _build_metrics(self) -> list:
        """Builds compiled metrics now (Keras builds them at the first step
        when there is no strategy) so their state can be restored."""
        ei = self._epoch_iterator
        model = self.model
        if ei is not None and getattr(model, "_compile_metrics", None):
            spec = getattr(ei._distributed_dataset, "element_spec", None)  # noqa: SLF001
            if spec is not None:
                try:
                    with model.distribute_strategy.scope():
                        model._symbolic_build(data_batch=spec)  # noqa: SLF001
                except Exception:  # noqa: BLE001 (best effort: metrics only)
                    pass
        return self._variables()[2]

    def _check_compatible(self, meta: dict, values: list[np.ndarray]) -> None:
        model_vars, opt_vars, metric_vars = self._variables()
        ours = [
            ("model", model_vars, meta["num_model"]),
            ("optimizer", opt_vars, meta["num_optimizer"]),
        ]
        start = 0
        for kind, variables, n in ours:
            saved_names = meta["names"][start:start + n]
            saved_values = values[start:start + n]
            start += n
            if len(variables) != n:
                raise BackupMismatchError(
                    f"The backup in {self.backup_dir!r} was made by a "
                    f"different model: it has {n} {kind} variables, this "
                    f"model has {len(variables)}. Use a new `backup_dir` "
                    "(or delete this one) for a different model."
                )
            for v, name, value in zip(
                variables, saved_names, saved_values, strict=True
            ):
                same_name = _normalized(v.path) == _normalized(name)
                if not same_name or tuple(v.shape) != value.shape or (
                    np.dtype(v.dtype) != value.dtype
                ):
                    raise BackupMismatchError(
                        f"The backup in {self.backup_dir!r} was made by a "
                        f"different model: its {kind} variable {name!r} has "
                        f"shape {value.shape} and dtype {value.dtype}, but "
                        f"this model's is {v.path!r} with shape "
                        f"{tuple(v.shape)} and dtype {v.dtype}. Use a new "
                        "`backup_dir` (or delete this one) for a different "
                        "model."
                    )

    def _track_input(self, meta: dict | None) -> None:
        """Counts `fit`'s dataset iterators; replays them when resuming."""
        ei = self._epoch_iterator
        original = ei._get_iterator  # noqa: SLF001

        def counting_get_iterator():
            self._created += 1
            if self._prepared is not None:
                iterator, self._consumed = self._prepared
                self._prepared = None
                return iterator
            self._consumed = 0
            return original()

        ei._get_iterator = counting_get_iterator  # noqa: SLF001
        if meta is None:
            return
        created = meta["iterators_created"]
        consumed = meta["batches_consumed"]
        step = meta["step"]
        # At an epoch start, fit makes a fresh iterator unless it was given
        # `steps_per_epoch` (then it continues the current one).
        fresh = step == 0 and ei.steps_per_epoch is None
        throwaway = created if fresh else created - 1
        for _ in range(max(throwaway, 0)):
            # Unread iterators: only advance the shuffle seed generators.
            iter(original())
        self._created = max(throwaway, 0)
        if not fresh and created > 0:
            iterator = iter(original())
            for _ in range(consumed):
                next(iterator)
            self._prepared = (iterator, consumed)
        spe = ei.steps_per_execution
        if step % spe:
            raise ValueError(
                f"The backup in {self.backup_dir!r} was taken at step {step}, "
                f"which is not a multiple of steps_per_execution={spe}. "
                "Resume with the steps_per_execution it was made with."
            )
        if step:
            class_enumerate = type(ei)._enumerate_iterator  # noqa: SLF001

            def resumed_enumerate():
                del ei._enumerate_iterator  # noqa: SLF001 (one epoch only)
                items = class_enumerate(ei)
                for _ in range(step // spe):
                    next(items)
                ei._steps_seen = consumed  # noqa: SLF001
                yield from items

            ei._enumerate_iterator = resumed_enumerate  # noqa: SLF001

    # ------------------------------------------------------------------
    # Preemption and heartbeats.

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= _HEARTBEAT_SECONDS:
            protocol.touch_heartbeat()
            self._last_beat = now

    def _install_signal_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum, frame):
            if _fit_is_running(self.model, frame):
                self._term_requested = True
                return
            # `fit` ended with an exception (Keras then skips on_train_end):
            # give the signal to whoever handled it before.
            self._restore_signal_handler()
            signal.raise_signal(signum)

        previous = signal.getsignal(signal.SIGTERM)
        # A handler left by an earlier `fit` that raised: chain past it.
        previous = getattr(previous, "_kerasdist_previous", previous)
        on_sigterm._kerasdist_previous = previous
        signal.signal(signal.SIGTERM, on_sigterm)
        self._old_handler = previous

    def _restore_signal_handler(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None

    def _maybe_preempt(self, steps: int) -> None:
        if self._task.num_workers == 1:
            if self._term_requested:
                self._stop_for_preemption()
            return
        # Several workers: whoever got SIGTERM announces a step two calls
        # ahead. Peers are at most one step apart (each step is an
        # all-reduce), so every worker reads the announcement before it
        # passes that step, and all save at the same one.
        if self._term_requested and not self._announced:
            os.makedirs(self._preempt_dir, exist_ok=True)
            rank = self._task.worker_rank
            _write_text_atomic(
                os.path.join(self._preempt_dir, f"rank-{rank}"),
                str(self._global_step + 2 * steps),
            )
            self._announced = True
        stop_at = self._announced_stop()
        if stop_at is not None and self._global_step >= stop_at:
            self._stop_for_preemption()

    def _announced_stop(self) -> int | None:
        try:
            entries = os.listdir(self._preempt_dir)
        except FileNotFoundError:
            return None
        steps = []
        for name in entries:
            try:
                with open(os.path.join(self._preempt_dir, name)) as f:
                    steps.append(int(f.read()))
            except (OSError, ValueError):
                continue
        # Ignore announcements from before this attempt's restore.
        steps = [s for s in steps if s > self._restored_step]
        return min(steps) if steps else None

    def _stop_for_preemption(self) -> None:
        if self._saved_at != self._global_step:
            self._save()
        if self._task.is_chief:
            logging.warning(
                "kerasdist: preempted (SIGTERM); saved at epoch %d, step %d; "
                "exiting with restart code %d",
                self._epoch + 1,
                self._step,
                protocol.RESTART_EXIT_CODE,
            )
        self._exit_for_restart()

    def _exit_for_restart(self) -> None:
        self._restore_signal_handler()
        sys.stdout.flush()
        sys.stderr.flush()
        sys.exit(protocol.RESTART_EXIT_CODE)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fit_is_running(model, frame) -> bool:
    """True if a `fit` of `model` is on the stack that `frame` ends."""
    while frame is not None:
        if frame.f_code.co_name == "fit" and (
            frame.f_locals.get("self") is model
        ):
            return True
        frame = frame.f_back
    return False


def _find_epoch_iterator(model):
    """The `TFEpochIterator` of the `fit` call running `model`, or None.

    Keras does not expose it to callbacks; it is a local of `fit`
    (`keras/src/backend/tensorflow/trainer.py`), which is on the call stack
    while callbacks run.
    """
    frame = sys._getframe(1)  # noqa: SLF001
    while frame is not None:
        names = frame.f_code.co_varnames
        if "epoch_iterator" in names and frame.f_code.co_name == "fit":
            local = frame.f_locals
            if local.get("self") is model and hasattr(
                local.get("epoch_iterator"), "_enumerate_iterator"
            ):
                return local["epoch_iterator"]
        frame = frame.f_back
    return None

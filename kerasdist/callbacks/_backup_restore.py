"""Restoring a backup: the newest readable one, the same on every worker,
checked against the model before anything is assigned."""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from kerasdist import _internals
from kerasdist.callbacks import _backup_store as store
from kerasdist.launch import protocol

# Backup directories whose `fit` finished in this process, with the
# launcher's restart count then: a later `fit` with the same directory and
# count is a new run (consecutive cells of a notebook), not a rerun.
_FINISHED_HERE: dict[str, int] = {}


def record_finished(backup_dir: str) -> None:
    """Notes that a `fit` with `backup_dir` finished in this process."""
    _FINISHED_HERE[os.path.realpath(backup_dir)] = protocol.restart_count()


def new_run_in_this_process(backup_dir: str) -> bool:
    """True (with a warning) if a `fit` with `backup_dir` already finished
    in this process, in the same attempt: this `fit` is a new run."""
    finished = _FINISHED_HERE.pop(os.path.realpath(backup_dir), None)
    if finished is None or finished != protocol.restart_count():
        return False
    warnings.warn(
        "kd.callbacks.BackupAndRestore: a `fit` with backup_dir "
        f"{backup_dir!r} already finished in this process; this `fit` "
        "starts a new run and replaces its backups. Use a new `backup_dir` "
        "for each run to keep them.",
        stacklevel=5,
    )
    return True


def finished_message(backup_dir: str, meta: dict, epochs: int) -> str | None:
    """What to tell the user when the backup says training finished, or
    None if `fit` asks for more epochs than the finished run had (and it
    was not stopped early): then training continues."""
    stopped_early = bool(meta.get("stopped_early"))
    if not stopped_early and epochs > int(meta["epochs"]):
        return None
    return (
        f"kd.callbacks.BackupAndRestore: the backup in {backup_dir!r} says "
        f"training finished (fit ended after epoch {int(meta['epoch'])} of "
        f"{meta['epochs']}{', stopped early' if stopped_early else ''}); "
        "nothing to train, so fit returns at once with the final weights. "
        "This is right for a rerun of a finished job; to train a new model, "
        "use a new `backup_dir`, delete this one, or pass "
        "delete_on_finish=True."
    )


def read_newest(
    backup_dir: str, set_aside: bool, agree: Callable[[dict | None], None]
) -> tuple[dict | None, list[np.ndarray] | None]:
    """Reads the newest readable backup, warning about each unreadable one.

    Args:
        backup_dir: str.
        set_aside: bool. Rename unreadable backups newer than the one read
            to `corrupt-...` (the chief does), after `agree` returned.
        agree: called with the metadata found (or None) before anything is
            renamed; raises if the workers found different backups.

    Returns:
        (meta, values), or (None, None) when there is no readable backup.
    """
    meta, values = None, None
    paths = store.list_backups(backup_dir)
    unreadable = []
    for path in paths:
        try:
            meta, values = store.read(path)
            break
        except Exception as e:  # noqa: BLE001 (any damage: fall back)
            unreadable.append(path)
            warnings.warn(
                f"kd.callbacks.BackupAndRestore: backup {path} is "
                f"unreadable ({type(e).__name__}: {e}); falling back to "
                "the previous one.",
                stacklevel=4,
            )
    if paths and meta is None:
        warnings.warn(
            "kd.callbacks.BackupAndRestore: no backup in "
            f"{backup_dir!r} is readable; training starts from the "
            "beginning.",
            stacklevel=4,
        )
    agree(meta)
    if set_aside:
        # So that rotation never prefers them to the backups written next.
        for path in unreadable:
            store.set_aside(path)
    return meta, values


# One traced all-reduce per strategy and dtype, the values its argument.
# A `tf.function` made anew at each call (the values captured as
# constants) is traced, and its collective set up, at every call; and
# save_freq="auto" all-reduces its estimates at every save.
_SUMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _all_reduce_sum(model: Any, values: list, dtype: str) -> np.ndarray:
    """`values` summed over all replicas (every worker must call it)."""
    import tensorflow as tf

    strategy = model.distribute_strategy
    by_dtype = _SUMS.setdefault(strategy, {})
    total = by_dtype.get(dtype)
    if total is None:

        @tf.function
        def total(mine):
            def replica_fn(value):
                ctx = tf.distribute.get_replica_context()
                # On the replica's device: the argument has none, and
                # `all_reduce` takes the value's device as destination
                # ("destinations can not be empty" otherwise).
                value = tf.identity(value)
                return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)

            return strategy.run(replica_fn, args=(mine,))

        by_dtype[dtype] = total
    mine = tf.constant(values, dtype)
    return strategy.experimental_local_results(total(mine))[0].numpy()


def _multi_worker(model: Any, num_workers: int) -> bool:
    return num_workers > 1 and _internals.in_multi_worker_mode(
        model.distribute_strategy)


def all_reduce_mean(model: Any, num_workers: int,
                    values: list[float]) -> list[float]:
    """`values` averaged over the workers; as given with one worker.

    Every worker must call it at the same point (it is a collective).
    """
    if not _multi_worker(model, num_workers):
        return [float(v) for v in values]
    sums = _all_reduce_sum(model, [float(v) for v in values], "float64")
    n = model.distribute_strategy.num_replicas_in_sync
    return [float(v) / n for v in sums]


def agree_on_backup(model: Any, num_workers: int, backup_dir: str,
                    meta: dict | None) -> None:
    """With several workers, all must restore the same backup.

    Raises:
        RuntimeError: if they found different ones (`backup_dir` is not
            shared).
    """
    if not _multi_worker(model, num_workers):
        return
    step = -1 if meta is None else meta["global_step"]
    sums = _all_reduce_sum(model, [step, step * step], "int64")
    n = model.distribute_strategy.num_replicas_in_sync
    # Sum and sum of squares equal n*s and n*s^2 only if all are s.
    if int(sums[0]) != n * step or int(sums[1]) != n * step * step:
        found = store.ckpt_name(step) if step >= 0 else "none"
        raise RuntimeError(
            "kd.callbacks.BackupAndRestore: the workers found different "
            f"backups in {backup_dir!r} (this worker found {found}). "
            "`backup_dir` must be on a file system that every worker sees "
            "(e.g. NFS or a shared volume)."
        )


def variables(model: Any) -> tuple[list, list, list]:
    """The model's, the optimizer's and the metrics' variables."""
    optimizer = getattr(model, "optimizer", None)
    opt_vars = list(optimizer.variables) if optimizer is not None else []
    return list(model.variables), opt_vars, list(model.metrics_variables)


def load(model: Any, backup_dir: str, meta: dict, values: list[np.ndarray],
         epoch_iterator: Any, check_only: bool = False
         ) -> list[np.ndarray] | None:
    """Checks the backup against the model and assigns its state.

    Returns:
        The saved metric values to put back at the resumed epoch's start,
        or None (saved at an epoch end, or the metrics differ: warned).

    Raises:
        BackupMismatchError: if the backup was made by a different model.
    """
    model_vars, opt_vars, metric_vars = variables(model)
    meta, values, opt_vars = _without_accumulators(meta, values, opt_vars)
    store.check_compatible(backup_dir, meta, values, [
        (kind, [(v.path, tuple(v.shape), v.dtype) for v in group])
        for kind, group in (("model", model_vars), ("optimizer", opt_vars))
    ])
    if check_only:
        return None
    n_state = meta["num_model"] + meta["num_optimizer"]
    if meta["step"] > 0 and len(metric_vars) != meta["num_metrics"]:
        _internals.build_metrics_now(model, epoch_iterator)
        metric_vars = variables(model)[2]
    for v, value in zip(model_vars + opt_vars, values[:n_state], strict=True):
        v.assign(value)
    saved_metrics = values[n_state:len(meta["names"])]
    if meta["step"] == 0:
        return None
    if [v.shape for v in saved_metrics] == [
        tuple(v.shape) for v in metric_vars
    ]:
        return saved_metrics
    warnings.warn(
        "kd.callbacks.BackupAndRestore: the backup's metrics do not match "
        "the model's (was it compiled with other metrics?); the resumed "
        "epoch's metrics count only the steps after the restart.",
        stacklevel=4,
    )
    return None


ACCUMULATOR_SUFFIX = "_gradient_accumulator"


def _is_accumulator(path: str) -> bool:
    return path.endswith(ACCUMULATOR_SUFFIX)


def _without_accumulators(meta: dict, values: list, opt_vars: list
                          ) -> tuple[dict, list, list]:
    """Drops the gradient accumulators from both sides when only one has
    them: a backup of a run without gradient accumulation resumed with it,
    or the reverse (an elastic resize changed the plan). Backups are taken
    between optimizer updates, where the accumulators are zero (Keras's
    `*_gradient_accumulator` variables, keras/src/optimizers/
    base_optimizer.py)."""
    n_model, n_opt = meta["num_model"], meta["num_optimizer"]
    names = meta["names"]
    saved = [_is_accumulator(n) for n in names[n_model:n_model + n_opt]]
    mine = [_is_accumulator(v.path) for v in opt_vars]
    if any(saved) == any(mine):
        return meta, values, opt_vars
    drop = {n_model + i for i, acc in enumerate(saved) if acc}
    meta = dict(meta, num_optimizer=n_opt - len(drop),
                names=[n for i, n in enumerate(names) if i not in drop])
    values = [v for i, v in enumerate(values) if i not in drop]
    opt_vars = [v for v, acc in zip(opt_vars, mine, strict=True) if not acc]
    return meta, values, opt_vars


def set_optimizer_updates(model: Any, updates: int, accumulation: int,
                          saved_accumulation: int) -> None:
    """Sets the optimizer's step counter for a resume with another number
    of accumulation steps: Keras counts training steps (`iterations` is
    that count divided by the accumulation steps), so `updates` optimizer
    updates are `updates * accumulation` steps."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or accumulation == saved_accumulation:
        return
    _internals.iterations_variable(optimizer).assign(
        updates * max(accumulation, 1))

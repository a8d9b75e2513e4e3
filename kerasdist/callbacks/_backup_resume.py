"""Step-exact resume for `kd.callbacks.BackupAndRestore`.

How it works. Keras's TF trainer (`fit` in
`keras/src/backend/tensorflow/trainer.py`) iterates a `TFEpochIterator` that
calls `iter()` on the distributed dataset at the start of each epoch (and
once more at the end of each epoch of known size). A `tf.data` pipeline with
`shuffle(seed=..., reshuffle_each_iteration=True)` draws each new iterator's
order from a seed generator that advances on every `iter()`, so epoch `e`
sees the same order in two runs only if the same number of iterators was
created before it. `InputTracker` counts the iterators `fit` creates and the
batches taken from the current one (the `Cursor`, stored with each backup),
and on restore re-creates the same number of iterators (without reading
them), advances the current one past the batches already trained, and makes
the epoch's step enumeration start at the saved step.

The `Cursor` is the one place that says where training is. Its position
does not depend on the number of workers: it counts *global* batches (each
split over all replicas) and the samples they held, and records the global
batch and the replica count of the run that saved. Under
`MultiWorkerMirroredStrategy` with the `DATA` auto-shard policy, global
batch k holds the same examples at every worker count (see
`kerasdist.elastic`), so skipping the same number of global batches resumes
exactly at another size; a different global batch is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from kerasdist import _internals
from kerasdist.callbacks._backup_store import BackupConfigError


@dataclasses.dataclass
class Cursor:
    """Where training is, as stored in each backup's metadata.

    Attributes:
        epoch: int. The epoch in progress (0-based).
        step: int. Steps done in that epoch.
        global_step: int. Steps done in the whole run.
        iterators_created: int. Iterators created on the training dataset
            so far (by `fit`, and by validation when it reads the same
            dataset object).
        current_iterator: int. Which of those (1-based) training reads.
        batches_consumed: int. Global batches taken from that iterator.
        samples_consumed: int. Examples in those batches (batches x the
            global batch; 0 when the global batch is unknown).
        global_batch_size: int. Examples per optimizer update over all
            replicas of the run that saved (0: unknown, e.g. a kerasdist
            0.1 backup).
        step_batch_size: int. Examples per training step (one dataset
            batch) of that run: the global batch, or a part of it with
            gradient accumulation (0: unknown).
        accumulation_steps: int. Training steps per optimizer update of
            that run (1 without accumulation).
        num_replicas: int. Replicas in sync of the run that saved.
        num_workers: int. Workers of the run that saved.
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    iterators_created: int = 0
    current_iterator: int = 0
    batches_consumed: int = 0
    samples_consumed: int = 0
    global_batch_size: int = 0
    step_batch_size: int = 0
    accumulation_steps: int = 1
    num_replicas: int = 0
    num_workers: int = 0

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> Cursor:
        values = {f.name: int(meta[f.name]) for f in dataclasses.fields(cls)
                  if f.name in meta}
        # Backups of kerasdist 0.1 read the newest iterator.
        values.setdefault("current_iterator", values["iterators_created"])
        return cls(**values)

    def advance(self, steps: int) -> None:
        """Counts `steps` trained steps."""
        self.global_step += steps
        self.batches_consumed += steps
        self.samples_consumed += steps * self.step_batch_size

    def batches_to_skip(self, step_batch_size: int) -> int:
        """Dataset batches of `step_batch_size` to skip to reach this
        position: from the samples consumed when both batch sizes are
        known, else the batch count."""
        if self.samples_consumed and step_batch_size:
            return self.samples_consumed // step_batch_size
        return self.batches_consumed

    def at_update_boundary(self) -> bool:
        """True when no gradient is half accumulated."""
        return self.global_step % max(self.accumulation_steps, 1) == 0

    def updates(self) -> int:
        """Optimizer updates so far: the same count at every world size
        (backups are named by it)."""
        return self.global_step // max(self.accumulation_steps, 1)

    def converted(self, step_batch_size: int, accumulation_steps: int,
                  backup_dir: str) -> Cursor:
        """This saved position in the steps of a run with another dataset
        batch (gradient accumulation that changed with the world size).

        Raises:
            BackupConfigError: if the position is not a whole number of
                the new steps (the backup was not taken at an optimizer
                update boundary).
        """
        old = self.step_batch_size
        if not old or not step_batch_size or old == step_batch_size:
            return self
        values = {}
        for name in ("step", "global_step", "batches_consumed"):
            samples = getattr(self, name) * old
            if samples % step_batch_size:
                raise BackupConfigError(
                    f"The backup in {backup_dir!r} was taken after "
                    f"{getattr(self, name)} steps of {old} examples "
                    f"({name}), which is not a whole number of this run's "
                    f"steps of {step_batch_size} examples. Resume with "
                    f"the dataset batch the backup was made with ({old})."
                )
            values[name] = samples // step_batch_size
        return dataclasses.replace(
            self, **values, step_batch_size=step_batch_size,
            accumulation_steps=accumulation_steps)

    def end_epoch(self, epoch: int) -> None:
        self.epoch = epoch + 1
        self.step = 0


class InputTracker:
    """Counts the dataset iterators `fit` creates; replays them on resume.

    Args:
        epoch_iterator: the running `fit`'s `TFEpochIterator`.
        cursor: Cursor. Updated as iterators are created.
        shared_validation: bool. `fit` validates on its training dataset
            object; validation's iterators are counted too.
    """

    def __init__(self, epoch_iterator: Any, cursor: Cursor,
                 shared_validation: bool = False):
        self.epoch_iterator = epoch_iterator
        self.cursor = cursor
        self.shared_validation = shared_validation
        self._original = _internals.original_get_iterator(epoch_iterator)
        self._prepared: tuple[Any, Cursor] | None = None
        self._eval_iterators: list[Any] = []

    @property
    def steps_per_execution(self) -> int:
        return int(self.epoch_iterator.steps_per_execution)

    def install(self, saved: Cursor | None, backup_dir: str,
                saved_spe: int | None) -> None:
        """Counts from now on; with `saved`, replays the input to it.

        Raises:
            BackupConfigError: if the backup was made with another
                `steps_per_execution`.
        """
        ei = self.epoch_iterator
        cursor = self.cursor
        original = self._original

        def counting_get_iterator():
            if self._prepared is not None:
                iterator, at = self._prepared
                self._prepared = None
                cursor.iterators_created = at.iterators_created
                cursor.current_iterator = at.current_iterator
                cursor.batches_consumed = at.batches_consumed
                cursor.samples_consumed = at.samples_consumed
                return iterator
            cursor.iterators_created += 1
            cursor.current_iterator = cursor.iterators_created
            cursor.batches_consumed = 0
            cursor.samples_consumed = 0
            return original()

        _internals.patch_get_iterator(ei, counting_get_iterator)
        if saved is None:
            return
        spe = self.steps_per_execution
        if saved_spe is not None and saved_spe != spe or (
            saved_spe is None and saved.step % spe
        ):
            raise BackupConfigError(
                f"The backup in {backup_dir!r} was made with "
                f"steps_per_execution={saved_spe or 'another value'}; this "
                f"model compiles steps_per_execution={spe}. Resume with the "
                "steps_per_execution the backup was made with, or use a new "
                "`backup_dir`."
            )
        # At an epoch start, fit makes a fresh iterator unless it was given
        # `steps_per_epoch` (then it continues the current one).
        fresh = saved.step == 0 and ei.steps_per_epoch is None
        if fresh or saved.current_iterator == 0:
            for _ in range(saved.iterators_created):
                # Unread iterators: only advance the shuffle seed generators.
                iter(original())
            cursor.iterators_created = saved.iterators_created
        else:
            for _ in range(saved.current_iterator - 1):
                iter(original())
            iterator = iter(original())
            for _ in range(saved.batches_to_skip(cursor.step_batch_size)):
                next(iterator)
            for _ in range(saved.iterators_created - saved.current_iterator):
                iter(original())  # validation's, after training's
            self._prepared = (iterator, saved)
            cursor.iterators_created = saved.iterators_created
        if saved.step:
            # The last execution of an epoch may be partial: a backup taken
            # after it has a step that is not a multiple of spe.
            skip = -(-saved.step // spe)
            consumed = saved.batches_consumed

            def resumed_enumerate():
                ei.__dict__.pop("_enumerate_iterator", None)  # one epoch
                items = _internals.original_enumerate(ei)
                for _ in range(skip):
                    next(items, None)
                _internals.set_steps_seen(ei, consumed)
                yield from items

            _internals.patch_enumerate(ei, resumed_enumerate)

    def track_evaluation(self, eval_iterator: Any) -> None:
        """Counts validation's iterators if it reads the training dataset.

        `fit(x=ds, validation_data=ds)` with a reshuffling `ds`: each
        evaluation's `iter()` advances the same shuffle seed generator.
        """
        if eval_iterator is None or any(
            e is eval_iterator for e in self._eval_iterators
        ):
            return
        self._eval_iterators.append(eval_iterator)
        if not self.shared_validation:
            return
        cursor = self.cursor
        original = _internals.original_get_iterator(eval_iterator)

        def counting_eval_iterator():
            cursor.iterators_created += 1
            return original()

        _internals.patch_get_iterator(eval_iterator, counting_eval_iterator)

    def uninstall(self) -> None:
        _internals.unpatch_epoch_iterator(self.epoch_iterator)
        for e in self._eval_iterators:
            _internals.unpatch_epoch_iterator(e)
        self._eval_iterators = []


def steps_done(begin: int, end: int, epoch_size: int | None, optimizer: Any,
               last_iterations: int | None) -> tuple[int, int | None]:
    """Steps the last execution really trained, and the optimizer's count.

    The last execution of an epoch trains fewer than `steps_per_execution`
    steps when the epoch's size is not a multiple of it, but Keras reports
    the full range `begin..end`. With the epoch's size known (`fit`'s
    `params["steps"]`) the range is cut there; otherwise the optimizer's
    iteration counter says how many steps were applied (read only for
    executions of several steps, and not with gradient accumulation).
    """
    nominal = end - begin + 1
    if nominal == 1:
        return 1, last_iterations
    if epoch_size:
        return max(min(end, epoch_size - 1) - begin + 1, 0), last_iterations
    if optimizer is None or getattr(
        optimizer, "gradient_accumulation_steps", None
    ):
        return nominal, last_iterations
    iterations = int(optimizer.iterations.numpy())
    previous = iterations - nominal if last_iterations is None else (
        last_iterations)
    done = iterations - previous
    return (done if 0 < done <= nominal else nominal), iterations


class EpochLogs(keras.callbacks.Callback):
    """Runs first at each epoch end: gives an epoch whose every step was
    trained before the restart its real metrics (`fit` passes `{}` when no
    step ran in this attempt; keras's History, EarlyStopping and user
    callbacks expect `loss`).

    Args:
        owner: the `BackupAndRestore` that knows whether the epoch was
            resumed and trained (its `_run` state).
    """

    def __init__(self, owner: Any):
        super().__init__()
        self.owner = owner

    def on_epoch_end(self, epoch, logs=None):
        owner = self.owner
        run = owner._run  # noqa: SLF001
        if logs is not None and run.steps_this_epoch == 0 and (
            run.resumed_epoch == epoch
        ):
            results = self.model.get_metrics_result()
            logs.update({k: v for k, v in results.items() if k not in logs})


def run_last(callback: Any, first: Any) -> list:
    """Orders the running `fit`'s callbacks: `first`, the others, `callback`.

    `callback` last: its epoch-end save sees the other callbacks' state
    after that epoch. Returns the others.
    """
    model = callback.model
    callback_list = _internals.fit_local(model, "callbacks")
    if callback_list is None or not hasattr(callback_list, "callbacks"):
        return []
    others = [c for c in callback_list.callbacks
              if c is not callback and type(c) is not type(first)]
    first.set_model(model)
    # A new list: Keras is iterating the old one right now.
    callback_list.callbacks = [first, *others, callback]
    return others

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

The `Cursor` is the one place that says where training is; the elastic work
replaces its input fields by a world-size-independent position.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kerasdist import _internals


@dataclasses.dataclass
class Cursor:
    """Where training is, as stored in each backup's metadata.

    Attributes:
        epoch: int. The epoch in progress (0-based).
        step: int. Steps done in that epoch.
        global_step: int. Steps done in the whole run.
        iterators_created: int. Dataset iterators `fit` created so far.
        batches_consumed: int. Batches taken from the newest iterator.
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    iterators_created: int = 0
    batches_consumed: int = 0

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> Cursor:
        return cls(**{f.name: int(meta[f.name])
                      for f in dataclasses.fields(cls)})

    def advance(self, steps: int) -> None:
        """Counts `steps` trained steps."""
        self.global_step += steps
        self.batches_consumed += steps

    def end_epoch(self, epoch: int) -> None:
        self.epoch = epoch + 1
        self.step = 0


class InputTracker:
    """Counts `fit`'s dataset iterators; replays them when resuming.

    Args:
        epoch_iterator: the running `fit`'s `TFEpochIterator`.
        cursor: Cursor. Updated as iterators are created.
    """

    def __init__(self, epoch_iterator: Any, cursor: Cursor):
        self.epoch_iterator = epoch_iterator
        self.cursor = cursor
        self._prepared: tuple[Any, int] | None = None

    @property
    def steps_per_execution(self) -> int:
        return int(self.epoch_iterator.steps_per_execution)

    def install(self, saved: Cursor | None, backup_dir: str) -> None:
        ei = self.epoch_iterator
        cursor = self.cursor
        original = _internals.original_get_iterator(ei)

        def counting_get_iterator():
            cursor.iterators_created += 1
            if self._prepared is not None:
                iterator, cursor.batches_consumed = self._prepared
                self._prepared = None
                return iterator
            cursor.batches_consumed = 0
            return original()

        _internals.patch_get_iterator(ei, counting_get_iterator)
        if saved is None:
            return
        created = saved.iterators_created
        consumed = saved.batches_consumed
        step = saved.step
        # At an epoch start, fit makes a fresh iterator unless it was given
        # `steps_per_epoch` (then it continues the current one).
        fresh = step == 0 and ei.steps_per_epoch is None
        throwaway = created if fresh else created - 1
        for _ in range(max(throwaway, 0)):
            # Unread iterators: only advance the shuffle seed generators.
            iter(original())
        cursor.iterators_created = max(throwaway, 0)
        if not fresh and created > 0:
            iterator = iter(original())
            for _ in range(consumed):
                next(iterator)
            self._prepared = (iterator, consumed)
        spe = self.steps_per_execution
        if step % spe:
            raise ValueError(
                f"The backup in {backup_dir!r} was taken at step {step}, "
                f"which is not a multiple of steps_per_execution={spe}. "
                "Resume with the steps_per_execution it was made with."
            )
        if step:

            def resumed_enumerate():
                ei.__dict__.pop("_enumerate_iterator", None)  # one epoch
                items = _internals.original_enumerate(ei)
                for _ in range(step // spe):
                    next(items)
                _internals.set_steps_seen(ei, consumed)
                yield from items

            _internals.patch_enumerate(ei, resumed_enumerate)

    def uninstall(self) -> None:
        _internals.unpatch_epoch_iterator(self.epoch_iterator)

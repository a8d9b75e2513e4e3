"""Rounds of `LocalSGD(dynamic_steps=True)`: as many steps as time allows.

Synchronous training, and local SGD with a fixed H, run at the speed of
the slowest worker: every worker waits at each collective for the last
one. With dynamic local updates (Async Local-SGD, Liu et al. 2024) a
round is a budget of training time instead of a step count: each worker
runs as many local steps as fit in it, and the sync weights each worker's
pseudo-gradient by the samples (steps) it trained on in the round.

The budget is agreed at every sync through one small all-gather beside
the pseudo-gradients: each worker sends [its steps this round, the time
it needs for `sync_every` steps at its own pace, whether its `fit` is on
its last step], and every worker takes the same decision from the same
rows: the next budget is the fastest worker's time for `sync_every`
steps, the weights are steps / mean steps, and training ends at the sync
where any worker has run all its steps. The first round, before anyone
has been timed, is `sync_every` steps on every worker.

Between syncs nothing else may join workers: Keras's training function
averages the logs across workers at every step under
MultiWorkerMirroredStrategy (`reduce_per_replica`, a collective), so this
mode trains with `local_train_function`, which reports this worker's own
logs; and a finite dataset makes the distributed iterator agree with the
other workers on every batch (partial-batch handling), so the dataset
must be repeated.
"""

from __future__ import annotations

import collections
import time

import keras
import numpy as np
import tensorflow as tf

# Stop when the next step would end past the budget by more than half a
# step: the fastest worker (budget = its own pace) stops at sync_every.
_SLACK = 0.5


class RoundClock:
    """When this worker ends its round, and what it tells the others.

    Counts the time spent in training steps (from LocalSGD's
    `on_train_batch_begin` to its `on_train_batch_end`), not what other
    callbacks do between steps (an evaluation at each sync): the budget is
    training time, which is what a slower worker has less of.

    Args:
        sync_every: int. Steps of the first round, and the fastest worker's
            steps per round afterwards.
    """

    def __init__(self, sync_every: int):
        self.sync_every = sync_every
        self.budget: float | None = None
        self.steps = 0
        self.rounds: list[int] = []
        self._busy = 0.0  # seconds in this round's steps
        # The pace is the mean of the recent steps: single steps vary
        # several-fold on a loaded machine, and a CPU quota makes them
        # bimodal (full speed until the quota is spent, then throttled
        # until the next period), so one round's few steps, or a median,
        # would mistake a burst for the pace.
        self._recent: collections.deque = collections.deque(
            maxlen=max(16, 4 * sync_every))
        self._step_start: float | None = None

    def restart(self) -> None:
        self.steps = 0
        self._busy = 0.0

    def begin_step(self) -> None:
        self._step_start = time.monotonic()

    def end_step(self, steps: int, first: bool) -> None:
        """Records that the round has run `steps` steps so far.

        Args:
            steps: int. Steps of this round so far.
            first: bool. The step was `fit`'s first, which traced the
                training function: not timed.
        """
        self.steps = steps
        if self._step_start is None:
            return
        seconds = time.monotonic() - self._step_start
        self._busy += seconds
        if not first:
            self._recent.append(seconds)

    def _pace(self) -> float:
        return float(np.mean(self._recent)) if self._recent else 0.0

    def due(self) -> bool:
        """Whether the round ends after the step just run."""
        if self.budget is None:
            return self.steps >= self.sync_every
        return self._busy + _SLACK * self._pace() >= self.budget

    def report(self, last: bool) -> np.ndarray:
        """This worker's row of the all-gather."""
        return np.array([self.steps, self._pace() * self.sync_every,
                         float(last)], "float32")

    def agree(self, rows: np.ndarray) -> bool:
        """Takes the decision of the sync; True when training ends."""
        self.rounds.append(self.steps)
        paces = rows[:, 1][rows[:, 1] > 0]
        if paces.size:
            self.budget = float(np.min(paces))
        return bool(np.max(rows[:, 2]) > 0)


def check_fit(params: dict, steps_per_execution: int) -> None:
    """Raises before step 1 if `fit`'s settings cannot run dynamic rounds.

    Raises:
        ValueError: `steps_per_execution` is not 1, the steps per epoch are
            unknown, or `epochs` is not 1.
    """
    if steps_per_execution != 1:
        raise ValueError(
            "kd.callbacks.LocalSGD(dynamic_steps=True) decides after every "
            "step whether the round ends. Received: steps_per_execution="
            f"{steps_per_execution}. Expected steps_per_execution=1."
        )
    steps, epochs = params.get("steps"), params.get("epochs")
    if not steps:
        raise ValueError(
            "kd.callbacks.LocalSGD(dynamic_steps=True) needs the number of "
            f"steps. Received: steps_per_epoch={steps}. Expected "
            "fit(dataset.repeat(), epochs=1, steps_per_epoch=N): the "
            "fastest worker's N-th step ends training for all."
        )
    if epochs != 1:
        raise ValueError(
            "kd.callbacks.LocalSGD(dynamic_steps=True) trains one epoch per "
            f"fit. Received: epochs={epochs}. Expected fit(dataset.repeat(), "
            "epochs=1, steps_per_epoch=N): workers at different speeds "
            "reach an epoch's end at different times, and Keras averages "
            "the metrics across workers there."
        )


def local_train_function(model: keras.Model):
    """A training function whose logs are this worker's, not averaged.

    Keras's own (`make_train_function`) reduces the logs across workers
    with a collective at every step; this one runs the same `train_step`
    and returns the first local replica's logs.
    """
    strategy = model.distribute_strategy

    @tf.autograph.experimental.do_not_convert
    def one_step(iterator):
        outputs = strategy.run(model.train_step, args=(next(iterator),))
        return tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0], outputs)

    return tf.function(one_step, reduce_retracing=True)

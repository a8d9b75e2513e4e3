"""Rounds of `LocalSGD(dynamic_steps=True)`: as many steps as time allows.

Synchronous training, and local SGD with a fixed H, run at the speed of
the slowest worker: every worker waits at each collective for the last
one. With dynamic local updates (Async Local-SGD, Liu et al. 2024) a
round is a wall-time budget instead of a step count: each worker runs as
many local steps as fit in it, and the sync weights each worker's
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

import time

import keras
import numpy as np
import tensorflow as tf

# Stop when the next step would end past the budget by more than half a
# step: the fastest worker (budget = its own pace) stops at sync_every.
_SLACK = 0.5


class RoundClock:
    """When this worker ends its round, and what it tells the others.

    Args:
        sync_every: int. Steps of the first round, and the fastest worker's
            steps per round afterwards.
    """

    def __init__(self, sync_every: int):
        self.sync_every = sync_every
        self.budget: float | None = None
        self.steps = 0
        self.rounds: list[int] = []
        self._start = time.monotonic()
        self._first_step_end: float | None = None

    def restart(self) -> None:
        self.steps = 0
        self._start = time.monotonic()

    def tick(self, steps: int) -> None:
        """Records that the round has run `steps` steps so far."""
        self.steps = steps
        if self._first_step_end is None:
            self._first_step_end = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def due(self) -> bool:
        """Whether the round ends after the step just run."""
        if self.budget is None:
            return self.steps >= self.sync_every
        elapsed = self.elapsed()
        return elapsed + _SLACK * elapsed / self.steps >= self.budget

    def report(self, last: bool) -> np.ndarray:
        """This worker's row of the all-gather."""
        if not self.rounds and self.steps > 1:
            # The first step traced the training function: not the pace.
            pace = (time.monotonic() - self._first_step_end) / (
                self.steps - 1)
        else:
            pace = self.elapsed() / max(self.steps, 1)
        return np.array(
            [self.steps, pace * self.sync_every, float(last)], "float32")

    def agree(self, rows: np.ndarray) -> bool:
        """Takes the decision of the sync; True when training ends."""
        self.rounds.append(self.steps)
        self.budget = float(np.min(rows[:, 1]))
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

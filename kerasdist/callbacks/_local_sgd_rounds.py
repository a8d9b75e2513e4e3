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
its last step, its recent syncs' wall time], and every worker takes the
same decision from the same rows: the next budget is the fastest worker's
time for `sync_every` steps, but at least `_SYNC_SHARE` times the sync's
own time; the weights are steps / mean steps, and training ends at the
sync where any worker has run all its steps. The first round, before
anyone has been timed, is `sync_every` steps on every worker.

Why the floor. A sync is a collective: it ends when the slowest worker
has done its part of the all-reduce, and that part is CPU work (gRPC
serialization, the outer update) done at the slowest worker's pace.
Measured with benchmarks/straggler.py (MLP 256-512-10, 4 workers at 0.1
core, one at 0.05): a sync costs ~14 ms of CPU, about 4 steps' worth, so
at H = 8 it took ~0.14 s of a 0.3 s budget without the straggler and
0.4-0.6 s with it: the slowed sync, not the steps, made the rounds 2x
longer. The sync's time is the smallest of the workers' (the last to
arrive waits for nobody), and the floor grows the round with it. It is
not enough on its own: in the same benchmark the syncs with the
straggler still took about as long as the steps (the waits at each sync
and the sync function's first run included).

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
# A round's budget is at least this many times the recent syncs' time.
_SYNC_SHARE = 3.0
# A report row: steps, seconds for sync_every steps, last, sync seconds.
ROW = 4


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
        # Per round: (seconds in steps, seconds in the sync).
        self.timings: list[tuple[float, float]] = []
        self._busy = 0.0  # seconds in this round's steps
        # The pace is the mean of the recent steps: single steps vary
        # several-fold on a loaded machine, and a CPU quota makes them
        # bimodal (full speed until the quota is spent, then throttled
        # until the next period), so one round's few steps, or a median,
        # would mistake a burst for the pace.
        self._recent: collections.deque = collections.deque(
            maxlen=max(16, 4 * sync_every))
        self._step_start: float | None = None
        # This worker's recent sync wall times (the first, which runs the
        # sync function for the first time, is not one of them).
        self._syncs: collections.deque = collections.deque(maxlen=4)

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
        sync = float(np.mean(self._syncs)) if self._syncs else 0.0
        return np.array([self.steps, self._pace() * self.sync_every,
                         float(last), sync], "float32")

    def agree(self, rows: np.ndarray, sync_seconds: float) -> bool:
        """Takes the decision of the sync; True when training ends.

        Args:
            rows: every worker's `report`, in the same order everywhere.
            sync_seconds: float. This sync's wall time on this worker.
        """
        if self.rounds:
            self._syncs.append(sync_seconds)
        self.rounds.append(self.steps)
        self.timings.append((self._busy, sync_seconds))
        paces = rows[:, 1][rows[:, 1] > 0]
        syncs = rows[:, 3][rows[:, 3] > 0]
        if paces.size:
            floor = _SYNC_SHARE * float(np.min(syncs)) if syncs.size else 0
            self.budget = max(float(np.min(paces)), floor)
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

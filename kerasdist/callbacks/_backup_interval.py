"""The checkpoint interval of `save_freq="auto"`, and a worker's goodput
facts, for `kd.callbacks.BackupAndRestore` (no TensorFlow).

The interval. With a save costing `C` seconds and failures arriving every
`M` seconds on average, the work lost to failures plus the time spent
saving is smallest when a save is taken every

- `sqrt(2 C M)` seconds of training (Young, "A first order approximation
  to the optimum checkpoint interval", CACM 17(9), 1974), or, more
  exactly when `C` is not small against `M`,
- `sqrt(2 C M) (1 + sqrt(C / 2M) / 3 + (C / 2M) / 9) - C` for `C < 2M`,
  else `M` (Daly, "A higher order estimate of the optimum checkpoint
  interval for restart dumps", FGCS 22(3), 2006), which is used here. It
  is shorter than Young's by about `(2/3) sqrt(C / 2M)`: 1.5 % at
  C/M = 0.001, 5 % at 0.01, 14 % at 0.1.

`M` comes from the failures this run has seen (restarts counted by the
launcher, `KERASDIST_RESTART_COUNT`, over the run's wall time across
restarts, both recorded in every backup), combined with a prior estimate
when one is given (`mtbf=`, or `KERASDIST_MTBF` set by a launcher) as one
pseudo-failure: `M = (T + M0) / (f + 1)`. Without a prior, `M = T / f`
after `f >= 1` failures and `max(T, 1 h)` before any.

Every worker must save at the same step (a save is a collective), so the
measured costs are averaged over the workers at each save (an all-reduce)
and the interval is computed from the averages: the same on all workers.

The goodput facts. `Facts` is what only a worker knows about its time:
how long its steps took, how long its saves took, and how many of its
steps redid work an earlier attempt lost. They are written as one JSON
object into the launcher's heartbeat file (`KERASDIST_HEARTBEAT_FILE`)
about once a second, at each save and when `fit` ends.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import time
from collections.abc import Callable
from typing import Any

from absl import logging

from kerasdist.callbacks._backup_store import PROGRESS_FILE, BackupConfigError

ENV_MTBF = "KERASDIST_MTBF"
FIRST_SAVE_STEPS = 20  # The first save of "auto", to measure its cost.
NO_FAILURE_MTBF = 3600.0  # M before any failure and without an estimate.
LOG_CHANGE = 0.1  # Log the interval when it changes by more than 10 %.
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")


def parse_mtbf(value: Any, source: str = "mtbf") -> float | None:
    """Seconds of a duration given as a number or as `"3h"`, `"90m"`, ...

    Args:
        value: None, a positive number of seconds, or a string: a positive
            number followed by `s`, `m`, `h` or `d` (or nothing: seconds).
        source: str. Where the value came from, for the error: the
            argument `mtbf`, or an environment variable's name.

    Returns:
        float or None (for None or an empty string).

    Raises:
        BackupConfigError: for anything else (a negative, zero, `"soon"`,
            a boolean).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    seconds = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match[1]) * _UNITS[match[2]]
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        what = "argument `mtbf`" if source == "mtbf" else source
        raise BackupConfigError(
            f"Invalid value for {what}. Received: {source}={value!r}. "
            "Expected a "
            "positive mean time between failures: seconds as a number, or "
            "a number with a unit, e.g. '45s', '30m', '3h' or '2d'."
        )
    return seconds


def daly_interval(save_seconds: float, mtbf: float) -> float:
    """Seconds of training between saves that waste the least time.

    Daly's higher-order estimate; Young's `sqrt(2 C M)` when `C << M`.

    Args:
        save_seconds: float. `C`, the cost of one save.
        mtbf: float. `M`, the mean time between failures.

    Returns:
        float.
    """
    c, m = max(save_seconds, 0.0), mtbf
    if c >= 2 * m:
        return m
    ratio = c / (2 * m)
    return math.sqrt(2 * c * m) * (
        1 + math.sqrt(ratio) / 3 + ratio / 9) - c


def estimate_mtbf(elapsed: float, failures: int,
                  prior: float | None) -> float:
    """Mean time between failures from what the run has seen.

    Args:
        elapsed: float. Wall seconds since the run started (all attempts).
        failures: int. Restarts that were not preemptions.
        prior: float or None. A given estimate, counted as one failure.

    Returns:
        float. Seconds.
    """
    if prior is not None:
        return (elapsed + prior) / (failures + 1)
    if failures:
        return max(elapsed, 1.0) / failures
    return max(elapsed, NO_FAILURE_MTBF)


@dataclasses.dataclass
class RunClock:
    """The run's age and failures, kept in every backup (`meta["run"]`).

    Attributes:
        started: float. Wall time (`time.time()`) the run began.
        attempt: int. The launcher's restart count of this attempt.
        failures: int. Restarts so far that were not preemptions.
        preemptions: int. Restarts after a save on SIGTERM/SIGUSR1.
    """

    started: float = dataclasses.field(default_factory=time.time)
    attempt: int = 0
    failures: int = 0
    preemptions: int = 0

    @classmethod
    def resumed(cls, meta: dict | None, attempt: int) -> RunClock:
        """The clock of attempt `attempt`, from the restored backup.

        Restarts since the attempt that saved are failures, except one
        if that save was taken on a preemption signal.
        """
        run = (meta or {}).get("run")
        if not run:
            return cls(attempt=attempt, failures=attempt)
        saved_attempt = int(run.get("attempt", 0))
        preemptions = int(run.get("preemptions", 0))
        failures = int(run.get("failures", 0))
        since = attempt - saved_attempt
        if since > 0 and meta.get("preempted"):
            preemptions += 1
            since -= 1
        return cls(started=float(run.get("started", time.time())),
                   attempt=attempt, failures=failures + max(since, 0),
                   preemptions=preemptions)

    def elapsed(self, now: float | None = None) -> float:
        return max((time.time() if now is None else now) - self.started, 0.0)

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)


class AutoInterval:
    """Chooses the steps between saves of `save_freq="auto"`.

    Args:
        prior_mtbf: float or None. A given mean time between failures.
        accumulation: int. Steps per optimizer update: saves stay on
            update boundaries.
        agree: callable. Averages a list of floats over the workers (the
            identity with one worker).
        log: bool. Log changes of the interval (the chief).
    """

    def __init__(self, prior_mtbf: float | None, accumulation: int,
                 agree: Callable[[list[float]], list[float]],
                 log: bool = True):
        self.prior_mtbf = prior_mtbf
        self.accumulation = max(int(accumulation), 1)
        self.agree = agree
        self.log = log
        self.step_seconds = 0.0  # Timed steps of this attempt...
        self.steps_timed = 0  # ... (the first execution excluded).
        self.save_seconds: float | None = None
        self.interval_steps: int | None = None
        self.chosen: dict = {}
        self.next_save = self._boundary(FIRST_SAVE_STEPS)

    def set_accumulation(self, accumulation: int) -> None:
        """Saves only every `accumulation` steps (optimizer updates)."""
        self.accumulation = max(int(accumulation), 1)
        self.next_save = self._boundary(self.next_save)

    def _boundary(self, step: int) -> int:
        a = self.accumulation
        return max(-(-step // a) * a, a)

    def record_step(self, steps: int, seconds: float) -> None:
        self.step_seconds += seconds
        self.steps_timed += steps

    def due(self, global_step: int) -> bool:
        return global_step >= self.next_save

    def resume(self, meta: dict, clock: RunClock, global_step: int) -> None:
        """Starts from the estimates in the restored backup: the same on
        every worker, so no collective is needed."""
        auto = meta.get("auto") or {}
        if not auto.get("step_seconds") or auto.get("save_seconds") is None:
            self.next_save = self._boundary(global_step + FIRST_SAVE_STEPS)
            return
        self.save_seconds = float(auto["save_seconds"])
        elapsed = float(auto.get("elapsed", 0.0))
        mtbf = estimate_mtbf(elapsed, clock.failures, self.prior_mtbf)
        self._choose(global_step, self.save_seconds,
                     float(auto["step_seconds"]), mtbf, elapsed)

    def after_save(self, global_step: int, save_seconds: float,
                   clock: RunClock) -> None:
        """Re-evaluates the interval after a save every worker took."""
        step = (self.step_seconds / self.steps_timed if self.steps_timed
                else 0.0)
        c, step, elapsed = self.agree(
            [save_seconds, step, clock.elapsed()])
        self.save_seconds = c
        if step <= 0:  # Not timed yet (one execution so far).
            self.next_save = self._boundary(global_step + FIRST_SAVE_STEPS)
            return
        mtbf = estimate_mtbf(elapsed, clock.failures, self.prior_mtbf)
        self._choose(global_step, c, step, mtbf, elapsed)

    def _choose(self, global_step: int, c: float, step: float, mtbf: float,
                elapsed: float) -> None:
        seconds = daly_interval(c, mtbf)
        steps = self._boundary(max(round(seconds / step), 1))
        self.next_save = global_step + steps
        old = self.interval_steps
        self.interval_steps = steps
        self.chosen = {"save_seconds": c, "step_seconds": step,
                       "mtbf": mtbf, "interval_seconds": seconds,
                       "interval_steps": steps, "elapsed": elapsed}
        if self.log and (old is None or abs(steps - old) > LOG_CHANGE * old):
            logging.info(
                "kerasdist: save_freq='auto' now saves every %d steps "
                "(%.3gs of training): a save costs %.3gs, a step %.3gs, "
                "mean time between failures %.3gs (Daly; Young's "
                "sqrt(2CM) = %.3gs)", steps, seconds, c, step, mtbf,
                math.sqrt(2 * c * mtbf))

    def to_meta(self, elapsed: float) -> dict:
        """What a resumed attempt starts from."""
        step = (self.step_seconds / self.steps_timed if self.steps_timed
                else self.chosen.get("step_seconds", 0.0))
        return {"save_seconds": self.save_seconds, "step_seconds": step,
                "elapsed": elapsed}


@dataclasses.dataclass
class Facts:
    """What only a worker knows about the time of one attempt (goodput).

    Wall times are `time.time()`; durations are seconds. Goodput counts
    `step_seconds - retrained_seconds` of every attempt: each global step
    once, in the attempt that trained it first.

    Attributes:
        attempt: int. `KERASDIST_RESTART_COUNT`.
        rank: int. The worker's rank.
        train_begin: float. When `fit` started (before the restore).
        first_step: float or None. When the first step of this attempt
            ended (start-up and restore are before it).
        first_step_seconds: float. The time of that first step (its
            tracing included): it began `first_step - first_step_seconds`.
        restored_step: int. The global step restored (0: a fresh start).
        global_step: int. Steps of the run trained so far.
        steps: int. Steps trained in this attempt.
        step_seconds: float. Time in those steps: from the end of the
            previous step's callbacks to the end of this one's (saves,
            epoch ends and validation left out).
        retrained_steps: int. Of those, steps an earlier attempt had
            trained past its last backup before it failed.
        retrained_seconds: float. Time inside the retrained steps.
        saves: int. Backups written in this attempt.
        save_seconds: float. Time inside them.
        saved_step: int. The global step of the newest backup.
        finished: bool. `fit` ended.
        updated: float. When this record was written.
    """

    attempt: int = 0
    rank: int = 0
    train_begin: float = 0.0
    first_step: float | None = None
    first_step_seconds: float = 0.0
    restored_step: int = 0
    global_step: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    retrained_steps: int = 0
    retrained_seconds: float = 0.0
    saves: int = 0
    save_seconds: float = 0.0
    saved_step: int = 0
    finished: bool = False
    updated: float = 0.0
    high_water: int = dataclasses.field(default=0, repr=False)
    # The chief's last facts of each earlier attempt of the run.
    earlier: list = dataclasses.field(default_factory=list, repr=False)

    def record_step(self, global_step: int, steps: int,
                    seconds: float) -> None:
        """Counts an execution of `steps` steps ending at `global_step`."""
        if self.first_step is None:
            self.first_step = time.time()
            self.first_step_seconds = seconds
        self.steps += steps
        self.step_seconds += seconds
        redone = min(max(self.high_water - (global_step - steps), 0), steps)
        if redone:
            self.retrained_steps += redone
            self.retrained_seconds += seconds * redone / steps
        self.global_step = global_step

    def record_save(self, global_step: int, seconds: float) -> None:
        self.saves += 1
        self.save_seconds += seconds
        self.saved_step = global_step

    def progress_json(self) -> str:
        """The furthest step trained, for the next attempt's
        `read_progress` (never lower than what earlier attempts did), and
        the facts of every attempt so far (goodput without a launcher)."""
        return json.dumps({
            "global_step": max(self.global_step, self.high_water),
            "attempts": self.attempts(),
        })

    def attempts(self) -> list[dict]:
        """The facts of every attempt of the run so far, in order."""
        return [*self.earlier, self.as_dict()]

    def as_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields.pop("high_water")
        fields.pop("earlier")
        return fields

    def to_json(self) -> str:
        """The facts now, as one JSON object (sets `updated`)."""
        self.updated = time.time()
        return json.dumps(self.as_dict())


def read_progress(backup_dir: str) -> tuple[int, list[dict]]:
    """The furthest global step any earlier attempt trained, and the
    chief's facts of each earlier attempt (the chief's progress file,
    written about once a second), or (0, [])."""
    try:
        with open(os.path.join(backup_dir, PROGRESS_FILE)) as f:
            progress = json.load(f)
        attempts = progress.get("attempts", [])
        return int(progress.get("global_step", 0)), [
            a for a in attempts if isinstance(a, dict)
            and "train_begin" in a and "updated" in a]
    except (OSError, ValueError, AttributeError, TypeError):
        return 0, []


def progress_path(backup_dir: str) -> str:
    return os.path.join(backup_dir, PROGRESS_FILE)

"""Goodput: the share of a run's wall time spent in steps that count.

    goodput = counted step time / wall time

and the rest (badput) by cause, so that the parts sum to the wall time:

- `startup`: from the launch to the first step of the first attempt
  (processes, TensorFlow, building, restoring; with `kerasdist-run`, the
  launcher's own checks and host probes too);
- `detection`: a failure until the launcher acted: the silence of a hung
  worker (`--timeout`); an exit is seen within one poll (0.05 s) and
  counts as 0;
- `restart`: stopping the group after a failure, preemption or grow,
  and each later attempt's start-up until its first step;
- `retrained`: steps an earlier attempt had trained past its last backup
  before it failed, trained again;
- `waiting_for_hosts`: finding which hosts are up and waiting for the
  unreachable ones (`--host_wait`) between attempts;
- `saves`: time inside `BackupAndRestore`'s saves;
- `input_stalls`: not measured (None): `fit` fetches each batch inside
  its compiled step, so waiting for input is part of the step time;
- `after_training`: from the end of `fit` (the chief's last facts, with
  `"finished": true`) until the attempt ended or a hung worker's silence
  began (that is `detection`) (code after `fit`,
  TensorFlow and the interpreter shutting down), and stopping the last
  group (e.g. after Ctrl-C: the workers save and exit);
- `other`: the rest: between steps (epoch ends, validation, other
  callbacks) and the last second of a killed attempt's steps that the
  chief had not reported yet.

The launcher knows wall time, attempts, detection and waiting; the
worker-side figures come from the chief's (worker 0's) goodput facts,
which `kd.callbacks.BackupAndRestore` writes into its heartbeat file
(every worker steps and saves in lockstep, so the chief's times are the
group's). Without a launcher (SLURM, Ray Train), `from_facts` computes the
same figures from the chief's facts of every attempt, with detection and
waiting inside `restart` (the chief cannot tell them apart).

No TensorFlow here: the launcher and the callback both use it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

__all__ = ["Goodput", "Timeline", "from_facts"]

# The badput causes, in the order the summary lists them.
PARTS = ("startup", "detection", "restart", "retrained",
         "waiting_for_hosts", "saves", "input_stalls", "after_training",
         "other")
_LABELS = {
    "startup": "start-up", "detection": "detection", "restart": "restart",
    "retrained": "steps retrained", "waiting_for_hosts": "waiting for hosts",
    "saves": "saves", "input_stalls": "input stalls",
    "after_training": "after training", "other": "other",
}
# Summed over attempts (the rest is `other`); the first three come from
# the chief's facts only.
_SUMMED = ("counted", "retrained", "saves", "after_training", "startup",
           "detection", "restart", "waiting_for_hosts")


@dataclasses.dataclass(frozen=True)
class Goodput:
    """A run's wall time split into counted steps and badput by cause.

    Every field is seconds; None means not measured. The measured parts
    and `counted` sum to `wall_time` (`other` is what is left).

    Args:
        wall_time: float. The run's wall time.
        counted: float or None. Time in steps that count (each global
            step once, in the attempt that trained it first); None when
            the chief wrote no goodput facts.
        startup: float or None. Launch to the first attempt's first step.
        detection: float. Failures until the launcher acted.
        restart: float or None. Stopping and restarting the group.
        retrained: float or None. Steps trained again after a failure.
        waiting_for_hosts: float. Probing and waiting for hosts.
        saves: float or None. Inside backups.
        input_stalls: float or None. Not measured (None).
        after_training: float or None. After `fit` ended.
        other: float. The rest.

    Example:

    >>> Goodput(10.0, 8.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, None, 0.3, 0.2
    ...         ).goodput
    0.8
    """

    wall_time: float
    counted: float | None
    startup: float | None
    detection: float
    restart: float | None
    retrained: float | None
    waiting_for_hosts: float
    saves: float | None
    input_stalls: float | None
    after_training: float | None
    other: float

    @property
    def goodput(self) -> float | None:
        """`counted / wall_time`, or None when not measured."""
        if self.counted is None or self.wall_time <= 0:
            return None
        return self.counted / self.wall_time

    def as_dict(self) -> dict:
        """The fields and `goodput`, as plain JSON values."""
        record = dataclasses.asdict(self)
        record["goodput"] = self.goodput
        return record

    def line(self) -> str:
        """`goodput 81.2% (24.36s of steps that count in 30.00s wall);
        badput: start-up 3.10s, ...`."""
        if self.counted is None:
            head = (
                "goodput not measured (worker 0 wrote no goodput facts: "
                "train with kd.callbacks.BackupAndRestore)"
            )
        else:
            head = (
                f"goodput {100 * self.goodput:.1f}% ({self.counted:.2f}s "
                f"of steps that count in {self.wall_time:.2f}s wall)"
            )
        parts = []
        for name in PARTS:
            value = getattr(self, name)
            parts.append(f"{_LABELS[name]} " + (
                "not measured" if value is None else f"{value:.2f}s"))
        return f"{head}; badput: {', '.join(parts)}"


@dataclasses.dataclass
class _Attempt:
    started: float
    waited: float = 0.0  # Waiting for hosts just before it started.
    ended: float | None = None
    stopped: float | None = None
    detection: float = 0.0
    facts: dict | None = None


class Timeline:
    """What the launcher saw of each attempt, for `Goodput`.

    Times are `time.time()` (the workers' facts are too).

    Args:
        began: float or None. When the run began (now).

    Example:

    ```python
    timeline = Timeline()
    timeline.start()
    timeline.end(detection=0.0)
    timeline.stop(facts)
    print(timeline.account().line())
    ```
    """

    def __init__(self, began: float | None = None):
        self.began = time.time() if began is None else began
        self.attempts: list[_Attempt] = []
        self._waited = 0.0

    def waited(self, seconds: float) -> None:
        """Time spent placing the next attempt (waiting for hosts)."""
        self._waited += max(seconds, 0.0)

    def start(self) -> None:
        """An attempt is being started."""
        self.attempts.append(_Attempt(time.time(), self._waited))
        self._waited = 0.0

    def end(self, detection: float) -> None:
        """The attempt's outcome was seen; `detection` seconds of it were
        a hung worker's silence."""
        self.attempts[-1].ended = time.time()
        self.attempts[-1].detection = max(detection, 0.0)

    def stop(self, facts: dict | None) -> None:
        """The attempt's workers are stopped; `facts` are the chief's last
        goodput facts (or None)."""
        attempt = self.attempts[-1]
        attempt.stopped = time.time()
        if attempt.ended is None:
            attempt.ended = attempt.stopped
        attempt.facts = facts

    def account(self, wall_time: float | None = None) -> Goodput:
        """The run's `Goodput` until now.

        Args:
            wall_time: float or None. The run's wall time (default: since
                `began`).

        Returns:
            `Goodput`.
        """
        now = time.time()
        wall = now - self.began if wall_time is None else wall_time
        sums = dict.fromkeys((*_SUMMED, "ending"), 0.0)
        measured = False
        previous = self.began
        for i, a in enumerate(self.attempts):
            ended = a.ended if a.ended is not None else now
            stopped = a.stopped if a.stopped is not None else now
            sums["detection"] += a.detection
            sums["waiting_for_hosts"] += a.waited
            before = max(a.started - previous - a.waited, 0.0)
            # A hung worker's silence ends the attempt: it is detection,
            # not start-up nor the time after training.
            silent = ended - a.detection
            done = _finished_at(a.facts)
            first = _first_step_began(a.facts)
            if first is not None:
                measured = True
                up = max(first - a.started, 0.0)
                _add_steps(sums, a.facts)
            else:  # No step (e.g. a finished backup: fit returns at once).
                up = max(min(silent, done or silent) - a.started, 0.0)
            if done is not None:
                measured = True
                sums["after_training"] += max(silent - done, 0.0)
            sums["startup" if i == 0 else "restart"] += before + up
            # Stopping the group: before a restart, or at the end.
            sums["restart" if i < len(self.attempts) - 1 else "ending"] += (
                max(stopped - ended, 0.0))
            previous = stopped
        return _finish(wall, sums, measured)


def _finished_at(facts: dict | None) -> float | None:
    """When `fit` ended, if the chief's facts say training finished."""
    if not facts or not facts.get("finished") or not facts.get("updated"):
        return None
    return float(facts["updated"])


def _first_step_began(facts: dict | None) -> float | None:
    if not facts or not facts.get("first_step"):
        return None
    return float(facts["first_step"]) - float(
        facts.get("first_step_seconds") or 0.0)


def _add_steps(sums: dict, facts: dict) -> None:
    retrained = float(facts.get("retrained_seconds") or 0.0)
    sums["counted"] += float(facts.get("step_seconds") or 0.0) - retrained
    sums["retrained"] += retrained
    sums["saves"] += float(facts.get("save_seconds") or 0.0)


def _finish(wall: float, sums: dict, measured: bool) -> Goodput:
    worker = ("counted", "retrained", "saves", "after_training")
    if measured:
        sums["after_training"] += sums.pop("ending", 0.0)
    else:
        sums.pop("ending", None)  # In `other`.
        for name in worker:
            sums[name] = None
    known = sum(v for v in sums.values() if v is not None)
    return Goodput(
        wall_time=wall, counted=sums["counted"], startup=sums["startup"],
        detection=sums["detection"], restart=sums["restart"],
        retrained=sums["retrained"],
        waiting_for_hosts=sums["waiting_for_hosts"], saves=sums["saves"],
        input_stalls=None, after_training=sums["after_training"],
        other=wall - known,
    )


def from_facts(records: Sequence[dict], now: float | None = None
               ) -> Goodput:
    """The `Goodput` of a run without a launcher, from the chief's facts.

    The wall time runs from the first attempt's `train_begin` to `now`
    (what came before `fit` is not seen). Between two attempts (from the
    last record of one to the next one's `train_begin`) and until the
    next one's first step is `restart`; detection and waiting for hosts
    are inside it (0 here).

    Args:
        records: list of dict. The chief's last facts of each attempt, in
            order.
        now: float or None. The end (default: now).

    Returns:
        `Goodput`.

    Example:

    >>> from_facts([]).counted is None
    True
    """
    now = time.time() if now is None else now
    if not records:
        return _finish(0.0, dict.fromkeys(_SUMMED, 0.0), False)
    began = float(records[0]["train_begin"])
    timeline = Timeline(began)
    for r in records:
        timeline.attempts.append(_Attempt(
            float(r["train_begin"]), ended=float(r["updated"]),
            stopped=float(r["updated"]), facts=r))
    return timeline.account(now - began)

"""What happened: worker states, failures and the run's result.

`Failure` says why an attempt ended; `RunResult` is what `run` returns
(and prints as its summary).
"""

from __future__ import annotations

import dataclasses
import enum
import signal
import time

from kerasdist.launch import protocol
from kerasdist.launch.goodput import Goodput

__all__ = [
    "Failure",
    "RunResult",
    "WorkerState",
    "exit_reason",
    "exit_status",
    "signal_name",
]

HUNG_EXIT_CODE = 124  # As timeout(1).


class WorkerState(enum.Enum):
    """Lifecycle of one worker process within an attempt.

    INIT → HEALTHY → SUCCEEDED, or → FAILED / PREEMPTED / HUNG (the group is
    then restarted), PERMANENT (the run ends) or STOPPED (by the launcher).

    Example:

    >>> WorkerState("preempted") is WorkerState.PREEMPTED
    True
    """

    INIT = "init"  # Not started yet.
    HEALTHY = "healthy"  # Running and making progress.
    SUCCEEDED = "succeeded"  # Exited with status 0.
    PREEMPTED = "preempted"  # Exited with RESTART_EXIT_CODE: restart me.
    FAILED = "failed"  # Exited non-zero or was killed by a signal.
    PERMANENT = "permanent"  # Exited with PERMANENT_EXIT_CODE: don't retry.
    HUNG = "hung"  # No output and no heartbeat for longer than `timeout`.
    STOPPED = "stopped"  # Stopped by the launcher.


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why an attempt ended without success.

    Args:
        attempt: int. Attempt number, from 1.
        worker: int. Index of the worker that ended the attempt.
        state: `WorkerState`. `FAILED`, `HUNG`, `PREEMPTED` or `PERMANENT`.
        reason: str. In words, e.g. `"died (SIGKILL)"`.
        exit_code: int. Worker's exit status (negative: signal), or None
            if it was hung.
        time: float. When it was noticed (seconds since the epoch).
        host: str or None. The worker's host, in a multi-host group.
        at_start: bool. The worker had not touched its heartbeat yet (it
            died or hung during start-up).

    Example:

    >>> Failure(1, 0, WorkerState.FAILED, "exited with status 2", 2, 0.0)
    ... # doctest: +ELLIPSIS
    Failure(attempt=1, worker=0, ...)
    """

    attempt: int
    worker: int
    state: WorkerState
    reason: str
    exit_code: int | None
    time: float
    host: str | None = None
    at_start: bool = False

    def describe(self) -> str:
        """`"worker-1 died (SIGKILL) at 13:52:01"` (with `on HOST` when
        the group spans hosts)."""
        when = time.strftime("%H:%M:%S", time.localtime(self.time))
        where = f" on {self.host}" if self.host else ""
        return f"worker-{self.worker}{where} {self.reason} at {when}"


@dataclasses.dataclass
class RunResult:
    """Outcome of `run`.

    Args:
        returncode: int. 0 if every worker of the last attempt succeeded;
            else the last failure's exit status (128 + signal number for a
            signal, 124 for a hang, 78 for a permanent error, 128 + signal
            number of the launcher if it was interrupted).
        attempts: int. Attempts started.
        restarts: int. Restarts after failures or hangs (counted toward
            `max_restarts`).
        preemptions: int. Restarts asked for with `RESTART_EXIT_CODE`.
        failures: list of `Failure`, in order.
        wall_time: float. Seconds from start to end.
        interrupted_by: str or None. `"SIGINT"`/`"SIGTERM"` if the launcher
            was stopped.
        sizes: list of int. Workers started in each attempt (they differ
            when an elastic run shrank or grew).
        goodput: `Goodput` or None. The wall time split into steps that
            count and badput by cause (see the "Running at scale" guide).

    Example:

    >>> RunResult(0, 1, 0, 0, [], 1.0).ok
    True
    """

    returncode: int
    attempts: int
    restarts: int
    preemptions: int
    failures: list[Failure]
    wall_time: float
    interrupted_by: str | None = None
    sizes: list[int] = dataclasses.field(default_factory=list)
    goodput: Goodput | None = None

    @property
    def ok(self) -> bool:
        """True when all workers succeeded."""
        return self.returncode == 0

    @property
    def outcome(self) -> str:
        """`"SUCCEEDED"`, `"INTERRUPTED (SIGTERM)"`, `"FAILED"`, ..."""
        if self.ok:
            return "SUCCEEDED"
        if self.interrupted_by:
            return f"INTERRUPTED ({self.interrupted_by})"
        if self.failures and (
            self.failures[-1].state == WorkerState.PERMANENT
        ):
            return "FAILED (permanent error, not retried)"
        return "FAILED"

    def summary(self) -> str:
        """Several `[launcher]` lines: outcome, counts, reasons, wall time."""
        outcome = self.outcome
        lines = [
            f"[launcher] summary: {outcome} after {self.attempts} "
            f"attempt(s), {self.restarts} restart(s) for failures, "
            f"{self.preemptions} for preemption, wall time "
            f"{self.wall_time:.1f}s, exit status {self.returncode}"
        ]
        if len(set(self.sizes)) > 1:
            lines.append(
                "[launcher] workers per attempt: "
                + " -> ".join(map(str, self.sizes))
            )
        if self.goodput is not None:
            lines.append(f"[launcher] {self.goodput.line()}")
        for f in self.failures:
            lines.append(f"[launcher]   attempt {f.attempt}: {f.describe()}")
        if self.failures and not self.ok:
            lines.append(
                f"[launcher] last failure: {self.failures[-1].describe()}"
            )
        return "\n".join(lines)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_reason(code: int) -> str:
    if code < 0:
        return f"died ({signal_name(-code)})"
    if code == protocol.RESTART_EXIT_CODE:
        return f"asked for a restart (exit {code}, preempted)"
    if code == protocol.PERMANENT_EXIT_CODE:
        return f"failed with a permanent error (exit {code})"
    return f"exited with status {code}"


def exit_status(failure: Failure) -> int:
    """The launcher's exit status for a run that ended with `failure`."""
    if failure.exit_code is None:
        return HUNG_EXIT_CODE
    if failure.exit_code < 0:
        return 128 - failure.exit_code
    return failure.exit_code


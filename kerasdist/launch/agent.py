"""A local worker group that is restarted as a whole when a worker is lost.

Follows the recovery protocol in DESIGN.md: collectives cannot admit a lone
replacement, so when any worker fails, hangs or asks for a restart, every
worker is stopped and the group starts again on fresh ports (as torchrun
does). A worker that fails with a permanent error (exit
`PERMANENT_EXIT_CODE`) ends the run at once: restarting cannot fix it.

The launcher's options are declared once, as the fields of `WorkerSpec`
(with their help text and command-line flag in the field metadata); `run`,
the `kerasdist-run` command line and the options table in
docs/guide/fault_tolerance.md are all derived from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import json
import numbers
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from kerasdist import cluster
from kerasdist._validate import check_int
from kerasdist.errors import PermanentError
from kerasdist.launch import protocol, supervisor

__all__ = [
    "Failure",
    "LauncherError",
    "RunResult",
    "WorkerSpec",
    "WorkerState",
    "run",
]

_POLL_SECONDS = 0.05
_HUNG_EXIT_CODE = 124  # As timeout(1).
_STOPPED_STATES = ("T", "t")  # /proc state: stopped (SIGSTOP), traced.


class LauncherError(PermanentError, ValueError):
    """The launcher was configured wrongly; nothing was started."""


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


# ----------------------------------------------------------------------
# Options: declared once, as WorkerSpec's fields.


def _option(default: Any, help: str, *, metavar: str, parse: Any,
            default_text: str | None = None) -> Any:
    """A `WorkerSpec` field that is also a command-line option.

    Args:
        default: the default value.
        help: str. What it does, for `--help` and the docs table.
        metavar: str. Its value's name on the command line, e.g. `"N"`.
        parse: callable. Turns the command-line text into the value.
        default_text: str or None. The default in words, e.g. `"never"`.
    """
    if default_text is None:
        default_text = (
            f"{default:g}" if isinstance(default, float) else str(default)
        )
    return dataclasses.field(default=default, metadata={
        "help": help,
        "metavar": metavar,
        "parse": parse,
        "default_text": default_text,
        "flag": True,
    })


def _parse_env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"Invalid value for option `--env`. Received: {text!r}. "
            "Expected NAME=VALUE, e.g. --env OMP_NUM_THREADS=1."
        )
    return name, value


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What to run and how to supervise it.

    Every field but `command` is a `kerasdist-run` option of the same name
    (`--num_workers`, ...) and a keyword argument of `run`.

    Args:
        command: list of str. The worker command, e.g.
            `["python", "train.py", "--epochs", "3"]`; every worker runs it.
        num_workers: int. Worker processes on this host. Defaults to 1.
        max_restarts: int. Group restarts allowed after failures or hangs;
            restarts asked for with `RESTART_EXIT_CODE` are not counted.
            Defaults to 3.
        max_preemptions: int. Restarts allowed for workers that exit with
            `RESTART_EXIT_CODE` (75) after saving. Defaults to 100.
        log_dir: str or None. Directory for `worker-i.log` (every attempt,
            appended) and heartbeat files. Defaults to None (no log files;
            heartbeats in a temporary directory).
        timeout: float or None. A worker that prints nothing and does not
            touch its heartbeat file for this many seconds is hung, and the
            group restarts. Defaults to None (never).
        grace_period: float. Seconds between SIGTERM and SIGKILL when the
            launcher itself is stopped (Ctrl-C, SIGTERM): time for
            `BackupAndRestore` to save. Defaults to 10.
        restart_grace_period: float. Seconds between SIGTERM and SIGKILL for
            the other workers when one failed or hung (they are blocked in
            collectives with the lost worker and cannot save). Defaults to
            1.
        env: mapping or None. Extra environment variables for the workers.
            Defaults to None.
        host: str. Address the workers' TF_CONFIG uses. Defaults to
            `"127.0.0.1"`.

    Raises:
        LauncherError: naming the invalid value and what is expected.

    Example:

    >>> spec = WorkerSpec(["python", "-c", "print(1)"], num_workers=2)
    >>> spec.max_restarts
    3
    """

    command: Sequence[str] = dataclasses.field(metadata={"flag": False})
    num_workers: int = _option(
        1, "worker processes on this host", metavar="N", parse=int,
    )
    max_restarts: int = _option(
        3, "group restarts after failures or hangs", metavar="R", parse=int,
    )
    max_preemptions: int = _option(
        100, f"restarts after exit code {protocol.RESTART_EXIT_CODE} "
        "(not counted in `R`)", metavar="P", parse=int,
    )
    log_dir: str | None = _option(
        None, "`D/worker-i.log` (all attempts, appended) and heartbeat "
        "files", metavar="D", parse=str, default_text="none",
    )
    timeout: float | None = _option(
        None, "a worker with no output and no heartbeat for `S` seconds is "
        "hung", metavar="S", parse=float, default_text="never",
    )
    grace_period: float = _option(
        10.0, "SIGTERM → SIGKILL delay when the launcher itself is stopped",
        metavar="G", parse=float,
    )
    restart_grace_period: float = _option(
        1.0, "SIGTERM → SIGKILL delay for the other workers when one "
        "failed", metavar="g", parse=float,
    )
    env: Mapping[str, str] | None = _option(
        None, "extra environment variable for every worker (repeatable)",
        metavar="NAME=VALUE", parse=_parse_env, default_text="none",
    )
    host: str = _option(
        "127.0.0.1", "address of the workers in their `TF_CONFIG`",
        metavar="H", parse=str,
    )

    def __post_init__(self):
        if isinstance(self.command, str) or not self.command:
            raise LauncherError(
                "Invalid value for argument `command`. Received: "
                f"command={self.command!r}. Expected a non-empty list, e.g. "
                "['python', 'train.py'] (on the command line: "
                "kerasdist-run --num_workers 2 -- python train.py)."
            )
        for name, low in (
            ("num_workers", 1), ("max_restarts", 0), ("max_preemptions", 0)
        ):
            try:
                object.__setattr__(
                    self, name, check_int(name, getattr(self, name), low)
                )
            except ValueError as e:
                raise LauncherError(str(e)) from None
        for name in ("timeout", "grace_period", "restart_grace_period"):
            value = getattr(self, name)
            if value is None and name == "timeout":
                continue
            if isinstance(value, bool) or not isinstance(
                value, numbers.Real
            ) or value < 0 or (name == "timeout" and value == 0):
                raise LauncherError(
                    f"Invalid value for argument `{name}`. Received: "
                    f"{name}={value!r}. Expected a positive number of "
                    "seconds" + (" or None." if name == "timeout" else ".")
                )
        if not isinstance(self.host, str) or not self.host.strip():
            raise LauncherError(
                "Invalid value for argument `host`. Received: "
                f"host={self.host!r}. Expected an address, e.g. "
                "'127.0.0.1'."
            )


def option_fields() -> list[dataclasses.Field]:
    """`WorkerSpec`'s fields that are options (all but `command`)."""
    return [
        f for f in dataclasses.fields(WorkerSpec) if f.metadata["flag"]
    ]


# ----------------------------------------------------------------------
# Results.


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

    def describe(self) -> str:
        """`"worker-1 died (SIGKILL) at 13:52:01"`."""
        when = time.strftime("%H:%M:%S", time.localtime(self.time))
        return f"worker-{self.worker} {self.reason} at {when}"


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

    @property
    def ok(self) -> bool:
        """True when all workers succeeded."""
        return self.returncode == 0

    def summary(self) -> str:
        """Several `[launcher]` lines: outcome, counts, reasons, wall time."""
        if self.ok:
            outcome = "SUCCEEDED"
        elif self.interrupted_by:
            outcome = f"INTERRUPTED ({self.interrupted_by})"
        elif self.failures and (
            self.failures[-1].state == WorkerState.PERMANENT
        ):
            outcome = "FAILED (permanent error, not retried)"
        else:
            outcome = "FAILED"
        lines = [
            f"[launcher] summary: {outcome} after {self.attempts} "
            f"attempt(s), {self.restarts} restart(s) for failures, "
            f"{self.preemptions} for preemption, wall time "
            f"{self.wall_time:.1f}s, exit status {self.returncode}"
        ]
        for f in self.failures:
            lines.append(f"[launcher]   attempt {f.attempt}: {f.describe()}")
        if self.failures and not self.ok:
            lines.append(
                f"[launcher] last failure: {self.failures[-1].describe()}"
            )
        return "\n".join(lines)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"died ({_signal_name(-code)})"
    if code == protocol.RESTART_EXIT_CODE:
        return f"asked for a restart (exit {code}, preempted)"
    if code == protocol.PERMANENT_EXIT_CODE:
        return f"failed with a permanent error (exit {code})"
    return f"exited with status {code}"


def _returncode(failure: Failure) -> int:
    if failure.exit_code is None:
        return _HUNG_EXIT_CODE
    if failure.exit_code < 0:
        return 128 - failure.exit_code
    return failure.exit_code


# ----------------------------------------------------------------------
# Checks made before anything starts.


def _check_command(spec: WorkerSpec) -> None:
    """The worker program exists and is executable, as the workers see it."""
    program = spec.command[0]
    path = (spec.env or {}).get("PATH", os.environ.get("PATH", os.defpath))
    fix = (
        "Give an executable program or an interpreter and a script, e.g. "
        "kerasdist-run -- python train.py."
    )
    if os.sep in program:
        if not os.path.exists(program):
            raise LauncherError(
                f"Invalid worker command: {program!r} does not exist. {fix}"
            )
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            what = "a directory" if os.path.isdir(program) else (
                "not executable"
            )
            raise LauncherError(
                f"Invalid worker command: {program!r} is {what}. {fix} "
                f"(or make it executable: chmod +x {program})"
            )
        return
    if shutil.which(program, path=path) is None:
        raise LauncherError(
            f"Invalid worker command: {program!r} was not found on PATH. "
            f"{fix}"
        )


def _check_log_dir(log_dir: str) -> None:
    """Creates `log_dir` and proves it writable (write, remove a file)."""
    fix = "Pass a directory you can write to as --log_dir."
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise LauncherError(
            f"Invalid value for option `--log_dir`. Received: {log_dir!r}, "
            f"which is a file, not a directory. {fix}"
        )
    try:
        os.makedirs(log_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kerasdist-probe-", dir=log_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LauncherError(
            f"Invalid value for option `--log_dir`. Received: {log_dir!r}, "
            f"which cannot be written ({e.strerror or e}). {fix}"
        ) from None


# ----------------------------------------------------------------------
# The agent.


class _Output:
    """Launcher-side output: one lock so lines never interleave."""

    def __init__(self, stream: IO[str] | None):
        self._stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._stream.write(text)
            self._stream.flush()

    def launcher(self, message: str) -> None:
        self.write(f"[launcher] {message}\n")


class _Worker:
    """One worker process of one attempt."""

    def __init__(self, index: int, process: supervisor.Process,
                 heartbeat: str):
        self.index = index
        self.process = process
        self.heartbeat = heartbeat
        self.state = WorkerState.HEALTHY

    def last_progress(self) -> float:
        """Monotonic time of the last output or heartbeat."""
        latest = self.process.last_output
        try:
            age = time.time() - os.stat(self.heartbeat).st_mtime
            latest = max(latest, time.monotonic() - age)
        except OSError:
            pass
        return latest

    def is_stopped(self) -> bool:
        """True when the process is stopped (SIGSTOP) or traced."""
        return self.process.state() in _STOPPED_STATES

    def poll(self) -> int | None:
        code = self.process.returncode
        if code is not None and self.state == WorkerState.HEALTHY:
            if code == 0:
                self.state = WorkerState.SUCCEEDED
            elif code == protocol.RESTART_EXIT_CODE:
                self.state = WorkerState.PREEMPTED
            elif code == protocol.PERMANENT_EXIT_CODE:
                self.state = WorkerState.PERMANENT
            else:
                self.state = WorkerState.FAILED
        return code


class _Agent:
    """Runs attempts until success, give-up or interruption."""

    def __init__(self, spec: WorkerSpec, stream: IO[str] | None):
        self.spec = spec
        self.out = _Output(stream)
        self.interrupted: int | None = None

    def _environment(
        self, index: int, attempt: int, config: dict, beat_dir: str
    ) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.spec.env or {})
        config = dict(config, task={"type": "worker", "index": index})
        env["TF_CONFIG"] = json.dumps(config)
        env[protocol.ENV_RESTART_COUNT] = str(attempt - 1)
        env[protocol.ENV_WORKER_INDEX] = str(index)
        env[protocol.ENV_NUM_WORKERS] = str(self.spec.num_workers)
        env[protocol.ENV_HEARTBEAT_FILE] = os.path.join(
            beat_dir, f"worker-{index}.heartbeat"
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _start_group(self, attempt: int, beat_dir: str) -> list[_Worker]:
        spec = self.spec
        # Fresh ports every attempt: the old ones may still be in TIME_WAIT.
        config = cluster.make_tf_config(spec.num_workers, 0, host=spec.host)
        workers: list[_Worker] = []
        try:
            for i in range(spec.num_workers):
                env = self._environment(i, attempt, config, beat_dir)
                heartbeat = env[protocol.ENV_HEARTBEAT_FILE]
                with open(heartbeat, "w"):
                    pass
                process = supervisor.Process(
                    spec.command,
                    env=env,
                    log_path=(
                        os.path.join(spec.log_dir, f"worker-{i}.log")
                        if spec.log_dir else None
                    ),
                    log_header=f"===== attempt {attempt} =====",
                    sink=self.out.write,
                    prefix=f"[worker-{i}] ",
                )
                workers.append(_Worker(i, process, heartbeat))
        except BaseException as e:
            self._stop_group(workers, 0.0)
            if isinstance(e, OSError):  # E.g. a script without #! line.
                raise LauncherError(
                    f"Invalid worker command: {spec.command[0]!r} cannot "
                    f"be started ({e.strerror or e}). Give an executable "
                    "program or an interpreter and a script, e.g. "
                    "kerasdist-run -- python train.py."
                ) from None
            raise
        return workers

    def _stop_group(self, workers: list[_Worker], grace: float) -> None:
        """SIGTERM every process group, SIGKILL what is left after grace."""
        supervisor.stop_all([w.process for w in workers], grace)
        for w in workers:
            w.poll()
            if w.state == WorkerState.HEALTHY:
                w.state = WorkerState.STOPPED

    def _blame_stopped(self, workers, failed: _Worker, attempt: int):
        """A stopped peer, not the worker that failed waiting for it.

        TensorFlow's own heartbeat ends a healthy worker whose peer stopped
        (SIGSTOP, a frozen VM): the stopped one is the cause.
        """
        for w in workers:
            if w is not failed and w.state == WorkerState.HEALTHY and (
                w.is_stopped()
            ):
                w.state = WorkerState.HUNG
                return Failure(
                    attempt, w.index, WorkerState.HUNG,
                    "is stopped (process state T, e.g. SIGSTOP) and made "
                    f"no progress; worker-{failed.index} "
                    f"{_exit_reason(failed.process.returncode)} waiting "
                    "for it (hung)",
                    None, time.time(),
                )
        return None

    def _hung(self, workers: list[_Worker], attempt: int):
        """The worker to blame for a hang, if any worker is past timeout.

        Workers blocked in a collective with a stopped peer stop
        progressing too; blame the stopped one, else the one silent
        longest.
        """
        timeout = self.spec.timeout
        if timeout is None:
            return None
        now = time.monotonic()
        healthy = [w for w in workers if w.state == WorkerState.HEALTHY]
        if not any(now - w.last_progress() > timeout for w in healthy):
            return None
        stopped = [w for w in healthy if w.is_stopped()]
        culprit = stopped[0] if stopped else min(
            healthy, key=_Worker.last_progress
        )
        culprit.state = WorkerState.HUNG
        note = (
            "; it is stopped (process state T, e.g. SIGSTOP)"
            if stopped else ""
        )
        return Failure(
            attempt, culprit.index, WorkerState.HUNG,
            f"made no progress for {timeout:g}s (hung){note}", None,
            time.time(),
        )

    def _check(self, workers: list[_Worker], attempt: int) -> Failure | None:
        """The first reason to end this attempt, if any."""
        for w in workers:
            code = w.poll()
            if w.state == WorkerState.FAILED:
                blamed = self._blame_stopped(workers, w, attempt)
                if blamed is not None:
                    return blamed
            if w.state in (
                WorkerState.FAILED, WorkerState.PREEMPTED,
                WorkerState.PERMANENT,
            ):
                return Failure(
                    attempt, w.index, w.state, _exit_reason(code), code,
                    time.time(),
                )
        return self._hung(workers, attempt)

    def _monitor(self, workers: list[_Worker], attempt: int):
        """Waits for success (None), a failure, or an interruption."""
        while self.interrupted is None:
            failure = self._check(workers, attempt)
            if failure is not None:
                return failure
            if all(w.state == WorkerState.SUCCEEDED for w in workers):
                return None
            time.sleep(_POLL_SECONDS)
        return None

    def _attempt(self, attempt: int, beat_dir: str) -> Failure | None:
        """Runs one attempt; returns its failure, or None."""
        spec = self.spec
        self.out.launcher(
            f"attempt {attempt}: starting {spec.num_workers} "
            f"worker(s): {' '.join(spec.command)}"
        )
        workers = self._start_group(attempt, beat_dir)
        try:
            failure = self._monitor(workers, attempt)
        except BaseException:
            # E.g. a test's timeout: never leave workers behind.
            self._stop_group(workers, 0.0)
            raise
        if self.interrupted is not None:
            self.out.launcher(
                f"got {_signal_name(self.interrupted)}; stopping workers "
                f"(SIGTERM, then SIGKILL after {spec.grace_period:g}s)"
            )
            self._stop_group(workers, spec.grace_period)
        elif failure is None:
            self._stop_group(workers, 0.0)  # Reap; all exited.
        else:
            self._stop_group(workers, spec.restart_grace_period)
        return failure

    def run(self) -> RunResult:
        spec = self.spec
        start = time.monotonic()
        _check_command(spec)
        if spec.log_dir:
            _check_log_dir(spec.log_dir)
        failures: list[Failure] = []
        # Two budgets, spent as torch's elastic agent does: a preemption
        # (exit 75, state saved) does not count toward --max_restarts.
        limit = {"restart": spec.max_restarts,
                 "preemption": spec.max_preemptions}
        remaining = dict(limit)
        attempt = returncode = 0
        beat_dir = spec.log_dir or tempfile.mkdtemp(prefix="kerasdist-run-")
        try:
            while True:
                attempt += 1
                failure = self._attempt(attempt, beat_dir)
                if self.interrupted is not None:
                    returncode = 128 + self.interrupted
                    break
                if failure is None:
                    returncode = 0
                    break
                failures.append(failure)
                kind = (
                    "preemption" if failure.state == WorkerState.PREEMPTED
                    else "restart"
                )
                if failure.state == WorkerState.PERMANENT:
                    self.out.launcher(
                        f"{failure.describe()}; not retried (a restart "
                        "cannot fix it)"
                    )
                elif remaining[kind] > 0:
                    remaining[kind] -= 1
                    note = (
                        " (not counted toward --max_restarts)"
                        if kind == "preemption" else ""
                    )
                    self.out.launcher(
                        f"{failure.describe()}; {kind} "
                        f"{limit[kind] - remaining[kind]}/{limit[kind]}{note}"
                    )
                    continue
                else:
                    self.out.launcher(
                        f"{failure.describe()}; no {kind}s left "
                        f"({limit[kind]} allowed); giving up"
                    )
                returncode = _returncode(failure)
                break
        finally:
            if not spec.log_dir:
                shutil.rmtree(beat_dir, ignore_errors=True)
        result = RunResult(
            returncode=returncode,
            attempts=attempt,
            restarts=limit["restart"] - remaining["restart"],
            preemptions=limit["preemption"] - remaining["preemption"],
            failures=failures,
            wall_time=time.monotonic() - start,
            interrupted_by=(
                _signal_name(self.interrupted) if self.interrupted else None
            ),
        )
        self.out.write(result.summary() + "\n")
        return result


def run(
    command: Sequence[str], *, stream: IO[str] | None = None, **options: Any
) -> RunResult:
    """Runs `command` as a group of workers, restarting the group on failure.

    Every worker gets `TF_CONFIG` (its own free port on `host`, fresh each
    attempt), `KERASDIST_RESTART_COUNT`, `KERASDIST_WORKER_INDEX`,
    `KERASDIST_NUM_WORKERS` and `KERASDIST_HEARTBEAT_FILE`, runs in its own
    process group (killed if the launcher dies), and has each output line
    prefixed with `[worker-i] `. When a worker exits non-zero, is killed,
    asks for a restart (`RESTART_EXIT_CODE`) or shows no progress for
    `timeout` seconds, the whole group is stopped and started again; a
    worker exiting with `PERMANENT_EXIT_CODE` ends the run at once.
    SIGINT/SIGTERM to the launcher are forwarded to the workers (as
    SIGTERM), and it returns.

    Args:
        command: list of str. The worker command.
        stream: text stream or None. Where output goes; defaults to
            `sys.stdout`.
        **options: the fields of `WorkerSpec`, with the same defaults:
            OPTIONS.

    Returns:
        `RunResult`; its `summary()` was also printed.

    Raises:
        LauncherError: on invalid arguments, a command that cannot be run
            or a `log_dir` that cannot be written, before starting
            anything.

    Example:

    ```python
    result = kd.launch.run(["python", "train.py"], num_workers=2,
                           max_restarts=3, log_dir="/tmp/logs")
    assert result.ok, result.summary()
    ```
    """
    known = {f.name for f in option_fields()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LauncherError(
            f"Unknown option(s) {unknown} for kerasdist.launch.run. "
            f"Expected some of {sorted(known)}."
        )
    if options.get("log_dir") is not None:
        options["log_dir"] = os.fspath(options["log_dir"])
    spec = WorkerSpec(
        command=list(command) if not isinstance(command, str) else command,
        **options,
    )
    agent = _Agent(spec, stream)
    installed = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum, frame):
            del frame
            if agent.interrupted is None:
                agent.interrupted = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            installed[sig] = signal.signal(sig, on_signal)
    try:
        return agent.run()
    finally:
        for sig, handler in installed.items():
            signal.signal(sig, handler)


def _signature() -> inspect.Signature:
    """`run`'s signature with `WorkerSpec`'s options spelled out."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("command", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation="Sequence[str]"),
        inspect.Parameter("stream", keyword, default=None,
                          annotation="IO[str] | None"),
    ]
    params += [
        inspect.Parameter(f.name, keyword, default=f.default,
                          annotation=f.type)
        for f in option_fields()
    ]
    return inspect.Signature(params, return_annotation="RunResult")


run.__signature__ = _signature()
if run.__doc__:  # None under `python -OO`.
    run.__doc__ = run.__doc__.replace(
        "OPTIONS.", ", ".join(f"`{f.name}`" for f in option_fields()) + "."
    )

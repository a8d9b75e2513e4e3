"""A local worker group that is restarted as a whole when a worker is lost.

Follows the recovery protocol in DESIGN.md: collectives cannot admit a lone
replacement, so when any worker fails, hangs or asks for a restart, every
worker is stopped and the group starts again on fresh ports (as torchrun
does).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

from kerasdist import cluster
from kerasdist.launch import protocol

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


class LauncherError(ValueError):
    """The launcher was configured wrongly; nothing was started."""


class WorkerState(enum.Enum):
    """Lifecycle of one worker process within an attempt.

    INIT → HEALTHY → SUCCEEDED, or → FAILED / PREEMPTED / HUNG (the group is
    then restarted) or STOPPED (by the launcher).

    Example:

    >>> WorkerState("preempted") is WorkerState.PREEMPTED
    True
    """

    INIT = "init"  # Not started yet.
    HEALTHY = "healthy"  # Running and making progress.
    SUCCEEDED = "succeeded"  # Exited with status 0.
    PREEMPTED = "preempted"  # Exited with RESTART_EXIT_CODE: restart me.
    FAILED = "failed"  # Exited non-zero or was killed by a signal.
    HUNG = "hung"  # No output and no heartbeat for longer than `timeout`.
    STOPPED = "stopped"  # Stopped by the launcher.


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What to run and how to supervise it.

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

    Example:

    >>> spec = WorkerSpec(["python", "-c", "print(1)"], num_workers=2)
    >>> spec.max_restarts
    3
    """

    command: Sequence[str]
    num_workers: int = 1
    max_restarts: int = 3
    max_preemptions: int = 100
    log_dir: str | None = None
    timeout: float | None = None
    grace_period: float = 10.0
    restart_grace_period: float = 1.0
    env: Mapping[str, str] | None = None
    host: str = "127.0.0.1"

    def __post_init__(self):
        if isinstance(self.command, str) or not self.command:
            raise LauncherError(
                "Invalid value for argument `command`. Received: "
                f"command={self.command!r}. Expected a non-empty list, e.g. "
                "['python', 'train.py'] (on the command line: "
                "kerasdist-run --num_workers 2 -- python train.py)."
            )
        for name in ("num_workers", "max_restarts", "max_preemptions"):
            value = getattr(self, name)
            low = 1 if name == "num_workers" else 0
            if isinstance(value, bool) or not isinstance(value, int) or (
                value < low
            ):
                raise LauncherError(
                    f"Invalid value for argument `{name}`. Received: "
                    f"{name}={value!r}. Expected an integer >= {low}."
                )
        for name in ("timeout", "grace_period", "restart_grace_period"):
            value = getattr(self, name)
            if value is None and name == "timeout":
                continue
            if isinstance(value, bool) or not isinstance(
                value, (int, float)
            ) or value < 0 or (name == "timeout" and value == 0):
                raise LauncherError(
                    f"Invalid value for argument `{name}`. Received: "
                    f"{name}={value!r}. Expected a positive number of "
                    "seconds" + (" or None." if name == "timeout" else ".")
                )


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why an attempt ended without success.

    Args:
        attempt: int. Attempt number, from 1.
        worker: int. Index of the worker that ended the attempt.
        state: `WorkerState`. `FAILED`, `HUNG` or `PREEMPTED`.
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
            signal, 124 for a hang, 128 + signal number of the launcher if
            it was interrupted).
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
    return f"exited with status {code}"


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

    def __init__(self, index: int, out: _Output):
        self.index = index
        self.state = WorkerState.INIT
        self.proc: subprocess.Popen | None = None
        self.last_output = 0.0
        self.heartbeat: str | None = None
        self._out = out
        self._reader: threading.Thread | None = None

    def start(
        self, command: Sequence[str], env: dict[str, str], log_path, attempt
    ) -> None:
        self.heartbeat = env[protocol.ENV_HEARTBEAT_FILE]
        with open(self.heartbeat, "w"):
            pass
        self.proc = subprocess.Popen(
            list(command),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Own process group: stop it whole.
        )
        self.state = WorkerState.HEALTHY
        self.last_output = time.monotonic()
        self._reader = threading.Thread(
            target=self._pump,
            args=(log_path, attempt),
            name=f"kerasdist-worker-{self.index}-output",
            daemon=True,
        )
        self._reader.start()

    def _pump(self, log_path: str | None, attempt: int) -> None:
        log = open(log_path, "ab") if log_path else None  # noqa: SIM115
        prefix = f"[worker-{self.index}] "
        try:
            if log:
                log.write(f"===== attempt {attempt} =====\n".encode())
            pending = b""
            while True:
                chunk = self.proc.stdout.read1(65536)
                if not chunk:
                    break
                self.last_output = time.monotonic()
                if log:
                    log.write(chunk)
                    log.flush()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if lines:
                    self._out.write("".join(
                        prefix + ln.decode("utf-8", "replace") + "\n"
                        for ln in lines
                    ))
            if pending:
                self._out.write(
                    prefix + pending.decode("utf-8", "replace") + "\n"
                )
        finally:
            if log:
                log.close()

    def last_progress(self) -> float:
        """Monotonic time of the last output line or heartbeat."""
        latest = self.last_output
        try:
            age = time.time() - os.stat(self.heartbeat).st_mtime
            latest = max(latest, time.monotonic() - age)
        except (OSError, TypeError):
            pass
        return latest

    def poll(self) -> int | None:
        code = self.proc.poll() if self.proc else None
        if code is not None and self.state == WorkerState.HEALTHY:
            if code == 0:
                self.state = WorkerState.SUCCEEDED
            elif code == protocol.RESTART_EXIT_CODE:
                self.state = WorkerState.PREEMPTED
            else:
                self.state = WorkerState.FAILED
        return code

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def join_output(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5.0)


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
        workers = []
        for i in range(spec.num_workers):
            w = _Worker(i, self.out)
            log_path = (
                os.path.join(spec.log_dir, f"worker-{i}.log")
                if spec.log_dir else None
            )
            w.start(
                spec.command,
                self._environment(i, attempt, config, beat_dir),
                log_path,
                attempt,
            )
            workers.append(w)
        return workers

    def _stop_group(self, workers: list[_Worker], grace: float) -> None:
        """SIGTERM every process group, SIGKILL what is left after grace."""
        running = [w for w in workers if w.poll() is None]
        for w in running:
            w.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            w.poll() is None for w in running
        ):
            time.sleep(_POLL_SECONDS)
        for w in running:
            # Also kills children a worker left in its group. Only groups
            # that were alive when the stop began: an exited, reaped group's
            # id could belong to someone else by now.
            w.signal_group(signal.SIGKILL)
        for w in workers:
            if w.proc is not None:
                w.proc.wait()
            if w.state == WorkerState.HEALTHY:
                w.state = WorkerState.STOPPED
            w.join_output()

    def _check(self, workers: list[_Worker], attempt: int) -> Failure | None:
        """The first reason to end this attempt, if any."""
        now = time.monotonic()
        for w in workers:
            code = w.poll()
            if w.state in (WorkerState.FAILED, WorkerState.PREEMPTED):
                return Failure(
                    attempt, w.index, w.state, _exit_reason(code), code,
                    time.time(),
                )
        timeout = self.spec.timeout
        if timeout is not None:
            for w in workers:
                if w.state == WorkerState.HEALTHY and (
                    now - w.last_progress() > timeout
                ):
                    w.state = WorkerState.HUNG
                    return Failure(
                        attempt, w.index, WorkerState.HUNG,
                        f"made no progress for {timeout:g}s (hung)", None,
                        time.time(),
                    )
        return None

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

    def run(self) -> RunResult:
        spec = self.spec
        start = time.monotonic()
        failures: list[Failure] = []
        restarts = preemptions = attempt = 0
        if spec.log_dir:
            os.makedirs(spec.log_dir, exist_ok=True)
        beat_dir = spec.log_dir or tempfile.mkdtemp(prefix="kerasdist-run-")
        returncode = 0
        try:
            while True:
                attempt += 1
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
                    name = _signal_name(self.interrupted)
                    self.out.launcher(
                        f"got {name}; stopping workers (SIGTERM, then SIGKILL"
                        f" after {spec.grace_period:g}s)"
                    )
                    self._stop_group(workers, spec.grace_period)
                    returncode = 128 + self.interrupted
                    break
                if failure is None:
                    self._stop_group(workers, 0.0)  # Reap; all exited.
                    returncode = 0
                    break
                failures.append(failure)
                self._stop_group(workers, spec.restart_grace_period)
                if failure.state == WorkerState.PREEMPTED:
                    preemptions += 1
                    used, limit, what = (
                        preemptions, spec.max_preemptions, "preemption"
                    )
                    note = " (not counted toward --max_restarts)"
                else:
                    restarts += 1
                    used, limit, what = restarts, spec.max_restarts, "restart"
                    note = ""
                if used > limit:
                    if failure.state == WorkerState.PREEMPTED:
                        preemptions -= 1
                    else:
                        restarts -= 1
                    self.out.launcher(
                        f"{failure.describe()}; no {what}s left "
                        f"({limit} allowed); giving up"
                    )
                    returncode = _returncode(failure)
                    break
                self.out.launcher(
                    f"{failure.describe()}; {what} {used}/{limit}{note}"
                )
        finally:
            if not spec.log_dir:
                import shutil

                shutil.rmtree(beat_dir, ignore_errors=True)
        result = RunResult(
            returncode=returncode,
            attempts=attempt,
            restarts=restarts,
            preemptions=preemptions,
            failures=failures,
            wall_time=time.monotonic() - start,
            interrupted_by=(
                _signal_name(self.interrupted) if self.interrupted else None
            ),
        )
        self.out.write(result.summary() + "\n")
        return result


def _returncode(failure: Failure) -> int:
    if failure.exit_code is None:
        return _HUNG_EXIT_CODE
    if failure.exit_code < 0:
        return 128 - failure.exit_code
    return failure.exit_code


def run(
    command: Sequence[str],
    *,
    num_workers: int = 1,
    max_restarts: int = 3,
    max_preemptions: int = 100,
    log_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
    grace_period: float = 10.0,
    restart_grace_period: float = 1.0,
    env: Mapping[str, str] | None = None,
    stream: IO[str] | None = None,
) -> RunResult:
    """Runs `command` as a group of workers, restarting the group on failure.

    Every worker gets `TF_CONFIG` (its own free 127.0.0.1 port, fresh each
    attempt), `KERASDIST_RESTART_COUNT`, `KERASDIST_WORKER_INDEX`,
    `KERASDIST_NUM_WORKERS` and `KERASDIST_HEARTBEAT_FILE`, runs in its own
    process group, and has each output line prefixed with `[worker-i] `.
    When a worker exits non-zero, is killed, asks for a restart
    (`RESTART_EXIT_CODE`) or shows no progress for `timeout` seconds, the
    whole group is stopped and started again. SIGINT/SIGTERM to the launcher
    are forwarded to the workers (as SIGTERM), and it returns.

    Args:
        command: list of str. The worker command.
        num_workers: int. Worker processes. Defaults to 1.
        max_restarts: int. Restarts after failures or hangs. Defaults to 3.
        max_preemptions: int. Restarts after `RESTART_EXIT_CODE` exits
            (not counted in `max_restarts`). Defaults to 100.
        log_dir: str or None. Where `worker-i.log` and heartbeat files go.
            Defaults to None.
        timeout: float or None. Seconds without output or heartbeat after
            which a worker is hung. Defaults to None (never).
        grace_period: float. SIGTERM-to-SIGKILL delay when the launcher is
            stopped. Defaults to 10.
        restart_grace_period: float. SIGTERM-to-SIGKILL delay for the
            other workers when one failed. Defaults to 1.
        env: mapping or None. Extra environment for the workers.
        stream: text stream or None. Where output goes; defaults to
            `sys.stdout`.

    Returns:
        `RunResult`; its `summary()` was also printed.

    Raises:
        LauncherError: on invalid arguments, before starting anything.

    Example:

    ```python
    result = kd.launch.run(["python", "train.py"], num_workers=2,
                           max_restarts=3, log_dir="/tmp/logs")
    assert result.ok, result.summary()
    ```
    """
    spec = WorkerSpec(
        command=list(command) if not isinstance(command, str) else command,
        num_workers=num_workers,
        max_restarts=max_restarts,
        max_preemptions=max_preemptions,
        log_dir=os.fspath(log_dir) if log_dir is not None else None,
        timeout=timeout,
        grace_period=grace_period,
        restart_grace_period=restart_grace_period,
        env=env,
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

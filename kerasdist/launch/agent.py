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
from kerasdist.launch import hosts as hostlib
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
_REGROW_SECONDS = 2.0  # How often an elastic run probes its missing hosts.
_STARTERS = ("auto", "local", "ssh")
_GROW = object()  # `_monitor`'s answer when a missing host is back.
_HUNG_EXIT_CODE = 124  # As timeout(1).


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
        host: str. Address the workers' TF_CONFIG uses when there is
            one host (no `hosts`). Defaults to `"127.0.0.1"`.
        hosts: str, list of str, or None. Spread the workers over these
            hosts: `"ADDR[:SLOTS],..."` (SLOTS defaults to `num_workers`).
            Worker 0 (the chief) runs on the first host that is up.
            Defaults to None (`num_workers` workers on `host`).
        hostfile: str or None. A file with one `ADDR [slots=K]` (or
            `ADDR:K`) per line, instead of `hosts`. Defaults to None.
        min_workers: int or None. Elastic training: when hosts are lost
            (unreachable for `host_wait` seconds), the group restarts on
            the hosts left if they have at least this many workers, and
            grows back when a host returns. Defaults to None (every host
            is needed).
        host_wait: float. Seconds, counted from the failure, to wait for
            an unreachable host before going on without it (elastic) or
            giving up; 0 goes on at once (a host that returns later is
            taken in by the next resize). Defaults to 30.
        starter: str. How workers start on a host: `"local"` (an address
            of this machine), `"ssh"`, or `"auto"` (local for this
            machine's addresses, ssh for others). Defaults to `"auto"`.
        ssh_command: str. The ssh program and its options for ssh hosts,
            e.g. `"ssh -p 2222 -i ~/.ssh/cluster"`. Defaults to `"ssh"`.

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
        "127.0.0.1", "address of the workers in their `TF_CONFIG` (one "
        "host)", metavar="H", parse=str,
    )
    hosts: str | Sequence[str] | None = _option(
        None, "spread workers over hosts: comma-separated `ADDR[:SLOTS]` "
        "(SLOTS defaults to `N`); the chief runs on the first host up",
        metavar="LIST", parse=str, default_text="none (one host)",
    )
    hostfile: str | None = _option(
        None, "file with one `ADDR [slots=K]` per line, instead of "
        "`--hosts`", metavar="F", parse=str, default_text="none",
    )
    min_workers: int | None = _option(
        None, "elastic: restart on the hosts left when hosts are lost, "
        "with at least `M` workers; grow back when they return",
        metavar="M", parse=int, default_text="all (not elastic)",
    )
    host_wait: float = _option(
        30.0, "seconds from a failure to wait for an unreachable host "
        "before going on without it (elastic) or giving up", metavar="W",
        parse=float,
    )
    starter: str = _option(
        "auto", "how workers start on a host: `local`, `ssh`, or `auto` "
        "(local for this machine's addresses)", metavar="HOW", parse=str,
    )
    ssh_command: str = _option(
        "ssh", "ssh program and options for ssh hosts", metavar="CMD",
        parse=str,
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
        self._check_hosts()

    def _check_hosts(self) -> None:
        if self.hosts is not None and self.hostfile is not None:
            raise LauncherError(
                "Both `hosts` and `hostfile` were given. Received: "
                f"hosts={self.hosts!r}, hostfile={self.hostfile!r}. Give "
                "one of them."
            )
        if self.starter not in _STARTERS:
            raise LauncherError(
                "Invalid value for argument `starter`. Received: "
                f"starter={self.starter!r}. Expected one of {_STARTERS}."
            )
        if isinstance(self.host_wait, bool) or not isinstance(
            self.host_wait, numbers.Real
        ) or self.host_wait < 0:
            raise LauncherError(
                "Invalid value for argument `host_wait`. Received: "
                f"host_wait={self.host_wait!r}. Expected a number of "
                "seconds >= 0."
            )
        # Parsed once: a hostfile edited during the run changes nothing.
        object.__setattr__(self, "_hosts", tuple(self._parse_hosts()))
        total = self.max_workers
        if self.min_workers is not None:
            try:
                check_int("min_workers", self.min_workers, 1)
            except ValueError as e:
                raise LauncherError(str(e)) from None
            if self.min_workers > total:
                raise LauncherError(
                    "Invalid value for argument `min_workers`. Received: "
                    f"min_workers={self.min_workers}, more than the "
                    f"{total} worker(s) of all hosts together. Expected "
                    f"1 <= min_workers <= {total}: lower --min_workers or "
                    "add hosts/slots."
                )

    def host_list(self) -> list[hostlib.Host]:
        """The hosts, in order, with their slots.

        Returns:
            list of `kerasdist.launch.hosts.Host`; one host (`host`,
            `num_workers` slots) without `hosts`/`hostfile`.
        """
        return list(self._hosts)

    def _parse_hosts(self) -> list[hostlib.Host]:
        """Raises `LauncherError` naming an unparsable or repeated host."""
        try:
            if self.hostfile is not None:
                return hostlib.read_hostfile(
                    os.fspath(self.hostfile), self.num_workers
                )
            if self.hosts is not None:
                return hostlib.parse_hosts(self.hosts, self.num_workers)
        except ValueError as e:
            raise LauncherError(str(e)) from None
        return [hostlib.Host(self.host, self.num_workers)]

    @property
    def multi_host(self) -> bool:
        """True with `hosts` or `hostfile`."""
        return self.hosts is not None or self.hostfile is not None

    @property
    def max_workers(self) -> int:
        """Workers when every host is up."""
        return sum(h.slots for h in self._hosts)

    @property
    def elastic(self) -> bool:
        """True when the group may run with fewer than `max_workers`."""
        return self.min_workers is not None and (
            self.min_workers < self.max_workers
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
        host: str or None. The worker's host, in a multi-host group.

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
        if len(set(self.sizes)) > 1:
            lines.append(
                "[launcher] workers per attempt: "
                + " -> ".join(map(str, self.sizes))
            )
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
                 heartbeat: str, host: str | None = None):
        self.index = index
        self.host = host
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
        return self.process.state() in supervisor.STOPPED_STATES

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


class _StartFailed(Exception):
    """A host could not take its workers; carries the attempt's failure."""

    def __init__(self, failure: Failure):
        super().__init__(failure.reason)
        self.failure = failure


class _Agent:
    """Runs attempts until success, give-up or interruption."""

    def __init__(self, spec: WorkerSpec, stream: IO[str] | None):
        self.spec = spec
        self.out = _Output(stream)
        self.interrupted: int | None = None
        self.hosts = spec.host_list()
        self.min_workers = (
            spec.min_workers if spec.min_workers is not None
            else spec.max_workers
        )
        self._starters: dict[str, hostlib.Starter] = {}
        self._returned: list[hostlib.Host] = []  # Missing hosts back.
        self._answered: set[hostlib.Host] = set()  # At the last probe.
        self._prober: threading.Thread | None = None
        # Started when a failure is seen, while the survivors are stopped:
        # (monotonic time of the failure, thread, {host: reason} it fills).
        self._early: tuple[float, threading.Thread, dict] | None = None

    # -- hosts ---------------------------------------------------------

    def _starter(self, host: hostlib.Host) -> hostlib.Starter:
        how = self.spec.starter
        if how == "auto":
            how = "local" if (
                not self.spec.multi_host
                or hostlib.is_local_address(host.address)
            ) else "ssh"
        if how not in self._starters:
            if how == "ssh":
                from kerasdist.launch import ssh

                self._starters[how] = ssh.SshStarter(
                    ssh_command=self.spec.ssh_command, cwd=os.getcwd()
                )
            else:
                self._starters[how] = hostlib.LocalStarter()
        return self._starters[how]

    def _probe(self, hosts: Sequence[hostlib.Host],
               down: dict | None = None) -> dict:
        """{host: reason} for the hosts that do not answer (in parallel);
        fills `down` if given."""
        down = {} if down is None else down

        def probe(host):
            starter = self._starter(host)
            reason = starter.reachable(host, starter.probe_timeout)
            if reason is not None:
                down[host] = reason

        threads = [threading.Thread(target=probe, args=(h,), daemon=True)
                   for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return down

    def _check_hosts_at_start(self) -> None:
        if not self.spec.multi_host:
            return  # One host: started here, as before hosts existed.
        down = self._probe(self.hosts)
        if down:
            which = "; ".join(f"{h} ({why})" for h, why in down.items())
            raise LauncherError(
                f"Host(s) unreachable at start: {which}. Nothing was "
                "started. Check that each host is up and that workers can "
                "be started there (for ssh hosts: `ssh HOST true` works "
                "without a password), or remove it from --hosts/--hostfile."
            )

    def _probe_early(self) -> None:
        """Starts probing the hosts as soon as a failure is seen, so that
        the probe runs while the survivors are being stopped."""
        if not self.spec.multi_host:
            return
        down: dict[hostlib.Host, str] = {}
        thread = threading.Thread(
            target=self._probe, args=(self.hosts, down), daemon=True
        )
        thread.start()
        self._early = (time.monotonic(), thread, down)

    def _gather(self) -> list[hostlib.Host] | None:
        """Hosts for the next attempt, waiting up to `host_wait` (from the
        failure) for the unreachable ones; None when too few are left."""
        spec = self.spec
        if not spec.multi_host:
            return self.hosts
        early, self._early = self._early, None
        since = early[0] if early else time.monotonic()
        deadline = since + spec.host_wait
        announced: set[hostlib.Host] = set()
        while True:
            if early:
                early[1].join()
                down, early = early[2], None
            else:
                down = self._probe(self.hosts)
            up = [h for h in self.hosts if h not in down]
            if not down:
                return up
            for h, why in down.items():
                if h not in announced:
                    announced.add(h)
                    self.out.launcher(
                        f"host {h} is unreachable ({why})" + (
                            f"; waiting up to {spec.host_wait:g}s for it"
                            if spec.host_wait else ""
                        )
                    )
            if time.monotonic() >= deadline or self.interrupted:
                slots = sum(h.slots for h in up)
                gone = ", ".join(str(h) for h in down)
                if up and slots >= self.min_workers:
                    self.out.launcher(
                        f"going on without {gone}: {slots} worker(s) on "
                        f"{len(up)} host(s) (--min_workers "
                        f"{self.min_workers})"
                    )
                    return up
                self.out.launcher(
                    f"{gone} still unreachable after {spec.host_wait:g}s; "
                    f"the hosts left have {slots} worker slot(s), fewer "
                    f"than the {self.min_workers} needed"
                    + ("" if spec.elastic else
                       " (not elastic: pass --min_workers to go on with "
                       "fewer)")
                    + "; giving up"
                )
                return None
            time.sleep(1.0)

    def _watch_missing(self, missing: list[hostlib.Host]) -> None:
        """In the background, notes missing hosts that answer twice in a
        row (so that a flapping host does not resize the group)."""
        if self._prober is not None and self._prober.is_alive():
            return
        answered = self._answered

        def probe():
            down = self._probe(missing)
            now_up = {h for h in missing if h not in down}
            self._returned = [h for h in missing
                              if h in now_up and h in answered]
            self._answered = now_up

        self._prober = threading.Thread(target=probe, daemon=True)
        self._prober.start()

    # -- one attempt ---------------------------------------------------

    def _environment(
        self, index: int, attempt: int, config: dict, beat_dir: str,
        host: hostlib.Host, size: int,
    ) -> dict[str, str]:
        """The variables the launcher sets for one worker."""
        spec = self.spec
        env = dict(spec.env or {})
        config = dict(config, task={"type": "worker", "index": index})
        env["TF_CONFIG"] = json.dumps(config)
        env[protocol.ENV_RESTART_COUNT] = str(attempt - 1)
        env[protocol.ENV_WORKER_INDEX] = str(index)
        env[protocol.ENV_NUM_WORKERS] = str(size)
        env[protocol.ENV_HEARTBEAT_FILE] = os.path.join(
            beat_dir, f"worker-{index}.heartbeat"
        )
        if spec.multi_host:
            env[protocol.ENV_HOST] = host.address
        if spec.elastic:
            env[protocol.ENV_MIN_WORKERS] = str(self.min_workers)
            env[protocol.ENV_MAX_WORKERS] = str(spec.max_workers)
        if "PYTHONUNBUFFERED" not in os.environ:
            env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _start_group(self, attempt: int, beat_dir: str,
                     hosts: list[hostlib.Host]) -> list[_Worker]:
        spec = self.spec
        members = [h for h in hosts for _ in range(h.slots)]
        # Fresh ports every attempt: the old ones may still be in TIME_WAIT.
        if spec.multi_host:
            config = cluster.make_tf_config(
                self._addresses(attempt, hosts), 0
            )
        else:
            config = cluster.make_tf_config(len(members), 0, host=spec.host)
        workers: list[_Worker] = []
        try:
            for i, host in enumerate(members):
                env = self._environment(
                    i, attempt, config, beat_dir, host, len(members)
                )
                heartbeat = env[protocol.ENV_HEARTBEAT_FILE]
                with open(heartbeat, "w"):
                    pass
                where = f"@{host}" if spec.multi_host else ""
                process = self._starter(host).start(
                    host, spec.command, env,
                    log_path=(
                        os.path.join(spec.log_dir, f"worker-{i}.log")
                        if spec.log_dir else None
                    ),
                    log_header=f"===== attempt {attempt}"
                    + (f" on {host}" if spec.multi_host else "") + " =====",
                    sink=self.out.write,
                    prefix=f"[worker-{i}{where}] ",
                )
                workers.append(_Worker(
                    i, process, heartbeat,
                    host.address if spec.multi_host else None,
                ))
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

    def _addresses(self, attempt: int, hosts: list[hostlib.Host]
                   ) -> list[str]:
        """`ADDRESS:PORT` of each worker, with ports free where it runs.

        Raises:
            _StartFailed: when a host cannot say which ports are free.
        """
        local = [h for h in hosts if not hasattr(
            self._starter(h), "free_ports")]
        # Free on every local address (TensorFlow listens on all of them).
        ports = iter(cluster.free_ports(sum(h.slots for h in local),
                                        host=""))
        addresses = []
        index = 0
        for h in hosts:
            if h in local:
                picked = [next(ports) for _ in range(h.slots)]
            else:
                try:
                    picked = self._starter(h).free_ports(h, h.slots)
                except OSError as e:
                    raise _StartFailed(Failure(
                        attempt, index, WorkerState.FAILED,
                        f"could not be started ({e})", None, time.time(),
                        h.address,
                    )) from None
            addresses += [f"{h.address}:{p}" for p in picked]
            index += h.slots
        return addresses

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
                    None, time.time(), w.host,
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
            time.time(), culprit.host,
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
                # An ssh worker whose connection ended: say so.
                lost = getattr(w.process, "ssh_failure", None)
                return Failure(
                    attempt, w.index, w.state,
                    f"lost its host ({lost})" if lost else _exit_reason(code),
                    code, time.time(), w.host,
                )
        return self._hung(workers, attempt)

    def _monitor(self, workers: list[_Worker], attempt: int,
                 missing: list[hostlib.Host]):
        """Waits for success (None), a failure, a returned host (`_GROW`)
        or an interruption."""
        self._returned = []
        self._answered = set()
        next_probe = time.monotonic() + _REGROW_SECONDS
        while self.interrupted is None:
            failure = self._check(workers, attempt)
            if failure is not None:
                return failure
            if all(w.state == WorkerState.SUCCEEDED for w in workers):
                return None
            if missing and any(
                w.state == WorkerState.SUCCEEDED for w in workers
            ):
                missing = []  # Finishing: too late to grow.
            if missing:
                if self._returned:
                    return _GROW
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + _REGROW_SECONDS
                    self._watch_missing(missing)
            time.sleep(_POLL_SECONDS)
        return None

    def _attempt(self, attempt: int, beat_dir: str,
                 hosts: list[hostlib.Host]):
        """Runs one attempt; returns its failure, `_GROW`, or None."""
        spec = self.spec
        size = sum(h.slots for h in hosts)
        where = (
            f" on {len(hosts)} host(s) ({', '.join(map(str, hosts))})"
            if spec.multi_host else ""
        )
        self.out.launcher(
            f"attempt {attempt}: starting {size} worker(s){where}: "
            f"{' '.join(spec.command)}"
        )
        missing = [h for h in self.hosts if h not in hosts] if (
            spec.elastic
        ) else []
        try:
            workers = self._start_group(attempt, beat_dir, hosts)
        except _StartFailed as e:
            return e.failure
        try:
            failure = self._monitor(workers, attempt, missing)
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
        elif failure is _GROW:
            back = ", ".join(str(h) for h in self._returned)
            self.out.launcher(
                f"host(s) {back} answer again; stopping the group to grow "
                f"it (SIGTERM: workers save and exit; SIGKILL after "
                f"{spec.grace_period:g}s)"
            )
            self._stop_group(workers, spec.grace_period)
        elif failure is None:
            self._stop_group(workers, 0.0)  # Reap; all exited.
        else:
            self._probe_early()
            self._stop_group(workers, spec.restart_grace_period)
        return failure

    def run(self) -> RunResult:
        spec = self.spec
        start = time.monotonic()
        _check_command(spec)
        if spec.log_dir:
            _check_log_dir(spec.log_dir)
        self._check_hosts_at_start()
        failures: list[Failure] = []
        sizes: list[int] = []
        # Two budgets, spent as torch's elastic agent does: a preemption
        # (exit 75, state saved) does not count toward --max_restarts.
        limit = {"restart": spec.max_restarts,
                 "preemption": spec.max_preemptions}
        remaining = dict(limit)
        attempt = returncode = 0
        hosts: list[hostlib.Host] | None = self.hosts
        beat_dir = spec.log_dir or tempfile.mkdtemp(prefix="kerasdist-run-")
        try:
            while True:
                attempt += 1
                sizes.append(sum(h.slots for h in hosts))
                failure = self._attempt(attempt, beat_dir, hosts)
                if self.interrupted is not None:
                    returncode = 128 + self.interrupted
                    break
                if failure is None:
                    returncode = 0
                    break
                if failure is _GROW:
                    hosts = self._gather()
                    if hosts is None:
                        returncode = 1
                        break
                    continue
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
                    hosts = self._gather()
                    if hosts is not None:
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
            sizes=sizes,
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

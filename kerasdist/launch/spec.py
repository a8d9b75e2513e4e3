"""What to run and how: `WorkerSpec`, whose fields are the launcher's options.

The launcher's options are declared once, as the fields of `WorkerSpec`
(with their help text and command-line flag in the field metadata); `run`,
the `kerasdist-run` command line and the options table in
docs/guide/fault_tolerance.md are all derived from them. The checks made
before anything starts (the command can be run, `log_dir` can be written)
live here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from kerasdist._validate import check_int, check_seconds
from kerasdist.errors import PermanentError
from kerasdist.launch import hosts as hostlib
from kerasdist.launch import protocol

__all__ = [
    "LauncherError",
    "WorkerSpec",
    "check_command",
    "check_log_dir",
    "option_fields",
]

_STARTERS = ("auto", "local", "ssh")

class LauncherError(PermanentError, ValueError):
    """The launcher was configured wrongly; nothing was started."""



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
            appended), `events.jsonl` (the launcher's events, one JSON
            object per line) and heartbeat files. Defaults to None (no log
            files; heartbeats in a temporary directory).
        timeout: float or None. A worker that prints nothing and does not
            touch its heartbeat file for this many seconds is hung, and the
            group restarts. Defaults to None (never).
        start_timeout: float or None. The same limit for a worker that has
            not touched its heartbeat file yet (start-up: importing
            TensorFlow, connecting the workers; `BackupAndRestore` touches
            it when `fit` begins, then about once a second). Defaults to
            None (`timeout`).
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
        None, "`D/worker-i.log` (all attempts, appended), `D/events.jsonl` "
        "(what the launcher did) and heartbeat files", metavar="D",
        parse=str, default_text="none",
    )
    timeout: float | None = _option(
        None, "a worker with no output and no heartbeat for `S` seconds is "
        "hung", metavar="S", parse=float, default_text="never",
    )
    start_timeout: float | None = _option(
        None, "the same limit before a worker's first heartbeat (start-up: "
        "imports, connecting, until `fit` begins)", metavar="T",
        parse=float, default_text="`S`",
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
        for name, zero, none in (
            ("timeout", False, True), ("start_timeout", False, True),
            ("grace_period", True, False),
            ("restart_grace_period", True, False), ("host_wait", True, False),
        ):
            try:
                object.__setattr__(self, name, check_seconds(
                    name, getattr(self, name), zero=zero, none=none))
            except ValueError as e:
                raise LauncherError(str(e)) from None
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



def check_command(spec: WorkerSpec) -> None:
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


def check_log_dir(log_dir: str) -> None:
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


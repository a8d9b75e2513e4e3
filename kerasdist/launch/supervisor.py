"""One process-group supervisor for the launcher, the tests and benchmarks.

A `Process` runs one command in its own session (so in its own process
group), with its output (stdout and stderr together) read by a thread that
copies it to a log file, to a line sink with a prefix, and/or to memory.

Signalling a process group is only safe while its id cannot belong to
anyone else. A group's id is its leader's PID, and Linux does not reuse a
PID while the process is a zombie (exited, not yet reaped). So `Process`
never reaps its leader before the end: `returncode` looks with
`waitid(..., WNOWAIT)`, which leaves the zombie in place, and only `reap()`
(called by `stop_all` after the last signal) collects it. Signals sent to
the group therefore reach the leader's group and nobody else, and the final
SIGKILL also ends what the leader left behind in its group.

Each child also asks the kernel for SIGKILL when the thread that started it
ends (`PR_SET_PDEATHSIG`), so workers never outlive a launcher that was
SIGKILLed. That covers the started process itself, not processes it starts
in other sessions; and it follows the starting *thread*, so start processes
from a thread that lives as long as they should (the main thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

__all__ = [
    "STOPPED_STATES",
    "Leader",
    "ProcessInfo",
    "Process",
    "process_state",
    "processes",
    "stop_all",
]

_POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.


def _load_prctl():
    """libc's prctl, looked up once in the parent (not after fork)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                           use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # Not Linux/glibc: no death signal.
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn`: SIGKILL this child when its starting thread ends.

    Runs in the child between fork and exec; it only calls the prctl
    looked up before the fork, then closes the race where the parent died
    before prctl ran (the child was already re-parented).
    """

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


STOPPED_STATES = ("T", "t")
"""`/proc` state letters of a stopped (SIGSTOP) or traced process."""


class ProcessInfo(NamedTuple):
    """One process as `/proc/PID/stat` describes it.

    Attributes:
        pid: int. Its process id.
        state: str. One letter: `"R"` running, `"S"` sleeping, `"T"`
            stopped (e.g. by SIGSTOP), `"Z"` zombie, ...
        ppid: int. Its parent's process id.
        pgid: int. Its process group id.

    Example:

    >>> info = ProcessInfo(42, "S", 1, 42)
    >>> info.state in STOPPED_STATES
    False
    """

    pid: int
    state: str
    ppid: int
    pgid: int


def _stat(pid: int | str) -> ProcessInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None  # No such process (any more), or no /proc.
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    if len(fields) < 3:
        return None
    return ProcessInfo(int(pid), fields[0].decode(), int(fields[1]),
                       int(fields[2]))


def process_state(pid: int) -> str | None:
    """The scheduler state of `pid` from `/proc/PID/stat`.

    Args:
        pid: int. A process id.

    Returns:
        str or None. One letter: `"R"` running, `"S"` sleeping, `"T"`
        stopped (e.g. by SIGSTOP), `"Z"` zombie, ...; None when there is no
        such process (or no /proc).

    Example:

    >>> process_state(os.getpid()) in ("R", "S")
    True
    """
    info = _stat(pid)
    return info.state if info else None


def processes() -> list[ProcessInfo]:
    """Every process of this machine (this PID namespace), from `/proc`.

    Returns:
        list of `ProcessInfo`; empty without /proc.

    Example:

    >>> me = [p for p in processes() if p.pid == os.getpid()]
    >>> me[0].ppid == os.getppid()
    True
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = (_stat(entry) for entry in entries if entry.isdigit())
    return [info for info in found if info is not None]


class Leader:
    """A started process that leads its own process group.

    Wraps a `subprocess.Popen` started with `start_new_session=True` that
    nobody has waited for yet. Its exit is seen without reaping it, so its
    group can be signalled safely until `reap()`.

    Args:
        popen: a `subprocess.Popen` in its own session, not yet waited for.

    Raises:
        ValueError: if `popen` was already reaped (its group id may belong
            to someone else by now).

    Example:

    ```python
    proc = subprocess.Popen(argv, start_new_session=True)
    stop_all([Leader(proc)], grace=5.0)
    ```
    """

    def __init__(self, popen: subprocess.Popen):
        if popen.returncode is not None:
            raise ValueError(
                f"Process {popen.pid} was already reaped; its process group "
                "id may belong to someone else now and cannot be signalled."
            )
        self._proc = popen
        self.pid = popen.pid
        self._returncode: int | None = None
        self._reaped = False

    @property
    def returncode(self) -> int | None:
        """Exit status, negative for a signal; None while running.

        Looks without reaping: the exited leader stays a zombie, so its
        process group id stays ours until `reap()`.
        """
        if self._returncode is not None:
            return self._returncode
        try:
            info = os.waitid(
                os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT
            )
        except ChildProcessError:  # Reaped elsewhere (SIGCHLD ignored).
            self._reaped = True
            self._returncode = self._proc.poll()
            return self._returncode
        if info is None or info.si_pid == 0:
            return None
        if info.si_code == os.CLD_EXITED:
            self._returncode = info.si_status
        else:  # CLD_KILLED, CLD_DUMPED.
            self._returncode = -info.si_status
        return self._returncode

    def running(self) -> bool:
        """True while the started process has not exited."""
        return self.returncode is None

    def signal(self, sig: int) -> None:
        """Sends `sig` to the process group (never once reaped).

        Args:
            sig: int. The signal, e.g. `signal.SIGTERM`.
        """
        if self._reaped:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def state(self) -> str | None:
        """The leader's `/proc` state letter (`"T"`: stopped); see
        `process_state`."""
        return None if self._reaped else process_state(self.pid)

    def reap(self) -> int:
        """Waits for the leader and collects it.

        Returns:
            int. The exit status (negative: signal).
        """
        code = self._proc.wait()
        if self._returncode is None:
            self._returncode = code
        self._reaped = True
        return self._returncode


class Process(Leader):
    """One command in its own session, its output pumped by a thread.

    Args:
        command: list of str. Program and arguments.
        env: mapping or None. The whole environment of the child. Defaults
            to None (the parent's).
        cwd: str or None. Working directory. Defaults to None.
        log_path: str or None. Append the raw output to this file. Defaults
            to None.
        log_header: str or None. A line written to `log_path` first, e.g.
            `"===== attempt 2 ====="`. Defaults to None.
        sink: callable or None. Called with complete output lines, each
            prefixed with `prefix` and ending in a newline (several lines
            per call). Defaults to None.
        prefix: str. Put before each line given to `sink`. Defaults to "".
        capture: bool. Keep the output in memory for `output()`. Defaults
            to False.
        die_with_parent: bool. SIGKILL the child when the thread starting
            it ends (`PR_SET_PDEATHSIG`). Defaults to True.
        stdin_pipe: bool. Give the child a pipe as standard input, written
            through `stdin` (binary); else it reads `/dev/null`. Defaults to
            False.
        separate_stderr: bool. Keep the child's standard error apart, in
            the pipe `stderr` (binary), which the caller must read; else
            it is merged into the pumped output. Defaults to False.

    Raises:
        OSError: when the command cannot be started (not found, not
            executable); nothing is left running.

    Example:

    >>> p = Process(["true"], capture=True)
    >>> p.reap()  # Waits for it: stop_all would SIGTERM it if still up.
    0
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        log_path: str | None = None,
        log_header: str | None = None,
        sink: Callable[[str], None] | None = None,
        prefix: str = "",
        capture: bool = False,
        die_with_parent: bool = True,
        stdin_pipe: bool = False,
        separate_stderr: bool = False,
    ):
        self.command = list(command)
        self._chunks: list[bytes] | None = [] if capture else None
        self._sink = sink
        self._prefix = prefix
        self.last_output = time.monotonic()
        log = open(log_path, "ab") if log_path else None  # noqa: SIM115
        try:
            if log and log_header:
                log.write(f"{log_header}\n".encode())
                log.flush()
            popen = subprocess.Popen(
                self.command,
                env=None if env is None else dict(env),
                cwd=cwd,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=(
                    subprocess.PIPE if separate_stderr else subprocess.STDOUT
                ),
                start_new_session=True,  # Own session and process group.
                preexec_fn=(
                    _die_with_parent(os.getpid()) if die_with_parent
                    else None
                ),
            )
        except BaseException:
            if log:
                log.close()
            raise
        super().__init__(popen)
        self.stdin = popen.stdin
        self.stderr = popen.stderr
        self._reader = threading.Thread(
            target=self._pump,
            args=(log,),
            name=f"kerasdist-output-{self.pid}",
            daemon=True,
        )
        self._reader.start()

    def _route(self, data: bytes, log, pending: bytes = b"") -> bytes:
        """Copies output to the log file, the capture and (whole lines,
        prefixed) the sink; returns the unfinished line left after
        `pending + data`."""
        self.last_output = time.monotonic()
        if log:
            log.write(data)
            log.flush()
        if self._chunks is not None:
            self._chunks.append(data)
        if self._sink is None:
            return b""
        *lines, pending = (pending + data).split(b"\n")
        if lines:
            self._sink("".join(
                self._prefix + ln.decode("utf-8", "replace") + "\n"
                for ln in lines
            ))
        return pending

    def _pump(self, log) -> None:
        pending = b""
        try:
            while True:
                chunk = self._proc.stdout.read1(65536)
                if not chunk:
                    break
                pending = self._route(chunk, log, pending)
            if pending and self._sink is not None:
                self._sink(
                    self._prefix + pending.decode("utf-8", "replace") + "\n"
                )
        finally:
            self._proc.stdout.close()
            if log:
                log.close()

    def reap(self, output_timeout: float = 5.0) -> int:
        """Waits for the leader, collects it, and for the output to end.

        Args:
            output_timeout: float. Seconds to wait for the output to close
                (a process that left the group may hold it). Defaults to 5.

        Returns:
            int. The exit status (negative: signal).
        """
        code = super().reap()
        self._reader.join(timeout=output_timeout)
        if self.stdin is not None and not self.stdin.closed:
            try:
                self.stdin.close()
            except OSError:  # EPIPE flushing what the child never read.
                pass
        return code

    def output(self) -> str:
        """Output captured so far (with `capture=True`), as text."""
        return b"".join(self._chunks or []).decode("utf-8", "replace")


def stop_all(processes: Iterable[Leader], grace: float) -> None:
    """Stops every process group: SIGTERM, then SIGKILL after `grace`.

    SIGTERM goes to the groups whose leader still runs; after `grace`
    seconds (or as soon as every leader exited) every group gets SIGKILL,
    which also ends what an exited leader left behind; then all are reaped.

    Args:
        processes: iterable of `Leader` (e.g. `Process`).
        grace: float. Seconds between SIGTERM and SIGKILL; 0 sends SIGKILL
            at once.

    Example:

    ```python
    stop_all(workers, grace=10.0)
    ```
    """
    processes = list(processes)
    running = [p for p in processes if p.running()]
    if grace > 0:
        for p in running:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            p.running() for p in running
        ):
            time.sleep(_POLL_SECONDS)
    for p in processes:
        p.signal(signal.SIGKILL)
    for p in processes:
        p.reap()

"""Drive one elastic `kerasdist-run` over emulated hosts from a test.

`HostBedRun` starts `python -m kerasdist.launch --hosts ...` in the
background, in a process group of its own, with its output in a log file
and every output line time-stamped as it arrives. What the launcher did
and when (a host unreachable, the group shrunk or grown) is read from its
events (`events`, `wait_event`: `logs/events.jsonl`), not its console. A
test then waits for steps or events, takes a host down (`kill_host`: SIGKILL the
process groups of that host's workers, found from the pid files they write,
plus `kerasdist.testing.hosts.partition` to cut its network), and either
waits for the run to succeed (`finish`) or stops it (`stop`), which also
kills any worker still alive: nothing is left behind.

The contract with the worker script: each worker writes
`PID_DIR/<host address>-<anything>.pid` holding `"<pid> <pgid>"` (its
process id and process group id; the launcher starts every worker in a
process group of its own), and the chief appends one JSON line per trained
step to a step log, each with an `"attempt"` key (`KERASDIST_RESTART_COUNT`).
`tests/elastic_hosts_worker.py` is such a worker.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from kerasdist.testing import hosts as testbed
from kerasdist.testing import kill_group

__all__ = ["HostBedRun"]

_POLL_SECONDS = 0.1
_TAIL = 6000  # Characters of the launcher log shown in errors.


def _kerasdist_path() -> list[str]:
    """The directory holding the `kerasdist` this process imported, when it
    is not installed (a source tree); nothing for an installed package."""
    import site

    import kerasdist

    root = str(Path(kerasdist.__file__).resolve().parent.parent)
    installed = {str(Path(p).resolve()) for p in site.getsitepackages()}
    return [] if root in installed else [root]


def _address(host: testbed.EmulatedHost | str) -> str:
    return host.address if isinstance(host, testbed.EmulatedHost) else str(
        host)


class HostBedRun:
    """One `kerasdist-run` over emulated hosts, running in the background.

    The launcher runs as `python -m kerasdist.launch --hosts A,B,...
    --host_wait W --timeout T --start_timeout S --max_restarts R
    --log_dir WORKDIR/logs *launcher_args [--min_workers M] -- *command`
    (without `--hosts` when `hosts` is empty), with the
    kerasdist this process imported (an installed package, or a source tree
    put on `PYTHONPATH`) and no inherited `TF_CONFIG`; its output goes to
    `WORKDIR/launcher.log`. Use it as a context manager (or call `stop`) so
    that the launcher and every worker it started are killed at the end,
    even when the test fails.

    Args:
        command: list of str. The worker command, e.g.
            `[sys.executable, "worker.py", "--pid_dir", ...]`.
        hosts: list of `EmulatedHost` or loopback address strings; empty
            for a one-host run (then give `--num_workers` in
            `launcher_args`).
        workdir: str or path. Directory for `launcher.log` and `logs/`.
        pid_dir: str, path or None. Where the workers write their
            `<address>-*.pid` files. Defaults to `WORKDIR/pids`.
        step_log: str, path or None. The chief's JSON-lines step log (each
            record with an `"attempt"` key), read by `steps` and
            `wait_steps`. Defaults to None.
        min_workers: int or None. `--min_workers` (elastic). Defaults to
            None (every host needed).
        host_wait: float. `--host_wait` seconds. Defaults to 3.
        timeout: float. The launcher's `--timeout` (hang detection)
            seconds. Defaults to 20.
        start_timeout: float. The launcher's `--start_timeout`: the same
            for a worker's start-up (until its first heartbeat), which on a
            loaded machine can take far longer than a step. Defaults to
            120.
        max_restarts: int. `--max_restarts`. Defaults to 4.
        run_timeout: float. Seconds the whole run may take before
            `wait_for` and `finish` give up. Defaults to 300.
        env: mapping or None. Extra environment variables for the launcher
            (and so the workers). Defaults to None.
        python_path: list of str. Directories put before this kerasdist on
            `PYTHONPATH` (e.g. the directory of helper modules the worker
            imports). Defaults to none.
        cwd: str, path or None. The launcher's working directory.
            Defaults to `workdir`.
        launcher_args: list of str. More launcher options, e.g.
            `["--num_workers", "2"]` (with `hosts`: 2 slots on each host;
            with no hosts: 2 workers on 127.0.0.1). Defaults to none.

    Raises:
        ValueError: if a host address is not in 127.0.0.0/8.

    Example:

    ```python
    hosts = testbed.emulated_hosts(3)
    with HostBedRun(command, hosts, tmp_path, min_workers=2,
                    step_log=tmp_path / "out" / "steps-0.jsonl") as run:
        run.wait_steps(6)
        lost_at = time.time()
        with testbed.partition(hosts[2]):
            run.kill_host(hosts[2])
            log = run.finish()
        print(run.event("shrunk")["time"] - lost_at)
    ```
    """

    def __init__(
        self,
        command: Sequence[str],
        hosts: Sequence[testbed.EmulatedHost | str],
        workdir: str | os.PathLike,
        *,
        pid_dir: str | os.PathLike | None = None,
        step_log: str | os.PathLike | None = None,
        min_workers: int | None = None,
        host_wait: float = 3.0,
        timeout: float = 20.0,
        start_timeout: float = 120.0,
        max_restarts: int = 4,
        run_timeout: float = 300.0,
        env: Mapping[str, str] | None = None,
        python_path: Sequence[str] = (),
        cwd: str | os.PathLike | None = None,
        launcher_args: Sequence[str] = (),
    ):
        for host in hosts:
            if not isinstance(host, testbed.EmulatedHost):
                testbed.EmulatedHost(str(host), str(host))  # Validates.
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pid_dir = Path(pid_dir) if pid_dir else self.workdir / "pids"
        self.step_log = Path(step_log) if step_log else None
        self.log_path = self.workdir / "launcher.log"
        self._lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        launcher_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        launcher_env.update(env or {})
        launcher_env.pop("TF_CONFIG", None)
        launcher_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (*python_path, *_kerasdist_path(),
                        os.environ.get("PYTHONPATH"))
            if p)
        argv = [sys.executable, "-m", "kerasdist.launch"]
        if hosts:
            argv += ["--hosts", ",".join(_address(h) for h in hosts)]
        argv += [
            "--host_wait", f"{host_wait:g}", "--timeout", f"{timeout:g}",
            "--start_timeout", f"{start_timeout:g}",
            "--max_restarts", str(max_restarts),
            "--log_dir", str(self.workdir / "logs"), *launcher_args,
        ]
        if min_workers is not None:
            argv += ["--min_workers", str(min_workers)]
        self._log_file = open(self.log_path, "w")  # noqa: SIM115
        self.started = time.time()
        self.proc = subprocess.Popen(
            [*argv, "--", *command], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=launcher_env,
            cwd=os.fspath(cwd) if cwd else str(self.workdir),
            start_new_session=True, text=True, errors="replace",
        )
        self.deadline = time.monotonic() + run_timeout
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append((time.time(), line.rstrip("\n")))
                if not self._log_file.closed:
                    self._log_file.write(line)
                    self._log_file.flush()

    def __enter__(self) -> HostBedRun:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        """The launcher's output so far (its own and its workers' lines).

        Returns:
            str.

        Example:

        ```python
        assert "workers per attempt: 3 -> 2" in run.log()
        ```
        """
        with self._lock:
            return "".join(line + "\n" for _, line in self._lines)

    def lines(self) -> list[tuple[float, str]]:
        """Every output line so far with the time it arrived.

        Returns:
            list of (seconds since the epoch, line without newline).

        Example:

        ```python
        first_time, first_line = run.lines()[0]
        ```
        """
        with self._lock:
            return list(self._lines)

    def line_time(self, pattern: str, after: float = 0.0) -> float | None:
        """When the first line matching `pattern` arrived after `after`.

        Args:
            pattern: str. A regular expression (`re.search`).
            after: float. Only lines that arrived later than this time
                (seconds since the epoch) count. Defaults to 0.

        Returns:
            float (seconds since the epoch) or None if no line matches.

        Example:

        ```python
        restarted = run.line_time(r"attempt 2: starting", after=lost_at)
        ```
        """
        regex = re.compile(pattern)
        for when, line in self.lines():
            if when > after and regex.search(line):
                return when
        return None

    def events(self) -> list[dict]:
        """The launcher's events so far (`logs/events.jsonl`), in order.

        Returns:
            list of dict, each with `"event"` (its name) and `"time"`
            (seconds since the epoch); see the fault-tolerance guide.

        Example:

        ```python
        sizes = [e["size"] for e in run.events()
                 if e["event"] == "attempt_started"]
        ```
        """
        from kerasdist.launch import events

        return events.read(self.workdir / "logs")

    def event(self, name: str, after: float = 0.0, **fields) -> dict | None:
        """The first event called `name` after `after` whose fields match.

        Args:
            name: str. The event's name, e.g. `"shrunk"`.
            after: float. Only events later than this time (seconds since
                the epoch) count. Defaults to 0.
            **fields: values the event must have, e.g. `size=2`.

        Returns:
            dict or None.

        Example:

        ```python
        shrunk = run.event("shrunk", after=lost_at)
        print(shrunk["time"] - lost_at, shrunk["new_size"])
        ```
        """
        for e in self.events():
            if e["event"] == name and e["time"] > after and all(
                e.get(k) == v for k, v in fields.items()
            ):
                return e
        return None

    def wait_event(self, name: str, after: float = 0.0, **fields) -> dict:
        """Waits for `event(name, after, **fields)` and returns it.

        Raises:
            AssertionError: as `wait_for`, with the events seen so far.

        Example:

        ```python
        run.wait_event("attempt_started", size=2)
        ```
        """
        found: list[dict] = []

        def check() -> bool:
            event = self.event(name, after, **fields)
            if event is not None:
                found.append(event)
            return bool(found)

        what = f"event {name!r} with {fields}" if fields else f"{name!r}"
        self.wait_for(what, check)
        return found[0]

    def steps(self) -> list[dict]:
        """The chief's step log records so far (empty without `step_log`).

        Returns:
            list of dict, in the order they were written.

        Example:

        ```python
        attempts = {r["attempt"] for r in run.steps()}
        ```
        """
        import json

        if self.step_log is None or not self.step_log.exists():
            return []
        records = []
        with open(self.step_log) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # A line being written.
                    records.append(json.loads(line))
        return records

    def _fail(self, why: str) -> AssertionError:
        return AssertionError(f"{why}:\n{self.log()[-_TAIL:]}")

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        """Waits until `check()` is true.

        Args:
            what: str. What is awaited, for the error message.
            check: callable returning bool, polled every 0.1 s.

        Raises:
            AssertionError: with the log's tail if the launcher ended first
                or the run's time ran out.

        Example:

        ```python
        run.wait_for("the group on two hosts",
                     lambda: "starting 2 worker(s)" in run.log())
        ```
        """
        while not check():
            if self.proc.poll() is not None:
                raise self._fail(f"launcher ended before {what}")
            if time.monotonic() > self.deadline:
                raise self._fail(f"timed out waiting for {what}")
            time.sleep(_POLL_SECONDS)

    def wait_steps(self, n: int, attempt: int | None = None) -> None:
        """Waits until the step log has `n` steps (of `attempt` or later).

        Args:
            n: int. Steps to wait for.
            attempt: int or None. Count only records of this attempt
                (restart count) or later. Defaults to None (all).

        Raises:
            AssertionError: as `wait_for`.

        Example:

        ```python
        run.wait_steps(3, attempt=1)  # 3 steps after the first restart.
        ```
        """
        self.wait_for(f"{n} steps", lambda: sum(
            1 for r in self.steps()
            if attempt is None or r["attempt"] >= attempt) >= n)

    def _pid_files(self, address: str | None = None) -> list[tuple[str, int,
                                                                   int]]:
        if not self.pid_dir.exists():
            return []
        found = []
        for name in sorted(os.listdir(self.pid_dir)):
            if address is not None and not name.startswith(f"{address}-"):
                continue
            with contextlib.suppress(OSError, ValueError):
                pid, pgid = map(
                    int, (self.pid_dir / name).read_text().split())
                found.append((name, pid, pgid))
        return found

    def _kill_groups(self, address: str | None = None) -> int:
        killed = 0
        for _, pid, pgid in self._pid_files(address):
            try:  # Only our own worker: still alive in its own group.
                if os.getpgid(pid) == pgid:
                    os.killpg(pgid, signal.SIGKILL)
                    killed += 1
            except ProcessLookupError:
                pass
        return killed

    def kill_host(self, host: testbed.EmulatedHost | str) -> int:
        """SIGKILLs every live worker process group of `host`.

        A group is killed only while its pid file's process is alive and
        still leads that group, so a recycled pid is never signalled. Cut
        the host's network too (`hosts.partition`) for a host that is gone
        rather than a crashed worker.

        Args:
            host: `EmulatedHost` or its address.

        Returns:
            int. Process groups killed.

        Example:

        ```python
        with testbed.partition(hosts[2]):
            run.kill_host(hosts[2])
        ```
        """
        return self._kill_groups(_address(host))

    def worker_pids(self) -> dict[str, int]:
        """Worker process ids from the pid files, by file name.

        Returns:
            dict {pid file name: pid}.

        Example:

        ```python
        assert not any(os.path.exists(f"/proc/{p}")
                       for p in run.worker_pids().values())
        ```
        """
        return {name: pid for name, pid, _ in self._pid_files()}

    def finish(self) -> str:
        """Waits for the launcher to end (within the run's time) and
        checks that it succeeded.

        Returns:
            str. The whole launcher log.

        Raises:
            AssertionError: with the log's tail if the launcher did not
                exit with status 0, or not within the run's time (it is
                killed then).

        Example:

        ```python
        log = run.finish()
        assert "workers per attempt: 3 -> 2 -> 3" in log
        ```
        """
        timed_out = False
        try:
            self.proc.wait(timeout=max(1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_group(self.proc)
        self._reader.join(timeout=10)
        if timed_out:
            raise self._fail("the run did not end within its run_timeout "
                             "(the launcher was killed)")
        if self.proc.returncode != 0:
            raise AssertionError(
                f"launcher exited with status {self.proc.returncode}:\n"
                f"{self.log()[-8000:]}")
        return self.log()

    def stop(self) -> None:
        """Kills the launcher's process group and every worker still alive
        (by process group, from the pid files). Safe to call twice.

        Example:

        ```python
        run.stop()
        ```
        """
        kill_group(self.proc, grace=1.0)
        self._kill_groups()
        self._reader.join(timeout=10)
        with self._lock:
            if not self._log_file.closed:
                self._log_file.close()
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()

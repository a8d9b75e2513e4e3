"""Helpers for tests: a multi-worker subprocess harness on 127.0.0.1.

`run_workers` starts N real Python processes, each with its own `TF_CONFIG`
on free loopback ports, in its own process group, bounded by a timeout; on
timeout or failure every process group it started is killed (by PID, never
by name).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from kerasdist import cluster

__all__ = ["WorkerResult", "WorkersFailed", "kill_group", "run_workers"]


@dataclasses.dataclass
class WorkerResult:
    """Outcome of one worker process.

    Args:
        index: int. Worker index.
        returncode: int. Exit status (negative: killed by that signal).
        output: str. Combined stdout and stderr.

    Example:

    >>> WorkerResult(0, 0, "done").ok
    True
    """

    index: int
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        """True if the worker exited with status 0."""
        return self.returncode == 0


class WorkersFailed(AssertionError):
    """A worker failed or the group timed out; the message has their logs."""


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM then SIGKILL the process group led by `proc`.

    Args:
        proc: a `subprocess.Popen` started with `start_new_session=True`.
        grace: float. Seconds between SIGTERM and SIGKILL. Defaults to 5.

    Example:

    ```python
    kill_group(proc)
    ```
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # Reap any stragglers left in the group after the leader exited.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_workers(
    argv: Sequence[str],
    num_workers: int,
    *,
    timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cwd: str | None = None,
) -> list[WorkerResult]:
    """Runs `python *argv` as `num_workers` workers on 127.0.0.1.

    Args:
        argv: list of str. Script and arguments (run with `sys.executable`).
        num_workers: int. Number of worker processes.
        timeout: float. Seconds for the whole group. Defaults to 180.
        env: mapping or None. Extra environment variables.
        check: bool. Raise `WorkersFailed` if any worker fails. Defaults to
            True.
        cwd: str or None. Working directory.

    Returns:
        list of `WorkerResult`, by worker index.

    Raises:
        WorkersFailed: on timeout (always) or a failed worker (if `check`).

    Example:

    ```python
    results = run_workers(["train.py", "--out", str(tmp_path)], 2)
    ```
    """
    config = cluster.make_tf_config(num_workers, 0)
    procs, logs = [], []
    deadline = time.monotonic() + timeout
    try:
        for i in range(num_workers):
            config["task"]["index"] = i
            worker_env = dict(os.environ)
            worker_env.update(env or {})
            worker_env["TF_CONFIG"] = json.dumps(config)
            worker_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            log = open(_tmp_log(i), "w+")  # noqa: SIM115
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv],
                    env=worker_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=cwd,
                )
            )
        timed_out = False
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out or any(p.returncode for p in procs):
            # One failure leaves its peers blocked in a collective.
            for p in procs:
                kill_group(p, grace=1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p, grace=1.0)
    results = []
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        log.seek(0)
        results.append(WorkerResult(i, p.returncode, log.read()))
        log.close()
        os.unlink(log.name)
    if timed_out or (check and any(not r.ok for r in results)):
        why = f"timed out after {timeout:.0f}s" if timed_out else "failed"
        detail = "\n".join(
            f"----- worker {r.index} (exit {r.returncode}) -----\n"
            f"{r.output[-6000:]}"
            for r in results
        )
        raise WorkersFailed(f"multi-worker run {why}:\n{detail}")
    return results


def _tmp_log(i: int) -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"kd-worker{i}-", suffix=".log")
    os.close(fd)
    return path

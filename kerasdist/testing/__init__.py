"""Helpers for tests: a multi-worker subprocess harness on 127.0.0.1.

`run_workers` starts N real Python processes, each with its own `TF_CONFIG`
on free loopback ports, in its own process group, bounded by a timeout; on
timeout or failure every process group it started is killed (by process
group id, never by name). `run_scenario` runs a worker script that writes
one JSON result per worker and returns those results. Both use the
launcher's process-group supervisor (`kerasdist.launch.supervisor`), so the
workers also die if the test process is killed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from kerasdist import cluster
from kerasdist.launch import supervisor

__all__ = [
    "WorkerResult",
    "WorkersFailed",
    "gone",
    "kill_group",
    "run_scenario",
    "run_workers",
    "wait_for",
]

_POLL_SECONDS = 0.05


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
    """SIGTERM then SIGKILL the process group led by `proc`, then reap it.

    Does nothing if `proc` was already reaped (e.g. by `communicate()` or
    `wait()`): its process group id may belong to someone else by then.
    To also end what such a process left in its group, stop it through
    this function (or `kerasdist.launch.supervisor`) instead of waiting
    for it.

    Args:
        proc: a `subprocess.Popen` started with `start_new_session=True`.
        grace: float. Seconds between SIGTERM and SIGKILL. Defaults to 5.

    Example:

    ```python
    kill_group(proc)
    ```
    """
    if proc.returncode is not None:
        return
    supervisor.stop_all([supervisor.Leader(proc)], grace)


def wait_for(condition: Callable[[], object], seconds: float,
             process: supervisor.Process | None = None) -> None:
    """Polls `condition` until it is true; fails after `seconds`.

    Args:
        condition: callable. Checked every 50 ms.
        seconds: float. How long to wait.
        process: `supervisor.Process` or None. Its captured output goes
            into the failure message. Defaults to None.

    Raises:
        AssertionError: after `seconds`, with the process's output.

    Example:

    ```python
    wait_for(lambda: not launcher.running(), 30, launcher)
    ```
    """
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            output = process.output() if process is not None else ""
            raise AssertionError(
                f"gave up after {seconds}s waiting:\n{output}")
        time.sleep(_POLL_SECONDS)


def gone(pid: int) -> bool:
    """True when process `pid` has exited.

    A zombie counts: a killed process whose parent died lingers as one
    until init reaps it, dead all the same.

    Example:

    >>> gone(2 ** 22 + 1)  # Above Linux's largest pid.
    True
    """
    return supervisor.process_state(pid) in (None, "Z", "X")


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
        check: bool. Raise `WorkersFailed` if any worker fails, and stop
            the others as soon as one fails (they would block in their
            next collective). Defaults to True.
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
    procs: list[supervisor.Process] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        for i in range(num_workers):
            config["task"]["index"] = i
            worker_env = dict(os.environ)
            worker_env.update(env or {})
            worker_env["TF_CONFIG"] = json.dumps(config)
            worker_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            procs.append(supervisor.Process(
                [sys.executable, *argv], env=worker_env, cwd=cwd,
                capture=True,
            ))
        while any(p.running() for p in procs):
            if check and any(p.returncode for p in procs):
                break  # One failure leaves its peers blocked: stop them.
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(_POLL_SECONDS)
    finally:
        supervisor.stop_all(procs, grace=1.0)
    results = [
        WorkerResult(i, p.returncode, p.output())
        for i, p in enumerate(procs)
    ]
    if timed_out or (check and any(not r.ok for r in results)):
        why = f"timed out after {timeout:.0f}s" if timed_out else "failed"
        detail = "\n".join(
            f"----- worker {r.index} (exit {r.returncode}) -----\n"
            f"{r.output[-6000:]}"
            for r in results
        )
        raise WorkersFailed(f"multi-worker run {why}:\n{detail}")
    return results


def run_scenario(
    script: str | os.PathLike,
    scenario: str,
    out_dir: str | os.PathLike,
    *,
    num_workers: int = 2,
    timeout: float = 200.0,
    env: Mapping[str, str] | None = None,
) -> list[dict]:
    """Runs one scenario of a worker script on N workers; returns each
    worker's JSON result.

    The script is run as `python SCRIPT --out OUT_DIR --scenarios SCENARIO`
    by `run_workers`; worker `i` writes `OUT_DIR/result-<i>.json`, a dict
    with one entry per scenario it ran.

    Args:
        script: str or path. The worker script.
        scenario: str. The scenario's name.
        out_dir: str or path. Directory the workers write to.
        num_workers: int. Number of workers. Defaults to 2.
        timeout: float. Seconds for the whole group. Defaults to 200.
        env: mapping or None. Extra environment variables.

    Returns:
        list of dict: `result-<i>.json[scenario]`, by worker index.

    Raises:
        WorkersFailed: if a worker failed or the group timed out.

    Example:

    ```python
    runs = run_scenario("tests/toolkit_worker.py", "accumulation", tmp_path)
    assert runs[0]["iterations"] == runs[1]["iterations"]
    ```
    """
    out_dir = os.fspath(out_dir)
    run_workers(
        [os.fspath(script), "--out", out_dir, "--scenarios", scenario],
        num_workers, timeout=timeout, env=env,
    )
    results = []
    for i in range(num_workers):
        with open(os.path.join(out_dir, f"result-{i}.json")) as f:
            results.append(json.load(f)[scenario])
    return results

"""`kerasdist.testing.elastic.HostBedRun` with a small real worker.

The worker is a plain Python process (no TensorFlow, so these tests take
seconds): it writes its pid file and, on the chief, a step log, as
`tests/elastic_hosts_worker.py` does. The TensorFlow scenarios that use the
harness are in test_elastic_hosts.py.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from kerasdist.testing import elastic
from kerasdist.testing import hosts as testbed

HOSTS = testbed.emulated_hosts(2, first=30)  # 127.0.0.30, .31

WORKER = textwrap.dedent("""
    import json, os, sys, time
    out, pids, exit_code = sys.argv[1], sys.argv[2], int(sys.argv[3])
    host = os.environ["KERASDIST_HOST"]
    rank = int(os.environ["KERASDIST_WORKER_INDEX"])
    attempt = int(os.environ["KERASDIST_RESTART_COUNT"])
    os.makedirs(pids, exist_ok=True)
    with open(os.path.join(pids, f"{host}-a{attempt}-w{rank}.pid"), "w") as f:
        f.write(f"{os.getpid()} {os.getpgid(0)}")
    print("worker up", flush=True)
    if exit_code:
        sys.exit(exit_code)
    for step in range(3):
        if rank == 0:
            with open(out, "a") as f:
                f.write(json.dumps({"attempt": attempt, "step": step}) + "\\n")
    time.sleep(120)
""")


def _run(tmp_path, exit_code=0, run_timeout=120, **kwargs):
    return elastic.HostBedRun(
        [sys.executable, "-c", WORKER, str(tmp_path / "steps.jsonl"),
         str(tmp_path / "pids"), str(exit_code)],
        HOSTS, tmp_path, step_log=tmp_path / "steps.jsonl",
        run_timeout=run_timeout, **kwargs,
    )


def _alive(pid):
    return os.path.exists(f"/proc/{pid}")


@pytest.mark.timeout(240)
def test_waits_kills_a_host_and_stops_everything(tmp_path):
    with _run(tmp_path, max_restarts=0) as run:
        run.wait_steps(3)
        run.wait_for("both pid files", lambda: len(run.worker_pids()) == 2)
        assert [r["step"] for r in run.steps()] == [0, 1, 2]
        started = run.line_time(r"attempt 1: starting 2 worker\(s\)")
        assert started is not None and run.started <= started <= time.time()
        assert run.line_time(r"attempt 1: starting", after=time.time()) is (
            None)
        pids = run.worker_pids()
        lost = {n: p for n, p in pids.items()
                if n.startswith(f"{HOSTS[1].address}-")}
        assert len(lost) == 1
        assert run.kill_host(HOSTS[1]) == 1
        run.wait_for("the lost worker's death",
                     lambda: not any(_alive(p) for p in lost.values()))
        # The launcher sees it die (no restarts left) and gives up.
        run.wait_for("the launcher's failure line",
                     lambda: "giving up" in run.log())
    assert not any(_alive(p) for p in pids.values())
    assert run.proc.poll() is not None
    text = run.log_path.read_text()
    assert "[worker-0@127.0.0.30] worker up" in text
    assert "worker-1 on 127.0.0.31 died (SIGKILL)" in text


@pytest.mark.timeout(240)
def test_finish_reports_a_failed_run_with_its_log(tmp_path):
    with _run(tmp_path, exit_code=3, max_restarts=0) as run, pytest.raises(
        AssertionError, match=r"(?s)status 3.*exited with status 3"
    ):
        run.finish()


@pytest.mark.timeout(240)
def test_finish_kills_a_run_that_outlives_its_time(tmp_path):
    with _run(tmp_path, run_timeout=5) as run:
        run.wait_for("both pid files", lambda: len(run.worker_pids()) == 2)
        pids = run.worker_pids()
        with pytest.raises(AssertionError, match="did not end within"):
            run.finish()
    assert run.proc.returncode is not None
    assert not any(_alive(p) for p in pids.values())


@pytest.mark.timeout(240)
def test_wait_for_names_what_it_waited_for_when_the_run_ends(tmp_path):
    with _run(tmp_path, exit_code=3, max_restarts=0) as run, pytest.raises(
        AssertionError, match="launcher ended before 5 steps"
    ):
        run.wait_steps(5)


def test_non_loopback_host_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="127.0.0.0/8"):
        elastic.HostBedRun([sys.executable, "-c", "pass"],
                           ["10.0.0.1"], tmp_path)
    assert not (tmp_path / "launcher.log").exists()

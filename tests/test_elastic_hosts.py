"""Elastic training across emulated hosts: hosts lost, cut off, back.

Three emulated hosts (127.0.0.2-4, one worker each) run
`elastic_hosts_worker.py` under `kerasdist-run --hosts ... --min_workers`.
A host is taken down the way a dead machine looks from the network: its
workers are SIGKILLed (by process group, from the pid files they wrote)
and every packet to or from its address is dropped (an nftables table
that the `partition` block deletes, even on failure). Each scenario must
end with the same weights as an unfailed 3-worker run with the same global
batch, and the chief's step log must show every batch of every epoch
applied exactly once (the same (epoch, step, id fingerprint) sequence).
A host lost for good, the chief's host lost and two losses down to
`--min_workers` are one run (3 -> 2 -> 1: 127.0.0.4, then the chief's
127.0.0.2) that three tests check.

Tolerance: weights are compared with rtol=1e-5, atol=1e-6. Two and three
replicas sum the same per-example gradients in a different order, so
float32 round-off differs (measured max difference: see the closing note
of issue 10, printed by each test with `-s`).
"""

from __future__ import annotations

import os
import re
import sys

import fault_worker
import numpy as np
import pytest

from kerasdist.testing import elastic
from kerasdist.testing import hosts as testbed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "elastic_hosts_worker.py")
HOSTS = testbed.emulated_hosts(3)  # 127.0.0.2, .3, .4
TIMEOUT = 300  # Seconds for one launcher run.
STEPS = 2 * 192 // 12  # Epochs x batches of the global batch 12.

pytestmark = [pytest.mark.real_component, pytest.mark.slow,
              pytest.mark.timeout(TIMEOUT + 120)]


@pytest.fixture(scope="module", autouse=True)
def _needs_nftables():
    why = testbed.nftables_unavailable()
    if why:
        pytest.skip(f"emulated host loss needs nftables: {why}")


def start_run(tmp, min_workers=2, step_delay=0.25) -> elastic.HostBedRun:
    """One `kerasdist-run` over the three emulated hosts, in the
    background; its output goes to `launcher.log`."""
    out = tmp / "out"
    return elastic.HostBedRun(
        [sys.executable, WORKER, "--out", str(out),
         "--backup_dir", str(tmp / "backup"),
         "--pid_dir", str(tmp / "pids"),
         "--step_delay", str(step_delay)],
        HOSTS, tmp, pid_dir=tmp / "pids", step_log=out / "steps-0.jsonl",
        min_workers=min_workers, host_wait=3, timeout=20, max_restarts=4,
        run_timeout=TIMEOUT, python_path=[HERE], cwd=HERE,
    )


@pytest.fixture
def run(tmp_path):
    runs = []

    def start(**kwargs):
        runs.append(start_run(tmp_path, **kwargs))
        return runs[-1]

    yield start
    for r in runs:
        r.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An unfailed 3-host run: final weights and step fingerprints."""
    r = start_run(tmp_path_factory.mktemp("reference"), step_delay=0.0)
    try:
        log = r.finish()
    finally:
        r.stop()
    assert "workers per attempt" not in log
    weights = np.load(r.workdir / "out" / "final.npz")
    steps = r.steps()
    assert len(steps) == STEPS
    return [weights[k] for k in sorted(weights, key=lambda k: int(k[4:]))], (
        fault_worker.fingerprints(steps))


def _check_same_training(r, reference, sizes, log=None):
    """Same weights and every batch exactly once; the sizes as logged.
    `log`: the finished run's log (None: waits for the run to finish)."""
    log = r.finish() if log is None else log
    assert f"workers per attempt: {sizes}" in log, log[-4000:]
    weights, prints = reference
    final = np.load(r.workdir / "out" / "final.npz")
    final = [final[k] for k in sorted(final, key=lambda k: int(k[4:]))]
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(final, weights, strict=True))
    print(f"max |weight difference| vs unfailed 3-host run: {diff:.3g}")
    for a, b in zip(final, weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    records = r.steps()
    assert fault_worker.fingerprints(fault_worker.lineage(records)) == prints
    # Nothing left running on any host.
    pids = r.worker_pids()
    assert pids
    for name, pid in pids.items():
        assert not os.path.exists(f"/proc/{pid}"), name
    return log


def _trains_on_two_hosts(r):
    """Waits until the group restarted without a host and trained on."""
    r.wait_event("attempt_started", size=2)
    r.wait_steps(3, attempt=1)


@pytest.fixture(scope="module")
def two_losses(tmp_path_factory):
    """One run through two hosts lost for good: 127.0.0.4 (3 -> 2 workers),
    then the chief's, 127.0.0.2 (2 -> 1): the finished run and its log.
    Three tests check it (one run instead of three: a run costs three
    group start-ups)."""
    r = start_run(tmp_path_factory.mktemp("two_losses"), min_workers=1)
    try:
        r.wait_steps(6)
        with testbed.partition(HOSTS[2]):  # Down until the end.
            r.kill_host(HOSTS[2])
            _trains_on_two_hosts(r)
            # worker-0, the chief, runs on HOSTS[0].
            with testbed.partition(HOSTS[0]):  # Down until the end.
                r.kill_host(HOSTS[0])
                log = r.finish()
    finally:
        r.stop()
    return r, log


def test_host_lost_for_good_finishes_on_the_others(two_losses):
    r, log = two_losses
    assert "going on without 127.0.0.4" in log, log[-4000:]
    shrunk = r.event("shrunk")
    assert shrunk is not None, r.events()
    assert (shrunk["lost"], shrunk["old_size"], shrunk["new_size"]) == (
        ["127.0.0.4"], 3, 2), shrunk


def test_chief_host_lost(two_losses):
    r, log = two_losses
    # 127.0.0.4 is still down: the launcher names both hosts it goes on
    # without.
    assert re.search(r"going on without [0-9., ]*127\.0\.0\.2", log), (
        log[-4000:])
    assert "[worker-0@127.0.0.3] worker 0 done" in log, (  # The new chief.
        log[-4000:])
    shrunk = r.event("shrunk", after=r.event("shrunk")["time"])
    assert shrunk is not None, r.events()
    assert (sorted(shrunk["lost"]), shrunk["old_size"],
            shrunk["new_size"]) == (["127.0.0.2", "127.0.0.4"], 2, 1), shrunk


def test_two_losses_down_to_min_workers(two_losses, reference):
    r, log = two_losses
    _check_same_training(r, reference, "3 -> 2 -> 1", log)


def test_host_lost_then_back_grows_to_three(run, reference):
    r = run()
    r.wait_steps(6)
    with testbed.partition(HOSTS[2]):
        r.kill_host(HOSTS[2])
        _trains_on_two_hosts(r)
    # The host answers again: the launcher stops the group (which saves)
    # and starts it on three hosts.
    log = _check_same_training(r, reference, "3 -> 2 -> 3")
    assert "127.0.0.4 answer again" in log
    # The events say the same, with the sizes, in order.
    names = [e["event"] for e in r.events()]
    shrunk, grew = r.event("shrunk"), r.event("grew")
    assert shrunk and grew, names
    assert (shrunk["old_size"], shrunk["new_size"]) == (3, 2)
    assert (grew["old_size"], grew["new_size"], grew["hosts"]) == (
        2, 3, [h.address for h in HOSTS])
    assert names.index("shrunk") < names.index("hosts_returned") < (
        names.index("grew")), names


def test_partitioned_host_does_not_hang_the_group(run, reference):
    r = run()
    r.wait_steps(6)
    with testbed.partition(HOSTS[1]):  # Cut off, its worker still runs.
        _trains_on_two_hosts(r)
    log = _check_same_training(r, reference, "3 -> 2 -> 3")
    # Its peers block in a collective with it: the launcher's --timeout
    # sees no progress and restarts the group without the cut-off host.
    assert re.search(r"worker-\d on 127\.0\.0\.\d made no progress for "
                     r"20s \(hung\)", log), log[-4000:]
    assert "going on without 127.0.0.3" in log
    # The blame goes to the cut-off host's worker, not a bystander.
    hung = r.event("worker_hung")
    assert hung is not None and hung["host"] == "127.0.0.3", r.events()

"""16 workers for real (issue 21): a SIGKILL, a host lost and back.

Sixteen worker processes (one intra-op and one inter-op thread each) run
`scale16_worker.py`, fault_worker's small fingerprinting MLP with a fixed
global batch under `kd.callbacks.BackupAndRestore`:

- under `kerasdist-run --num_workers 16`, worker 5 SIGKILLs itself after
  step 2 of epoch 0 (the newest backup is at step 2): the launcher restarts
  the group, which resumes from the backup;
- over 8 emulated hosts x 2 slots (`--hosts 127.0.0.2,...,127.0.0.9
  --num_workers 2 --min_workers 14`), the last host is taken down the way
  a dead machine looks (its workers SIGKILLed, its address cut by nftables,
  as in test_elastic_hosts.py): the group goes on with 14 workers, then
  grows back to 16 when the host answers again.

Each run must end with the weights of one process training on the same
global batch (computed in this process on one device), within rtol=1e-5,
atol=1e-6: 16 or 14 replicas sum the same per-example gradients in another
order than one device, so float32 round-off differs (the measured maximum
difference is printed with `-s`). The global batch, 1680, is the least
common multiple of 14, 15 and 16: an elastic group from 14 to 16 workers
must split it at every size it may run with.

The tests wait on the launcher's events (`--log_dir D`, `D/events.jsonl`)
and the chief's step log, never on sleeps; the bounds are generous
(sixteen TensorFlow start-ups share 2 cores) and a failure says what was
awaited, with the launcher's log.
"""

from __future__ import annotations

import os
import sys

import fault_worker as fw
import numpy as np
import pytest

from kerasdist.testing import elastic
from kerasdist.testing import hosts as testbed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "scale16_worker.py")
GLOBAL_BATCH = 1680  # lcm(14, 15, 16)
EXAMPLES = 4 * GLOBAL_BATCH  # 4 steps per epoch
EPOCHS = 2
HOSTS = testbed.emulated_hosts(8)  # 127.0.0.2 - 127.0.0.9, 2 slots each
RUN_TIMEOUT = 600  # Seconds for one launcher run (3 group start-ups).
RTOL, ATOL = 1e-5, 1e-6

pytestmark = [pytest.mark.real_component, pytest.mark.slow,
              pytest.mark.timeout(RUN_TIMEOUT + 120)]


@pytest.fixture(scope="module")
def reference():
    """Final weights of one process, one device, the same global batch."""
    import tensorflow as tf

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = fw.build_model()
    model.fit(fw.make_dataset(strategy, EXAMPLES, global_batch=GLOBAL_BATCH),
              epochs=EPOCHS, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]


def start_run(tmp, hosts=(), kill=None, hold=None, **kwargs):
    """One `kerasdist-run` of 16 workers in the background."""
    out = tmp / "out"
    command = [sys.executable, WORKER, "--out", str(out),
               "--backup_dir", str(tmp / "backup"),
               "--pid_dir", str(tmp / "pids"),
               "--global_batch", str(GLOBAL_BATCH),
               "--num_examples", str(EXAMPLES), "--epochs", str(EPOCHS)]
    if kill:
        command += ["--kill", kill]
    if hold:
        command += ["--hold", str(hold)]
    slots = 2 if hosts else 16
    return elastic.HostBedRun(
        command, hosts, tmp, pid_dir=tmp / "pids",
        step_log=out / "steps-0.jsonl", host_wait=3,
        # A step takes well under a second, but sixteen start-ups on two
        # loaded cores take minutes, and the first step of a new epoch
        # took 30 s (every worker inside the step function), once over
        # 60 s, which the launcher then took for a hang.
        timeout=180, start_timeout=300, max_restarts=3,
        run_timeout=RUN_TIMEOUT, python_path=[HERE], cwd=HERE,
        launcher_args=["--num_workers", str(slots)], **kwargs)


def _start_up_report(r) -> str:
    """Per attempt: when the launcher started it, and the slowest worker's
    script start, TensorFlow import, strategy and first step after it."""
    import json

    starts = {e["attempt"] - 1: e["time"] for e in r.events()
              if e["event"] == "attempt_started"}
    phases: dict[int, list[dict]] = {}
    for path in sorted((r.workdir / "out").glob("phases-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            phases.setdefault(record["attempt"], []).append(record)
    lines = []
    for attempt, records in sorted(phases.items()):
        t0 = starts.get(attempt, min(p["started"] for p in records))
        slowest = {k: max(p[k] for p in records) - t0
                   for k in ("started", "imported", "strategy_ready",
                             "first_step")}
        lines.append(f"attempt {attempt} ({len(records)} workers), seconds "
                     "after its start, slowest worker: " + ", ".join(
                         f"{k} {v:.1f}" for k, v in slowest.items()))
    return "\n".join(lines)


def _check_weights(r, reference, summary):
    """The run succeeded (its summary says `summary`), trained every step
    of the run once (after rollbacks) and ended with the reference
    weights."""
    try:
        log = r.finish()
    finally:  # Where the time went, also when the run failed.
        print(_start_up_report(r))
    assert summary in log, log[-4000:]
    steps = fw.lineage(r.steps())
    assert [(s["epoch"], s["step"]) for s in steps] == [
        (e, s) for e in range(EPOCHS) for s in range(EXAMPLES // GLOBAL_BATCH)
    ], steps
    final = np.load(r.workdir / "out" / "final.npz")
    final = [final[f"arr_{i}"] for i in range(len(final.files))]
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(final, reference, strict=True))
    print(f"{summary}: max |weight difference| vs one process: {diff:.3g}")
    for a, b in zip(final, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    for name, pid in r.worker_pids().items():  # Nothing left running.
        assert not os.path.exists(f"/proc/{pid}"), name
    return log


def test_16_workers_sigkill_restart_matches_one_process(tmp_path,
                                                        reference):
    with start_run(tmp_path, kill="5:0:2") as r:
        _check_weights(r, reference, "after 2 attempt(s), 1 restart(s)")
    exited = r.event("worker_exited")
    assert exited is not None, r.events()
    assert (exited["rank"], exited["signal"]) == (5, "SIGKILL"), exited
    starts = [e for e in r.events() if e["event"] == "attempt_started"]
    assert [e["size"] for e in starts] == [16, 16], starts
    assert len(r.worker_pids()) == 32  # 16 per attempt, all started


@pytest.fixture
def _needs_nftables():
    why = testbed.nftables_unavailable()
    if why:
        pytest.skip(f"emulated host loss needs nftables: {why}")


@pytest.mark.usefixtures("_needs_nftables")
def test_elastic_16_to_14_to_16_over_8_hosts(tmp_path, reference):
    lost = HOSTS[-1]
    # The workers wait after each step while `hold` exists: the host is
    # lost after step 1 of the first attempt, and the group on 14 workers
    # is still training (held after its first step) when the host answers
    # again.
    hold = tmp_path / "hold"
    hold.touch()
    with start_run(tmp_path, hosts=HOSTS, min_workers=14, hold=hold) as r:
        r.wait_steps(1)
        with testbed.partition(lost):
            assert r.kill_host(lost) == 2
            r.wait_event("attempt_started", size=14)
            r.wait_steps(1, attempt=1)
        r.wait_event("hosts_returned")
        hold.unlink()  # The launcher stops the 14 (they save) and grows.
        log = _check_weights(r, reference,
                             "workers per attempt: 16 -> 14 -> 16")
    assert f"going on without {lost.address}" in log
    assert f"{lost.address} answer again" in log
    shrunk, grew = r.event("shrunk"), r.event("grew")
    assert shrunk and grew, r.events()
    assert (shrunk["lost"], shrunk["old_size"], shrunk["new_size"]) == (
        [lost.address], 16, 14)
    assert (grew["old_size"], grew["new_size"]) == (14, 16)

"""A model too big for one worker's memory trains when split over two.

Real processes, each in its own cgroup v1 memory group with the same hard
limit (`kerasdist.testing.cgroups`): the chief and the stage workers of
tests/placement_memory_worker.py (16 Dense(2048) layers, Adam: 256 MiB of
weights, 768 MiB with the optimizer state, plus the gradients). Unsplit on
one stage worker, the kernel kills that worker past the limit, and its
watchdog (kd.placement.join_cluster) says so; split over two stage
workers, every worker stays under the limit and training finishes. Each
worker's peak memory (`memory.max_usage_in_bytes`) is printed and saved
to `memory_peaks.json` in the test's directory, for the docs.
"""

import json
import os
import subprocess
import sys
import time

import placement_memory_worker
import pytest

from kerasdist import cluster
from kerasdist.testing import cgroups

pytestmark = [pytest.mark.slow, pytest.mark.real_component]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "placement_memory_worker.py")
MIB = 1 << 20
# Measured without a limit (docs/guide/model_parallelism.md): the unsplit
# stage worker peaks at 1568 MiB, each of two stage workers at 1078-1148
# MiB, the chief (which builds the model before moving it) at ~890 MiB.
LIMIT = 1300 * MIB
# TensorFlow's start-up on a loaded 2-core machine takes most of it.
TIMEOUT = 420
# How long the chief may take to fail once a stage worker is gone.
AFTER_SERVER_DIED = 90


def _start(stages, out, groups):
    """Starts the chief and `stages` stage workers, each in its group."""
    config = cluster.make_tf_config(stages + 1, 0)
    procs = []
    for i, group in enumerate(groups):
        config["task"]["index"] = i
        env = dict(os.environ, TF_CONFIG=json.dumps(config),
                   TF_CPP_MIN_LOG_LEVEL="2")
        with open(os.path.join(out, f"worker-{i}.log"), "w") as log:
            procs.append(subprocess.Popen(
                group.wrap([sys.executable, WORKER, "--out", str(out)]),
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            ))
    return procs


def _wait(procs):
    """Waits for every process; bounds the chief once a server died."""
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in procs):
        died = [p for p in procs[1:] if p.poll() not in (None, 0)]
        if died:
            deadline = min(deadline, time.monotonic() + AFTER_SERVER_DIED)
        if time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Unsplit (1 stage worker) and split (2), run side by side.

    Returns:
        {stages: {"codes", "logs", "peaks", "oom_kills", "done",
        "timed_out"}}.
    """
    why = cgroups.cgroups_unavailable(("memory",))
    if why:
        pytest.skip(f"memory cgroups unavailable: {why}")
    results = {}
    with _Groups() as groups:
        started = {}
        for stages in (1, 2):
            out = tmp_path_factory.mktemp(f"memory{stages}")
            gs = groups.make(stages + 1)
            started[stages] = (out, gs, _start(stages, out, gs))
        for stages, (out, gs, procs) in started.items():
            timed_out = _wait(procs)
            logs = []
            for i in range(len(procs)):
                with open(os.path.join(out, f"worker-{i}.log")) as f:
                    logs.append(f.read())
            results[stages] = {
                "codes": [p.returncode for p in procs],
                "logs": logs,
                "peaks": [g.peak_memory_bytes() for g in gs],
                "oom_kills": [g.oom_kills() for g in gs],
                "done": os.path.exists(os.path.join(out, "done.json")),
                "timed_out": timed_out,
            }
    report = {
        "limit_mib": LIMIT // MIB,
        "weight_mib": placement_memory_worker.weight_bytes() // MIB,
        **{
            f"{'unsplit' if k == 1 else 'split'}_peak_mib": [
                p // MIB for p in r["peaks"]
            ]
            for k, r in results.items()
        },
    }
    print("memory peaks (chief, stage workers):", json.dumps(report))
    path = tmp_path_factory.getbasetemp() / "memory_peaks.json"
    path.write_text(json.dumps(report))
    return results


class _Groups:
    """Opens memory cgroups on demand; closes (and empties) them all."""

    def __enter__(self):
        self._open = []
        return self

    def make(self, n):
        gs = []
        for _ in range(n):
            cm = cgroups.cgroup(memory_bytes=LIMIT)
            gs.append(cm.__enter__())
            self._open.append(cm)
        return gs

    def __exit__(self, *exc):
        for cm in reversed(self._open):
            cm.__exit__(None, None, None)


def test_unsplit_model_is_killed_past_the_limit_and_says_so(runs):
    r = runs[1]
    logs = "\n".join(r["logs"])[-6000:]
    assert not r["done"], logs
    assert r["oom_kills"][1] >= 1, (r["oom_kills"], r["peaks"], logs)
    assert r["codes"][1] == -9, (r["codes"], logs)
    assert (
        "worker 1 (pid" in r["logs"][1]
        and "was killed by the kernel past its memory limit" in r["logs"][1]
    ), r["logs"][1][-3000:]
    assert r["codes"][0] != 0, (r["codes"], logs)


def test_split_model_trains_under_the_same_limit(runs):
    r = runs[2]
    logs = "\n".join(r["logs"])[-6000:]
    assert r["codes"] == [0, 0, 0], (r["codes"], r["oom_kills"], logs)
    assert r["done"], logs
    assert r["oom_kills"] == [0, 0, 0], r["oom_kills"]
    assert max(r["peaks"]) <= LIMIT
    assert "past its memory limit" not in "".join(r["logs"])

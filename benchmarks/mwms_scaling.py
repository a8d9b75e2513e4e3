"""mwms_scaling: 2-worker throughput ÷ (2 × 1-worker throughput).

Real worker processes on 127.0.0.1 under kd.MultiWorkerMirroredStrategy, one
intra-op thread per worker, fixed per-replica batch, a compute-bound
convnet. 1-worker and 2-worker runs alternate (1 2 1 2 ...); the median of
per-round ratios is reported (target ≥ 0.90; Horovod paper: 0.88-0.90).
"""

from __future__ import annotations

import json
import os

from benchmarks import common
from kerasdist.testing import run_workers

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "_mwms_worker.py")


def _throughput(num_workers, per_replica_batch, steps, warmup):
    root = os.path.dirname(os.path.dirname(_WORKER))
    results = run_workers(
        [_WORKER, str(per_replica_batch), str(steps), str(warmup)],
        num_workers, timeout=600, cwd=root,
        env={"PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    line = next(x for x in results[0].output.splitlines()
                if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["examples_per_second"]


def main(full: bool = False) -> dict:
    rounds, steps, warmup, batch = (
        (9, 40, 3, 128) if full else (5, 20, 2, 128))
    one, two = [], []
    for i in range(rounds):
        order = (1, 2) if i % 2 == 0 else (2, 1)
        for n in order:
            (one if n == 1 else two).append(
                _throughput(n, batch, steps, warmup))
    ratios = [t2 / (2 * t1) for t1, t2 in zip(one, two, strict=True)]
    stats = common.ratio_stats(ratios)
    return {
        "ratio": stats,
        "one_worker_examples_per_s": one,
        "two_worker_examples_per_s": two,
        "target": ">= 0.90",
        "meets_target": stats["median"] >= 0.90,
        "measured": (
            "2-worker ÷ (2 × 1-worker) training throughput, alternating "
            "runs, median of per-round ratios"
        ),
        "environment": common.environment(
            model="convnet(width=32) on 32x32x3, SGD momentum",
            threads_per_worker="intra-op 1, inter-op 1",
            per_replica_batch_size=batch, timed_steps=steps,
            warmup_steps=warmup, transport="gRPC on 127.0.0.1, RING",
        ),
    }

"""recovery_time: SIGKILL of a worker -> first trained step after restart,
divided by the time of a cold `import tensorflow` (target <= 2.0).

Each round runs, interleaved: a fresh `python -c "import tensorflow"`, and a
2-worker job under `kerasdist-run` (MultiWorkerMirroredStrategy, small MLP,
BackupAndRestore every 10 steps) in which worker 1 SIGKILLs itself after
step 25. The recovery time is from the kill to the first step the restarted
group trains: detection, stopping the group, restarting both processes,
importing TensorFlow, connecting the workers, restoring the backup and
tracing the step function.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from benchmarks import _fault_job, common

TARGET = 2.0
_QUIET = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def cold_import_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tensorflow"], env=_QUIET,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def recovery_seconds() -> float:
    with tempfile.TemporaryDirectory(prefix="kd-recovery-") as tmp:
        job = _fault_job.run_job(tmp, ["0:25:SIGKILL"], epochs=1,
                                 steps_per_epoch=40, save_freq=10)
    kill = job["faults"][0]["time"]
    first = min(s["time"] for s in job["steps"] if s["attempt"] == 1)
    return first - kill


def main(full: bool = False) -> dict:
    rounds = 10 if full else 5
    stats, imports, recoveries = common.interleaved(
        cold_import_seconds, recovery_seconds, rounds=rounds)
    return {
        "name": "recovery_time",
        "ratio": stats,
        "target": f"<= {TARGET}",
        "meets_target": stats["median"] <= TARGET,
        "cold_import_seconds": imports,
        "recovery_seconds": recoveries,
        "environment": common.environment(
            workers=2, threads_per_worker=1, model="MLP 32-64-10",
            global_batch=64, save_freq=10, restart_grace_period=1.0),
    }


if __name__ == "__main__":
    print(main())

"""steps_lost: steps trained twice after a fault, divided by save_freq.

One 2-worker job under `kerasdist-run` (MultiWorkerMirroredStrategy,
BackupAndRestore with save_freq=10) in which worker 1 is killed several
times at different points of the save interval, then preempted (SIGTERM)
twice. Lost steps are those the next attempt trains again. Targets: <= 1.0
x save_freq after SIGKILL (the worst case is a kill just before a save
completes), 0 after SIGTERM.
"""

from __future__ import annotations

import tempfile

from benchmarks import _fault_job, common

SAVE_FREQ = 10
# attempt:global step:signal. Offsets in the save interval: 3, 9, 10 (kill
# in the step whose backup was about to be written), 5.
FAULTS = ["0:13:SIGKILL", "1:29:SIGKILL", "2:40:SIGKILL", "3:45:SIGKILL",
          "4:52:SIGTERM", "5:67:SIGTERM"]


def lost_steps(steps: list[dict], attempt: int) -> int:
    resumed_at = min(s["step"] for s in steps if s["attempt"] == attempt + 1)
    return sum(
        1 for s in steps if s["attempt"] == attempt and s["step"] >= resumed_at
    )


def main(full: bool = False) -> dict:
    del full
    with tempfile.TemporaryDirectory(prefix="kd-steps-lost-") as tmp:
        job = _fault_job.run_job(tmp, FAULTS, epochs=2, steps_per_epoch=40,
                                 save_freq=SAVE_FREQ)
    kills, terms = [], []
    for fault in job["faults"]:
        lost = lost_steps(job["steps"], fault["attempt"])
        (kills if fault["signal"] == "SIGKILL" else terms).append(
            {"at_step": fault["step"], "lost": lost})
    stats = common.ratio_stats([k["lost"] / SAVE_FREQ for k in kills])
    return {
        "name": "steps_lost",
        "ratio": stats,
        "target": "<= 1.0 after SIGKILL (max), 0 after SIGTERM",
        "meets_target": stats["max"] <= 1.0
        and all(t["lost"] == 0 for t in terms),
        "after_sigkill": kills,
        "after_sigterm": terms,
        "save_freq": SAVE_FREQ,
        "environment": common.environment(
            workers=2, threads_per_worker=1, model="MLP 32-64-10",
            global_batch=64),
    }


if __name__ == "__main__":
    print(main())

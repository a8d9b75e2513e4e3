"""launcher_scale: how `kerasdist-run` costs grow with the number of workers.

For N = 1, 2, 4, 8, 16 workers on this host (`kerasdist-run --num_workers
N`, one intra-op and one inter-op thread per worker), one run of
`tests/scale16_worker.py` (fault_worker's small MLP, a fixed global batch
of 64, 2 epochs of 10 steps, a backup every 4 steps) in which the last
worker SIGKILLs itself after step 5 of epoch 0. Measured per run:

- launch -> first step: from starting the launcher to the end of the
  first trained step (the chief's step log);
- recovery: from the SIGKILL (its time, written by the worker just before)
  to the end of the first step of the restarted group, split by the
  launcher's events into detection (kill -> `worker_exited`), stopping the
  others (-> `attempt_started`) and start-up (-> first step);
- launcher CPU: user + system CPU seconds of the launcher process itself
  (not its workers, from /proc), and that ÷ the run's wall time;
- per-step collective time: after `fit`, the median of 20 all-reduces of
  the model's trainable variables (one step's gradients: 212 float32,
  848 bytes) over the N workers.

`main(full=False)` (the default: one round per N) is a short run, labelled
so in its JSON; `full=True` runs 5 rounds, the N interleaved within each
round, and reports medians with min and max. Writes
`benchmarks/results/launcher_scale.json` (via `benchmarks.run`) and
`launcher_scale.png`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common

NS = (1, 2, 4, 8, 16)
TESTS = str(Path(common.ROOT) / "tests")
WORKER = str(Path(TESTS) / "scale16_worker.py")
GLOBAL_BATCH = 64
STEPS_PER_EPOCH = 10
KILL_AFTER = (0, 5)  # epoch, step: one step past the backup at step 4
COLLECTIVE_ROUNDS = 20
RUN_TIMEOUT = 900.0


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` itself (no children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuSampler:
    """Samples a process's own CPU time until it ends; keeps the last."""

    def __init__(self, pid: int):
        self.pid, self.seconds = pid, 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (cpu := _cpu_seconds(self.pid)) is not None:
            self.seconds = cpu
            time.sleep(0.05)

    def join(self) -> float:
        self._thread.join(timeout=5)
        return self.seconds


def one_run(n: int) -> dict:
    """One launcher run of `n` workers with one SIGKILL; its figures."""
    from kerasdist.testing import elastic

    with tempfile.TemporaryDirectory(prefix=f"kd-scale{n}-") as tmp:
        tmp = Path(tmp)
        out = tmp / "out"
        command = [
            sys.executable, WORKER, "--out", str(out),
            "--backup_dir", str(tmp / "backup"),
            "--pid_dir", str(tmp / "pids"),
            "--global_batch", str(GLOBAL_BATCH),
            "--num_examples", str(GLOBAL_BATCH * STEPS_PER_EPOCH),
            "--save_freq", "4",
            "--kill", f"{n - 1}:{KILL_AFTER[0]}:{KILL_AFTER[1]}",
            "--collective_rounds", str(COLLECTIVE_ROUNDS)]
        run = elastic.HostBedRun(
            command, [], tmp, step_log=out / "times-0.jsonl",
            timeout=120, start_timeout=600, max_restarts=1,
            run_timeout=RUN_TIMEOUT, python_path=[TESTS], cwd=TESTS,
            launcher_args=["--num_workers", str(n)])
        with run:
            cpu = _CpuSampler(run.proc.pid)
            run.finish()
            wall = time.time() - run.started
            launcher_cpu = cpu.join()
        times = run.steps()
        kill = json.loads((out / "kill.json").read_text())["time"]
        events = run.events()
        collective = json.loads((out / "collective.json").read_text())
    first = min(t["time"] for t in times if t["attempt"] == 0)
    resumed = min(t["time"] for t in times if t["attempt"] == 1)
    exited = next(e["time"] for e in events
                  if e["event"] == "worker_exited")
    restarted = next(e["time"] for e in events
                     if e["event"] == "attempt_started" and e["attempt"] == 2)
    return {
        "workers": n,
        "launch_to_first_step": first - run.started,
        "recovery": resumed - kill,
        "recovery_detection": exited - kill,
        "recovery_stop": restarted - exited,
        "recovery_start_up": resumed - restarted,
        "launcher_cpu_seconds": launcher_cpu,
        "launcher_cpu_share": launcher_cpu / wall,
        "wall_seconds": wall,
        "collective_seconds": collective["seconds"],
    }


def _summary(runs: list[dict]) -> dict:
    """Per figure: median, min and max over the rounds."""
    keys = [k for k in runs[0] if k != "workers"]
    return {k: {"median": statistics.median(r[k] for r in runs),
                "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in keys}


def plot(by_n: dict[int, dict], path: Path, label: str) -> None:
    """Four panels against N: start-up, recovery, launcher CPU, all-reduce."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(by_n)
    panels = [
        ("launch → first step (s)", ["launch_to_first_step"]),
        ("SIGKILL → first step after restart (s)",
         ["recovery", "recovery_detection", "recovery_stop",
          "recovery_start_up"]),
        ("launcher CPU (s)", ["launcher_cpu_seconds"]),
        ("all-reduce of one step's gradients (ms)", ["collective_seconds"]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            scale = 1000 if key == "collective_seconds" else 1
            ax.plot(ns, [by_n[n][key]["median"] * scale for n in ns], "o-",
                    label=key)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("workers N")
        ax.set_title(title, fontsize=9)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"launcher_scale, {label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(full: bool = False) -> dict:
    rounds = 5 if full else 1
    runs: dict[int, list[dict]] = {n: [] for n in NS}
    load = [os.getloadavg()[0]]
    for i in range(rounds):
        # Alternate the order so that drift in the load favours no N.
        for n in (NS if i % 2 == 0 else NS[::-1]):
            runs[n].append(one_run(n))
            print(f"[launcher_scale] round {i + 1}: {runs[n][-1]}",
                  flush=True)
            load.append(os.getloadavg()[0])
    by_n = {n: _summary(r) for n, r in runs.items()}
    label = (f"{rounds} round(s) per N, " + (
        "full run" if full else "SHORT run on a loaded shared machine")
        + f" (load average {min(load):.1f}–{max(load):.1f} on "
        f"{os.cpu_count()} cores)")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(by_n, common.RESULTS / "launcher_scale.png", label)
    return {
        "name": "launcher_scale",
        "label": label,
        "short_run": not full,
        "by_workers": {str(n): by_n[n] for n in NS},
        "runs": {str(n): runs[n] for n in NS},
        "environment": common.environment(
            workers=list(NS), threads_per_worker=1,
            model="fault_worker MLP 8-16-4 (212 weights)",
            global_batch=GLOBAL_BATCH, steps=2 * STEPS_PER_EPOCH,
            save_freq=4, kill_after=KILL_AFTER,
            collective_rounds=COLLECTIVE_ROUNDS,
            load_average=[round(x, 2) for x in load]),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))

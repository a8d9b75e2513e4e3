"""goodput_sim: a discrete-event model of a training job's goodput, checked
against real `kerasdist-run` jobs with injected failures, then used to
predict jobs of 1k-16k workers.

Goodput = time in steps that count / wall time (each step counted once,
in the attempt that trained it first; steps redone after a failure are
badput). The model (`Job`, `simulate`):

- N workers, each failing as a Poisson process (rate 1 / worker_mtbf), so
  the job fails at N / worker_mtbf; a failure can strike at any time:
  during start-up, a step or a save;
- a failure costs: detection (failure -> the launcher acts), restart
  (stop the group, start processes: `restart_a + restart_b N`), start-up
  (import, build, restore, first step: `startup_a + startup_b N`) and the
  steps trained since the last save (retrained);
- an attempt that trained the last step ends some time after its last
  backup (`finish_seconds`: `fit` returning, its input's teardown,
  process exit); a failure then restarts the group, whose attempt
  restores the last backup, has nothing to train and ends
  (`restored_finish_seconds`);
- saves cost `save_seconds` each, every `save_freq` steps or, with
  `"auto"`, every Daly interval for the save cost and the mean time
  between failures estimated as `kd.callbacks.BackupAndRestore` does
  (the same functions);
- a share `host_loss` of failures take a host (`workers_per_host`
  workers) away for `replacement` seconds. Waiting: the job waits for
  the replacement. Elastic: it restarts at once on the survivors (steps
  N / (N - g) times longer, the global batch unchanged) and grows back
  when the host returns (a save on SIGTERM and one more restart, no
  steps lost).

Validation (`--validate`): real `kerasdist-run` jobs on this machine
(N = 4, short) with SIGKILLs of random workers at Poisson times; the
measured goodput comes from the workers' facts (heartbeat files:
`step_seconds - retrained_seconds` summed over attempts, / wall); the
model's costs (step, save, start-up, recovery) are calibrated from the
same run, and the failure times are drawn anew: the check is that the
model composes the costs and the failure process as the real job does.

Predictions: N = 1k, 4k, 16k at one interruption per ~3 h at 16k workers
(Llama 3 405B: 466 interruptions in 54 days on 16,384 GPUs), a fixed
save_freq vs "auto", elastic vs waiting. Writes
benchmarks/results/goodput_sim.json and goodput_sim.png.

    python -m benchmarks.goodput_sim              # predictions + short
                                                  # validation (N=4)
    python -m benchmarks.goodput_sim --predict_only
    # validation at 8 and 16 workers only (the rows not run again kept
    # from the last results), a job MTBF per N (start-ups grow with N),
    # one policy:
    python -m benchmarks.goodput_sim --workers 8,16 \\
        --job_mtbf 8=90,16=150 --policies 400
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import defaultdict

from kerasdist.callbacks import _backup_interval as interval_lib

HOUR = 3600.0
LLAMA3_MTBF_16K = 3 * HOUR  # one interruption per ~3 h on 16,384 GPUs
PARTS = ("counted", "startup", "restart", "detection", "retrained",
         "saves", "waiting", "shrunk", "other")


@dataclasses.dataclass
class Job:
    """What the model needs to know about a job (seconds)."""

    workers: int
    worker_mtbf: float
    step_seconds: float  # wall time per step at full size
    total_steps: int
    save_seconds: float
    save_freq: int | str = "auto"
    mtbf_prior: float | None = None
    elastic: bool = False
    workers_per_host: int = 8
    counted_fraction: float = 1.0  # share of a step's wall inside the step
    # Costs: start-up and restart are a + b N seconds.
    startup_a: float = 60.0
    startup_b: float = 0.0
    restart_a: float = 10.0
    restart_b: float = 0.0
    detection: float = 1.0
    host_loss: float = 0.0  # share of failures that take a host away...
    replacement: float = 0.0  # ... for this long
    # The end of an attempt that trained the last step: the last backup
    # written -> the workers have exited (`fit` returning, its input
    # pipeline's teardown, process exit); a failure then still restarts
    # the group.
    finish_seconds: float = 0.0
    # The same for an attempt that restored the last backup (training
    # was over: `fit` returns at once).
    restored_finish_seconds: float = 0.0
    # Replaying a run whose end of training a kill cut short: that end
    # lasted at least until the kill (this time, from the start).
    finish_until: float | None = None
    # Failures at these times (seconds from the start) instead of Poisson
    # ones: replays a real run's failures.
    failure_times: tuple[float, ...] | None = None

    def startup(self) -> float:
        return self.startup_a + self.startup_b * self.workers

    def restart(self) -> float:
        return self.restart_a + self.restart_b * self.workers


class _Failed(Exception):
    pass


class _Run:
    """One simulated run of a `Job`."""

    def __init__(self, job: Job, rng: random.Random):
        self.job, self.rng = job, rng
        self.t = 0.0
        self.size = job.workers
        self.parts: dict[str, float] = defaultdict(float)
        self.committed = 0  # steps in the newest save
        self.pos = 0  # steps trained in this attempt's lineage
        self.failures = 0
        self.saves = 0
        self.grow_at: list[float] = []
        self.interval = interval_lib.FIRST_SAVE_STEPS  # "auto"
        self._draw()

    def _draw(self) -> None:
        times = self.job.failure_times
        if times is not None:
            self.next_fail = min((t for t in times if t > self.t),
                                 default=math.inf)
            return
        self.next_fail = self.t + self.rng.expovariate(
            self.size / self.job.worker_mtbf)

    def step_wall(self) -> float:
        return self.job.step_seconds * self.job.workers / self.size

    def spend(self, seconds: float, part: str) -> None:
        """Advances time; raises `_Failed` if a failure comes first."""
        if self.t + seconds > self.next_fail:
            self.parts[part] += self.next_fail - self.t
            self.t = self.next_fail
            raise _Failed
        self.t += seconds
        self.parts[part] += seconds

    def train(self, steps: int) -> None:
        """Trains `steps` steps; on a failure, the ones done are lost."""
        wall = self.step_wall()
        if self.t + steps * wall > self.next_fail:
            done = int((self.next_fail - self.t) / wall)
            self.pos += done
            self.parts["partial"] += self.next_fail - self.t - done * wall
            self.parts["trained"] += done * wall
            self.t = self.next_fail
            raise _Failed
        self.t += steps * wall
        self.pos += steps
        self.parts["trained"] += steps * wall

    def fail(self) -> None:
        job = self.job
        lost = self.pos - self.committed
        self.parts["lost"] += lost * self.step_wall()
        self.pos = self.committed
        self.failures += 1
        self.t += job.detection
        self.parts["detection"] += job.detection
        if job.host_loss and self.rng.random() < job.host_loss:
            smaller = self.size - job.workers_per_host
            if job.elastic and smaller >= 1:
                self.size = smaller
                self.grow_at.append(self.t + job.replacement)
            else:
                self.t += job.replacement
                self.parts["waiting"] += job.replacement
        self._draw()

    def next_save(self) -> int:
        """The step of the next save: the next multiple of an integer
        `save_freq` (as the callback counts), or the chosen interval."""
        if self.job.save_freq != "auto":
            freq = int(self.job.save_freq)
            return (self.committed // freq + 1) * freq
        return self.committed + self.interval

    def next_interval(self) -> int:
        job = self.job
        if job.save_freq != "auto":
            return int(job.save_freq)
        mtbf = interval_lib.estimate_mtbf(self.t, self.failures,
                                          job.mtbf_prior)
        seconds = interval_lib.daly_interval(job.save_seconds, mtbf)
        step = self.step_wall() * job.counted_fraction
        return max(round(seconds / step), 1)


def _attempt(run: _Run, first: bool) -> bool:
    """Starts the group and trains until the end; False on a failure."""
    job = run.job
    try:
        if not first:
            run.spend(job.restart(), "restart")
        run.spend(job.startup(), "startup")
        restored = run.committed >= job.total_steps
        while run.pos < job.total_steps:
            if run.grow_at and run.t >= run.grow_at[0]:
                run.grow_at.pop(0)
                run.spend(job.save_seconds, "resize")
                run.committed = run.pos
                run.size = min(run.size + job.workers_per_host, job.workers)
                run._draw()  # noqa: SLF001 (the rate changed)
                run.spend(job.restart() + job.startup(), "resize")
            target = min(run.next_save(), job.total_steps)
            run.train(max(target - run.pos, 0))
            if run.pos >= job.total_steps:
                break
            run.spend(job.save_seconds, "saves")
            run.committed = run.pos
            run.saves += 1
            run.interval = run.next_interval()
        # The last backup (fit ended), then leaving (process exit, the
        # launcher noticing): a failure now still restarts the group.
        if run.pos > run.committed:  # (a finished run returns at once)
            run.spend(job.save_seconds, "saves")
        run.committed = run.pos
        if restored:
            run.spend(job.restored_finish_seconds, "finish")
        else:
            until = job.finish_until
            run.spend(job.finish_seconds if until is None
                      else max(job.finish_seconds, until - run.t), "finish")
    except _Failed:
        run.fail()
        return False
    return True


def simulate(job: Job, seed: int = 0) -> dict:
    """One run of `job`: its wall time and goodput, badput by cause."""
    run = _Run(job, random.Random(seed))
    first = True
    while not _attempt(run, first):
        first = False
    p = run.parts
    full = job.step_seconds * job.total_steps
    counted = full * job.counted_fraction
    parts = {
        "counted": counted,
        "startup": p["startup"],
        "restart": p["restart"] + p["resize"],
        "detection": p["detection"],
        "retrained": p["lost"] + p["partial"],
        "saves": p["saves"],
        "waiting": p["waiting"],
        "shrunk": p["trained"] - p["lost"] - full,
    }
    parts["other"] = run.t - sum(parts.values())
    return {"wall": run.t, "goodput": counted / run.t, "parts": parts,
            "failures": run.failures, "saves": run.saves}


def predict(job: Job, replicates: int = 400, seed: int = 0) -> dict:
    """Goodput over `replicates` runs: mean, 10th and 90th percentiles,
    and the mean share of wall time of each cause."""
    runs = [simulate(job, seed + i) for i in range(replicates)]
    goodputs = sorted(r["goodput"] for r in runs)
    walls = sum(r["wall"] for r in runs)
    shares = {k: sum(r["parts"][k] for r in runs) / walls for k in PARTS}
    return {
        "goodput": statistics.fmean(goodputs),
        "p10": goodputs[len(goodputs) // 10],
        "p90": goodputs[len(goodputs) * 9 // 10],
        "shares": shares,
        "failures": statistics.fmean(r["failures"] for r in runs),
        "saves": statistics.fmean(r["saves"] for r in runs),
    }


# ---------------------------------------------------------------------------
# Predictions at scale.

SCALE = {
    # Assumptions for a large LLM job (seconds); change them here or with
    # the command line. Start-up and restart grow with N (process spawn,
    # rendezvous, collective set-up, restore from shared storage).
    "step_seconds": 8.0,
    "save_seconds": 60.0,
    "startup_a": 120.0, "startup_b": 0.02,
    "restart_a": 30.0, "restart_b": 0.005,
    "detection": 60.0,
    "host_loss": 1.0, "workers_per_host": 8, "replacement": 1200.0,
    "days": 14.0,
}


def scale_jobs(scale: dict) -> list[tuple[dict, Job]]:
    """Every (N, save policy, elastic) case of the predictions."""
    worker_mtbf = LLAMA3_MTBF_16K * 16384
    steps = int(scale["days"] * 86400 / scale["step_seconds"])
    fixed = {"fixed 30 min": int(1800 / scale["step_seconds"]),
             "fixed 3 h": int(3 * HOUR / scale["step_seconds"])}
    cases = []
    for n in (1024, 4096, 16384):
        policies = {**fixed, "auto": "auto"}
        for name, save_freq in policies.items():
            for elastic in (False, True):
                job = Job(
                    workers=n, worker_mtbf=worker_mtbf,
                    step_seconds=scale["step_seconds"], total_steps=steps,
                    save_seconds=scale["save_seconds"], save_freq=save_freq,
                    startup_a=scale["startup_a"],
                    startup_b=scale["startup_b"],
                    restart_a=scale["restart_a"],
                    restart_b=scale["restart_b"],
                    detection=scale["detection"],
                    host_loss=scale["host_loss"],
                    workers_per_host=scale["workers_per_host"],
                    replacement=scale["replacement"], elastic=elastic)
                cases.append(({"workers": n, "save": name,
                               "elastic": elastic,
                               "job_mtbf_h": worker_mtbf / n / HOUR}, job))
    return cases


def predictions(scale: dict, replicates: int) -> list[dict]:
    rows = []
    for case, job in scale_jobs(scale):
        result = predict(job, replicates)
        rows.append({**case, **result})
        print(f"N={case['workers']:>5} {case['save']:>12} "
              f"{'elastic' if case['elastic'] else 'wait   '} goodput "
              f"{result['goodput']:.3f} (p10 {result['p10']:.3f}) "
              + " ".join(f"{k}={v:.3f}" for k, v in result["shares"].items()
                         if k != "counted" and v > 0.001), flush=True)
    return rows


# ---------------------------------------------------------------------------
# Validation against real jobs.

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   "_goodput_job.py")
# The job's input: "repeated" (one iterator per run, its default) or
# "finite" (a new iterator every epoch: the rows measured before it
# repeated, which keep that mark).
JOB_INPUT = "repeated"
MARKER = "KERASDIST_GOODPUT_SIM_RUN"


def _workers_of(run_id: str) -> list[int]:
    """Pids of the live worker processes of this run (from /proc)."""
    pids = []
    needle = f"{MARKER}={run_id}".encode()
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(path, "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(path.split("/")[2]))
        except OSError:
            continue
    return pids


class _Watch:
    """Reads worker 0's heartbeat file (its goodput facts, per attempt)
    and SIGKILLs a random worker at Poisson times."""

    def __init__(self, beat: str, run_id: str, job_mtbf: float, seed: int):
        self.beat, self.run_id = beat, run_id
        self.job_mtbf, self.rng = job_mtbf, random.Random(seed)
        self.facts: dict[int, dict] = {}
        self.kills: list[float] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._poll, self._kill)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)
        self.read()

    def read(self) -> None:
        try:
            with open(self.beat) as f:
                record = json.loads(f.read() or "null")
        except (OSError, ValueError):
            return
        if record:
            self.facts[record["attempt"]] = record

    def _poll(self) -> None:
        while not self.stop.wait(0.1):
            self.read()

    def _kill(self) -> None:
        if not math.isfinite(self.job_mtbf):
            return
        while not self.stop.wait(self.rng.expovariate(1 / self.job_mtbf)):
            pids = _workers_of(self.run_id)
            if not pids:
                continue
            try:
                os.kill(self.rng.choice(pids), signal.SIGKILL)
                self.kills.append(time.time())
            except ProcessLookupError:
                pass


def real_run(workdir: str, *, workers: int, steps: int, save_freq,
             job_mtbf: float | None, mtbf_prior: str | None = None,
             seed: int = 0) -> dict:
    """One `kerasdist-run` job with Poisson SIGKILLs; its facts."""
    import io
    import uuid

    from kerasdist import launch

    run_id = uuid.uuid4().hex
    logs = os.path.join(workdir, "logs")
    command = [sys.executable, JOB, "--out", os.path.join(workdir, "out"),
               "--backup_dir", os.path.join(workdir, "backup"),
               "--save_freq", str(save_freq), "--steps", str(steps),
               "--input", JOB_INPUT]
    if mtbf_prior and save_freq == "auto":
        command += ["--mtbf", mtbf_prior]
    os.makedirs(logs, exist_ok=True)
    stream = io.StringIO()
    with _Watch(os.path.join(logs, "worker-0.heartbeat"), run_id,
                job_mtbf or math.inf, seed) as watch:
        start = time.time()
        result = launch.run(
            command, num_workers=workers, max_restarts=1000,
            env={"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore",
                 MARKER: run_id},
            stream=stream, log_dir=logs)
        wall = time.time() - start
    if not result.ok:
        raise RuntimeError(f"goodput job failed:\n{stream.getvalue()}")
    return {"start": start, "wall": wall, "facts": watch.facts,
            "kills": watch.kills, "workers": workers, "steps": steps,
            "save_freq": save_freq, "job_mtbf": job_mtbf,
            "mtbf_prior": mtbf_prior, "seed": seed, "input": JOB_INPUT}


def measured(run: dict) -> dict:
    """Goodput of a real run from its workers' facts, and the costs the
    model is calibrated with."""
    facts = [run["facts"][a] for a in sorted(run["facts"])]
    counted = sum(f["step_seconds"] - f["retrained_seconds"] for f in facts)
    # Wall time per step between the first step and the last update, saves
    # excluded, over every attempt that trained (attempts can differ:
    # in 16-worker runs the first restart's steps took 0.43-0.48 s, the
    # later attempts' 0.28-0.31 s).
    trained = [f for f in facts if f.get("first_step") and f["steps"] > 1]
    step_wall = sum(f["updated"] - f["first_step"] - f["save_seconds"]
                    for f in trained) / max(
                        sum(f["steps"] - 1 for f in trained), 1)
    per_step = sum(f["step_seconds"] for f in trained) / max(
        sum(f["steps"] for f in trained), 1)
    saves = sum(f["saves"] for f in facts)
    startups, recoveries = [], []
    for f in facts:
        before = [k for k in run["kills"] if k < f["train_begin"]]
        began = before[-1] if before else run["start"]
        if f.get("first_step"):
            (recoveries if before else startups).append(
                f["first_step"] - began)
    startup = statistics.median(startups or recoveries)
    return {
        "goodput": counted / run["wall"],
        "wall": run["wall"],
        "attempts": len(facts),
        "kills": len(run["kills"]),
        "retrained_steps": sum(f["retrained_steps"] for f in facts),
        "retrained_seconds": sum(f["retrained_seconds"] for f in facts),
        "save_seconds": sum(f["save_seconds"] for f in facts),
        "calibration": {
            "step_seconds": step_wall,
            "counted_fraction": min(per_step / step_wall, 1.0),
            "save_seconds": sum(f["save_seconds"] for f in facts)
            / max(saves, 1),
            "startup": startup,
            "recovery": statistics.median(recoveries or startups),
            **_finish_times(run, facts),
        },
    }


# A kill that came while an attempt was ending says its end lasted at
# least until the kill; it is taken to have ended this long after it.
CENSORED_MARGIN = 1.0


def _finish_times(run: dict, facts: list[dict]) -> dict:
    """How long the end of an attempt took, from its last backup to the
    workers' exit: `finish` for the attempt that trained the last step,
    `restored_finish` (median) for attempts that restored the last backup
    and had nothing to train. An attempt ends at the run's end or at the
    first kill after its facts' last update; if a kill, the workers were
    still there: at least that long (`CENSORED_MARGIN` added), and
    `finish_until` is when (from the start; a replay keeps the end of
    training going until that kill, however its steps drift)."""
    end = run["start"] + run["wall"]

    def ending(f: dict) -> tuple[float, float | None]:
        """(seconds, the kill that cut it short or None)."""
        kill = next((k for k in run["kills"] if f["updated"] <= k < end),
                    None)
        if kill is None:
            return end - f["updated"], None
        return kill - f["updated"] + CENSORED_MARGIN, kill

    done = [f for f in facts if f.get("finished")]
    trained = next((f for f in done if f["steps"] > 0), None)
    finish, kill = ending(trained) if trained else (ending(facts[-1])[0],
                                                    None)
    restored = [ending(f)[0] for f in done if f["steps"] == 0]
    return {
        "finish": finish,
        "finish_until": None if kill is None
        else kill - run["start"] + CENSORED_MARGIN,
        "restored_finish": statistics.median(restored) if restored
        else 1.0,
    }


def model_of(run: dict, calibration: dict, replay: bool = False,
             job_mtbf: float | None = None) -> Job:
    """The `Job` of a real run, with the costs measured in it; failing at
    the run's kill times (`replay`) or at Poisson times."""
    c = calibration
    prior = run["mtbf_prior"]
    times = tuple(k - run["start"] for k in run["kills"]) if replay else None
    return Job(
        workers=run["workers"],
        worker_mtbf=(job_mtbf or run["job_mtbf"]) * run["workers"],
        failure_times=times,
        step_seconds=c["step_seconds"], total_steps=run["steps"],
        save_seconds=c["save_seconds"], save_freq=run["save_freq"],
        mtbf_prior=interval_lib.parse_mtbf(prior) if prior else None,
        counted_fraction=c["counted_fraction"], startup_a=c["startup"],
        restart_a=max(c["recovery"] - c["startup"], 0.0), detection=0.0,
        finish_seconds=c["finish"],
        restored_finish_seconds=c["restored_finish"],
        finish_until=c["finish_until"] if replay else None)


def validate(workdir: str, workers: int, steps: int, job_mtbf: float,
             policies: list, seed: int = 1) -> list[dict]:
    """Real runs with Poisson SIGKILLs vs the model's prediction. Every
    policy gets the same kill times (one seed): a paired comparison;
    another seed is another draw of kill times."""
    rows = []
    for i, save_freq in enumerate(policies):
        where = os.path.join(workdir, f"run-{workers}-{i}-{seed}")
        run = real_run(where, workers=workers, steps=steps,
                       save_freq=save_freq, job_mtbf=job_mtbf,
                       mtbf_prior=f"{job_mtbf:g}s", seed=seed)
        rows.append(compare(run))
    return rows


def compare(run: dict) -> dict:
    """Measured goodput of a real run vs the model's: replaying the run's
    failure times, and with Poisson failures at the rate it saw."""
    got = measured(run)
    replayed = simulate(model_of(run, got["calibration"], replay=True))
    seen = run["wall"] / max(len(run["kills"]), 1)
    poisson = predict(model_of(run, got["calibration"], job_mtbf=seen), 400)
    # Runs stored before draws were numbered all used seed 1, and before
    # the job's input repeated, a finite one.
    seed = run.setdefault("seed", 1)
    run.setdefault("input", "finite")
    row = {"workers": run["workers"], "save_freq": run["save_freq"],
           "job_mtbf": run["job_mtbf"], "seed": seed,
           "input": run["input"], "measured": got,
           "replayed": replayed, "predicted": poisson,
           "points": 100 * (replayed["goodput"] - got["goodput"]),
           "run": {k: run[k] for k in ("start", "wall", "facts", "kills",
                                       "workers", "steps", "save_freq",
                                       "job_mtbf", "mtbf_prior", "seed",
                                       "input")}}
    print(f"N={run['workers']} save_freq={run['save_freq']} seed {seed} "
          f"({run['input']} input): "
          "measured "
          f"goodput {got['goodput']:.3f} ({got['kills']} kills, "
          f"{got['attempts']} attempts, wall {got['wall']:.0f}s); model "
          f"with these failures {replayed['goodput']:.3f}; with Poisson "
          f"failures every {seen:.0f}s {poisson['goodput']:.3f} "
          f"[{poisson['p10']:.3f}, {poisson['p90']:.3f}]", flush=True)
    return row


def plot(rows: list[dict], checks: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The validation panel widens with its rows (about 0.55 inch each).
    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(7 + max(7, 0.55 * len(checks)), 5),
        gridspec_kw={"width_ratios": [7, max(7, 0.55 * len(checks))]})
    for (save, elastic), style in zip(
        sorted({(r["save"], r["elastic"]) for r in rows}),
        ["o-", "o--", "s-", "s--", "^-", "^--"], strict=False,
    ):
        pts = [r for r in rows if (r["save"], r["elastic"]) == (save, elastic)]
        ax.plot([r["workers"] for r in pts], [r["goodput"] for r in pts],
                style, label=f"{save}, {'elastic' if elastic else 'wait'}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers (one interruption / 3 h at 16k)")
    ax.set_ylabel("predicted goodput")
    ax.legend(fontsize=8)
    ax.set_title("Predicted goodput at scale")
    # Rows in order of input, N, then draw, then policy; a draw after the
    # first is marked #seed, a finite input (a new iterator each epoch) f.
    checks = sorted(checks, key=lambda c: (
        c.get("input", "finite") != "finite", c["workers"],
        c.get("seed", 1)))
    labels = [str(c["save_freq"]) + (
        f" #{c['seed']}" if c.get("seed", 1) != 1 else "") + (
        " f" if c.get("input", "finite") == "finite" else "")
        for c in checks]
    x = range(len(checks))
    bx.bar([i - 0.27 for i in x], [c["measured"]["goodput"] for c in checks],
           0.27, label="measured")
    bx.bar(list(x), [c["replayed"]["goodput"] for c in checks], 0.27,
           label="model, the run's failure times")
    bx.bar([i + 0.27 for i in x], [c["predicted"]["goodput"] for c in checks],
           0.27, label="model, Poisson at the run's rate (p10-p90)",
           yerr=[[c["predicted"]["goodput"] - c["predicted"]["p10"]
                  for c in checks],
                 [c["predicted"]["p90"] - c["predicted"]["goodput"]
                  for c in checks]])
    bx.set_xticks(list(x), [f"N={c['workers']}\n{lab}"
                            for c, lab in zip(checks, labels, strict=True)],
                  fontsize=8, rotation=90)
    bx.set_xlabel("workers, save_freq (#: a later draw of kill times; "
                  "f: finite input)")
    bx.set_ylabel("goodput")
    bx.set_title("Validation: real kerasdist-run jobs, Poisson SIGKILLs")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _per_workers(text: str) -> dict[int, float] | float:
    """`--job_mtbf`: one number of seconds, or `N=S,...` per N."""
    try:
        if "=" not in text:
            return float(text)
        pairs = (item.split("=") for item in text.split(","))
        return {int(n): float(s) for n, s in pairs}
    except ValueError:
        raise SystemExit(
            f"Invalid value for --job_mtbf. Received: {text!r}. Expected "
            "seconds (60) or seconds per number of workers (4=60,8=90)."
        ) from None


def _comma_list(flag: str, text: str, item, expected: str) -> list:
    """`--flag a,b,c` parsed with `item`; a clear exit on a bad value."""
    try:
        return [item(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(
            f"Invalid value for --{flag}. Received: {text!r}. Expected "
            f"{expected}."
        ) from None


def _policies(text: str) -> list:
    return _comma_list(
        "policies", text, lambda p: p if p == "auto" else int(p),
        "save_freq values, comma-separated (50,400,auto)")


def _seeds(text: str) -> list[int]:
    return _comma_list(
        "seeds", text, int,
        "integers, comma-separated (1,2): one draw of kill times each")


def _validation_runs(args, full: bool) -> list[dict]:
    """Runs the real jobs; when `--workers` is given, keeps the last
    results' rows that are not run again (other N, policies, seeds or
    job input)."""
    import tempfile

    from benchmarks import common

    workers = ([int(n) for n in args.workers.split(",")] if args.workers
               else [4, 8, 16] if full else [4])
    policies = (_policies(args.policies) if args.policies
                else [50, 400, "auto"] if full else [400, "auto"])
    seeds = _seeds(args.seeds)
    mtbf = _per_workers(args.job_mtbf)
    kept = []
    if args.workers and (common.RESULTS / "goodput_sim.json").exists():
        with open(common.RESULTS / "goodput_sim.json") as f:
            kept = [row for row in json.load(f)["validation"]
                    if row["workers"] not in workers
                    or row["save_freq"] not in policies
                    or row.get("seed", 1) not in seeds
                    or row.get("input", "finite") != JOB_INPUT]
    checks = []
    with tempfile.TemporaryDirectory(prefix="goodput-") as workdir:
        for n in workers:
            seconds = mtbf if isinstance(mtbf, float) else mtbf.get(n)
            if seconds is None:
                raise SystemExit(f"--job_mtbf has no value for N={n}: "
                                 f"{args.job_mtbf!r}")
            for seed in seeds:
                checks += validate(workdir, n, args.steps, seconds,
                                   policies, seed)
    return kept + checks


def main(full: bool = False, argv: list[str] | None = None) -> dict:
    """Predictions at scale, and the validation runs (short by default)."""
    import argparse

    from benchmarks import common

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--predict_only", action="store_true")
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--job_mtbf", default="60",
                        help="seconds between kills of the job, or per N: "
                        "4=60,8=90,16=150")
    parser.add_argument("--workers", default=None,
                        help="N to validate at, e.g. 8,16 (the last "
                        "results' rows not run again are kept)")
    parser.add_argument("--policies", default=None,
                        help="save_freq values, e.g. 400,auto")
    parser.add_argument("--seeds", default="1",
                        help="draws of kill times, e.g. 1,2: every policy "
                        "runs once per seed (seed 1 is the first draw)")
    parser.add_argument("--recompare", action="store_true",
                        help="compare the model again with the real runs "
                        "kept in the last results (no new runs)")
    args = parser.parse_args(argv or [])
    rows = predictions(SCALE, args.replicates)
    checks = []
    if args.recompare:
        with open(common.RESULTS / "goodput_sim.json") as f:
            for row in json.load(f)["validation"]:
                run = row["run"]
                run["facts"] = {int(a): r for a, r in run["facts"].items()}
                checks.append(compare(run))
    elif not args.predict_only:
        checks = _validation_runs(args, full)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, checks, str(common.RESULTS / "goodput_sim.png"))
    # The target is judged on the job as it runs now; the rows of the
    # finite input (pauses at epoch boundaries the model does not have)
    # are reported apart.
    current = [c for c in checks if c.get("input", "finite") == JOB_INPUT]
    worst = max((abs(c["points"]) for c in current), default=None)
    finite = [abs(c["points"]) for c in checks
              if c.get("input", "finite") == "finite"]
    return {
        "environment": common.environment(),
        "assumptions_at_scale": SCALE,
        "predictions": rows,
        "validation": checks,
        "ratio": worst,
        "finite_input_worst_points": max(finite, default=None),
        "target": "predicted within 5 points of measured",
        "meets_target": None if worst is None else worst <= 5.0,
        "short": not full,
    }


if __name__ == "__main__":
    from benchmarks import common as _common

    out = main(full="--full" in sys.argv,
               argv=[a for a in sys.argv[1:] if a != "--full"])
    print(_common.write_result("goodput_sim", out))

"""pipeline_efficiency: GPipe speed-up ÷ its bound K·M/(M+K−1), K = 2.

Two worker processes, measured side by side and interleaved round by round:

- "reference": the unpipelined Keras model on one device with one thread
  (intra-op and inter-op threads = 1), trained with its own `fit` step;
- "pipeline": `kd.placement.PipelineModel` over 2 virtual CPUs with one
  thread each (intra-op threads = 1, inter-op threads = 2), for
  M ∈ {1, 2, 4, 8, 16} micro-batches.

Per round, speed-up(M) = reference step time ÷ pipeline step time, and
efficiency(M) = speed-up(M) ÷ (2M / (M + 1)). Virtual CPUs share one thread
pool, so the pipeline's two threads also run independent operations of one
stage at once (the two matrix products of a Dense layer's backward pass):
the result also reports the efficiency against the unpipelined model run in
the pipeline's process with the same threads, which isolates what
pipelining adds, and the CPU work ratio (pipelined CPU time ÷ reference).

The model is compute-bound: 8 Dense(512, relu) layers (4 per stage), a
batch of 4096 examples, SGD and mean squared error. Steps are timed through
Keras's own train function (the one `fit` runs), after a warm-up that
traces it.

Run: `python -m benchmarks.run pipeline_efficiency [--full]`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common

K = 2
MICROBATCHES = (1, 2, 4, 8, 16)
WIDTH, DEPTH, BATCH = 512, 8, 4096
TARGET = 0.90
_PREFIX = "RESULT "


def bound(m: int, k: int = K) -> float:
    """GPipe's ideal speed-up with k stages and m micro-batches."""
    return k * m / (m + k - 1)


# ---------------------------------------------------------------- worker


def _worker(role: str) -> None:
    """Serves timing requests on stdin: one JSON line in, one line out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    # Threads must be set before TensorFlow initialises its devices.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(
        1 if role == "reference" else K
    )
    import keras
    import numpy as np

    import kerasdist as kd

    kd.virtual_cpus(1 if role == "reference" else K)
    tf.get_logger().setLevel("ERROR")  # one train function per model: quiet
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, WIDTH)).astype("float32")
    y = rng.standard_normal((BATCH, WIDTH)).astype("float32")
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    models = {}

    def build(m):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((WIDTH,))]
            + [
                keras.layers.Dense(WIDTH, activation="relu")
                for _ in range(DEPTH)
            ],
            name="mlp",
        )
        if m:
            model = kd.placement.PipelineModel(
                model, [f"/cpu:{i}" for i in range(K)], num_microbatches=m
            )
        model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
        model.make_train_function()
        iterator = iter(dataset)
        for _ in range(2):  # warm-up: tracing and first runs
            float(model.train_function(iterator)["loss"])
        return model, iterator

    for line in sys.stdin:
        request = json.loads(line)
        m, steps = request["m"], request["steps"]
        if m not in models:
            models[m] = build(m)
        model, iterator = models[m]
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            logs = model.train_function(iterator)
        float(logs["loss"])  # wait for the last step
        seconds = (time.perf_counter() - start) / steps
        cpu_seconds = (time.process_time() - cpu) / steps
        print(
            _PREFIX + json.dumps({"seconds": seconds, "cpu": cpu_seconds}),
            flush=True,
        )


# ---------------------------------------------------------------- parent


class _Worker:
    def __init__(self, role: str):
        self.role = role
        self.cpu_seconds = []  # CPU time per step of each reply, all threads
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.pipeline_efficiency",
                "--worker",
                role,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            start_new_session=True,
        )

    def step_time(self, m: int, steps: int) -> float:
        self.proc.stdin.write(json.dumps({"m": m, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_PREFIX):
                reply = json.loads(line[len(_PREFIX) :])
                self.cpu_seconds.append(reply["cpu"])
                return reply["seconds"]
        self.log.seek(0)
        tail = self.log.read()[-3000:]
        raise RuntimeError(
            f"{self.role} worker exited with code {self.proc.wait()}:\n{tail}"
        )

    def close(self) -> None:
        from kerasdist.testing import kill_group

        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_group(self.proc)
        self.log.close()


def measure(rounds: int, steps: int) -> dict:
    """Interleaved rounds; returns per-M lists of per-round ratios."""
    reference, pipeline = _Worker("reference"), _Worker("pipeline")
    try:
        # Warm up every configuration before timing anything.
        reference.step_time(0, 1)
        for m in (0, *MICROBATCHES):
            pipeline.step_time(m, 1)
        speedups = {m: [] for m in MICROBATCHES}
        work = {m: [] for m in MICROBATCHES}
        vs_same = {m: [] for m in MICROBATCHES}
        same_threads = []
        ref_times, pipe_times = [], {m: [] for m in MICROBATCHES}
        for r in range(rounds):
            order = list(MICROBATCHES[r % len(MICROBATCHES) :]) + list(
                MICROBATCHES[: r % len(MICROBATCHES)]
            )
            # Each M is paired with its own reference measurement, A B or
            # B A alternately, so drift on a shared machine favours neither.
            t_refs, times, cpus, ref_cpus = {}, {}, {}, {}
            for n, m in enumerate(order):
                if (r + n) % 2 == 0:
                    t_refs[m] = reference.step_time(0, steps)
                    times[m] = pipeline.step_time(m, steps)
                else:
                    times[m] = pipeline.step_time(m, steps)
                    t_refs[m] = reference.step_time(0, steps)
                cpus[m] = pipeline.cpu_seconds[-1]
                ref_cpus[m] = reference.cpu_seconds[-1]
            # The unpipelined model again, in the pipeline's process (2
            # inter-op threads): separates pipelining from op parallelism.
            t_same = pipeline.step_time(0, steps)
            same_threads.append(t_same)
            t_ref = statistics.median(t_refs.values())
            ref_times.append(t_ref)
            for m in MICROBATCHES:
                pipe_times[m].append(times[m])
                speedups[m].append(t_refs[m] / times[m])
                work[m].append(cpus[m] / ref_cpus[m])
                vs_same[m].append(t_same / times[m])
            print(
                f"[pipeline_efficiency] round {r + 1}/{rounds}: reference "
                f"{t_ref:.3f}s/step (2 threads {t_same:.3f}s); "
                + ", ".join(
                    f"M={m} {times[m]:.3f}s "
                    f"({t_refs[m] / times[m] / bound(m):.2f})"
                    for m in MICROBATCHES
                ),
                flush=True,
            )
    finally:
        reference.close()
        pipeline.close()
    return {
        "speedups": speedups,
        "work": work,
        "vs_same_threads": vs_same,
        "same_threads_seconds": same_threads,
        "reference_seconds": ref_times,
        "pipeline_seconds": pipe_times,
    }


def plot(per_m: dict, path, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = list(MICROBATCHES)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    med = [per_m[m]["speedup"]["median"] for m in ms]
    lo = [
        per_m[m]["speedup"]["median"] - per_m[m]["speedup"]["min"] for m in ms
    ]
    hi = [
        per_m[m]["speedup"]["max"] - per_m[m]["speedup"]["median"] for m in ms
    ]
    ax1.errorbar(
        ms,
        med,
        yerr=[lo, hi],
        marker="o",
        capsize=3,
        label="PipelineModel (median, min–max)",
    )
    ax1.plot(ms, [bound(m) for m in ms], "k--", label="GPipe bound 2M/(M+1)")
    ax1.axhline(K, color="gray", ls=":", label=f"{K} threads busy")
    ax1.set(
        xscale="log",
        xticks=ms,
        xticklabels=ms,
        xlabel="micro-batches M",
        ylabel="speed-up over 1 device",
        title="Speed-up, K=2 stages",
    )
    ax1.set_ylim(top=K + 0.1)
    ax1.legend()
    eff = [per_m[m]["efficiency"]["median"] for m in ms]
    ax2.plot(ms, eff, marker="o", label="speed-up ÷ bound (median)")
    same = [per_m[m]["efficiency_vs_same_threads"]["median"] for m in ms]
    ax2.plot(
        ms,
        same,
        marker="s",
        ls="--",
        label="vs unpipelined with the same 2 threads",
    )
    ax2.axhline(TARGET, color="r", ls=":", label=f"target {TARGET}")
    ax2.set(
        xscale="log",
        xticks=ms,
        xticklabels=ms,
        xlabel="micro-batches M",
        ylabel="efficiency",
        ylim=(0, max(1.2, *eff, *same) + 0.1),
        title="Pipeline efficiency",
    )
    ax2.legend()
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(full: bool = False) -> dict:
    rounds, steps = (9, 4) if full else (5, 2)
    load_before = os.getloadavg()[0]
    raw = measure(rounds, steps)
    load_after = os.getloadavg()[0]
    per_m = {}
    for m in MICROBATCHES:
        sp = raw["speedups"][m]
        per_m[m] = {
            "bound": bound(m),
            "speedup": common.ratio_stats(sp),
            "efficiency": common.ratio_stats([s / bound(m) for s in sp]),
            "pipeline_seconds_per_step": raw["pipeline_seconds"][m],
            # CPU time of a pipelined step ÷ the reference's: the extra work
            # pipelining does (split, accumulation, smaller matmuls),
            # whatever the number of idle cores.
            "cpu_work_ratio": common.ratio_stats(raw["work"][m]),
            # Efficiency against the unpipelined model run with the same
            # threads as the pipeline (intra 1, inter 2): virtual CPUs share
            # one thread pool, so that model already runs independent ops
            # (e.g. the two matmuls of a Dense backward) two at a time.
            "efficiency_vs_same_threads": common.ratio_stats(
                [v / bound(m) for v in raw["vs_same_threads"][m]]
            ),
        }
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    png = common.RESULTS / "pipeline_efficiency.png"
    try:
        plot(
            per_m,
            png,
            f"{DEPTH} x Dense({WIDTH}), batch {BATCH}, {rounds} rounds; "
            f"1-min load average {load_before:.1f} → {load_after:.1f} "
            f"on {os.cpu_count()} cores",
        )
        plot_path = str(png.relative_to(common.RESULTS.parent.parent))
    except ImportError:
        plot_path = "not written: pip install matplotlib (setup.cfg 'bench')"
    meets = all(
        per_m[m]["efficiency"]["median"] >= TARGET
        for m in MICROBATCHES
        if m >= 8
    )
    return {
        "ratio": per_m[8]["efficiency"],
        "ratio_definition": "speed-up(M=8) ÷ GPipe bound 2·8/(8+1); "
        "per_microbatches has every M",
        "target": f">= {TARGET} at M >= 8",
        "meets_target": meets,
        "per_microbatches": {str(m): v for m, v in per_m.items()},
        "reference_seconds_per_step": raw["reference_seconds"],
        "same_threads_seconds_per_step": raw["same_threads_seconds"],
        "median_cpu_work_ratio": {
            str(m): round(per_m[m]["cpu_work_ratio"]["median"], 3)
            for m in MICROBATCHES
        },
        "median_efficiency_vs_same_threads": {
            str(m): round(per_m[m]["efficiency_vs_same_threads"]["median"], 3)
            for m in MICROBATCHES
        },
        "median_efficiency": {
            str(m): round(per_m[m]["efficiency"]["median"], 3)
            for m in MICROBATCHES
        },
        "plot": plot_path,
        "environment": common.environment(
            stages=K,
            model=f"{DEPTH} x Dense({WIDTH}, relu), SGD, mse",
            batch_size=BATCH,
            reference="1 device, intra_op=1, inter_op=1 threads",
            pipeline=f"{K} virtual CPUs, intra_op=1, inter_op={K} threads",
            rounds=rounds,
            load_average_1min=[round(load_before, 2), round(load_after, 2)],
            steps_per_measurement=steps,
            interleaving="per round, for each M in rotating order: "
            "reference and pipeline side by side, alternating which goes "
            "first; ratio per pair",
        ),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        print(json.dumps(main("--full" in sys.argv), indent=2))

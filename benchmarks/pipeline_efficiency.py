"""pipeline_efficiency: GPipe speed-up ÷ its bound K·M/(M+K−1), K = 2.

Headline: the speed-up of `kd.placement.PipelineModel` over the unpipelined
model **given the same threads** (the same process: 2 virtual CPUs, intra-op
threads = 1, inter-op threads = 2), divided by the GPipe bound, for
M ∈ {1, 2, 4, 8, 16} micro-batches. Per round and per M the two are timed
side by side, alternating which goes first; the median of per-round ratios
is reported with min and max.

CPU virtual devices share one thread pool, so on a CPU this benchmark cannot
show pipeline speed-up: the unpipelined model given two threads already runs
independent operations (e.g. the two matrix products of a Dense backward
pass) two at a time, and the pipeline only adds work (splitting the batch,
summing micro-batch gradients, smaller matrix products). Real speed-up needs
stages on separate devices (GPUs) with their own compute.

Secondary, labelled as such: the speed-up over the unpipelined model on one
device with ONE thread (a second process, intra-op = inter-op = 1), timed
once per round; it mixes pipelining with the second thread and is kept only
for comparison with earlier results. The CPU work ratio (pipelined CPU time
÷ same-threads CPU time) is the extra work pipelining does.

The model is compute-bound: 8 Dense(512, relu) layers (4 per stage), a
batch of 4096 examples, SGD and mean squared error. Steps are timed through
Keras's own train function (the one `fit` runs), after a warm-up that
traces it.

Run: `python -m benchmarks.run pipeline_efficiency [--full]`.
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks import common
from benchmarks.common import RequestProcess

K = 2
MICROBATCHES = (1, 2, 4, 8, 16)
WIDTH, DEPTH, BATCH = 512, 8, 4096
TARGET = 0.90
_PREFIX = common.REPLY_PREFIX


def bound(m: int, k: int = K) -> float:
    """GPipe's ideal speed-up with k stages and m micro-batches."""
    return k * m / (m + k - 1)


# ---------------------------------------------------------------- worker


def build_model(m, devices, dataset, width=WIDTH, depth=DEPTH):
    """(compiled model, iterator), warmed up; a pipeline if `m` > 0.

    `depth` x Dense(`width`, relu), SGD, mse; with `m` micro-batches over
    `devices` when `m` > 0, else the unsplit model. Also used by
    pipeline_processes.
    """
    import keras

    import kerasdist as kd

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((width,))]
        + [keras.layers.Dense(width, activation="relu")
           for _ in range(depth)],
        name="mlp",
    )
    if m:
        model = kd.placement.PipelineModel(model, devices, num_microbatches=m)
    model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
    model.make_train_function()
    iterator = iter(dataset)
    for _ in range(2):  # warm-up: tracing and first runs
        float(model.train_function(iterator)["loss"])
    return model, iterator


def time_steps(model, iterator, steps) -> float:
    """Seconds per training step, over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        logs = model.train_function(iterator)
    float(logs["loss"])  # wait for the last step
    return (time.perf_counter() - start) / steps


def _worker(role: str) -> None:
    """Serves timing requests on stdin: one JSON line in, one line out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    # Threads must be set before TensorFlow initialises its devices.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(
        1 if role == "reference" else K
    )
    import numpy as np

    import kerasdist as kd

    kd.virtual_cpus(1 if role == "reference" else K)
    tf.get_logger().setLevel("ERROR")  # one train function per model: quiet
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, WIDTH)).astype("float32")
    y = rng.standard_normal((BATCH, WIDTH)).astype("float32")
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    models = {}

    for line in sys.stdin:
        request = json.loads(line)
        m, steps = request["m"], request["steps"]
        if m not in models:
            models[m] = build_model(
                m, [f"/cpu:{i}" for i in range(K)], dataset
            )
        cpu = time.process_time()
        seconds = time_steps(*models[m], steps)
        cpu_seconds = (time.process_time() - cpu) / steps
        print(
            _PREFIX + json.dumps({"seconds": seconds, "cpu": cpu_seconds}),
            flush=True,
        )


# ---------------------------------------------------------------- parent


class _Worker(RequestProcess):
    def __init__(self, role: str):
        super().__init__(role, [
            sys.executable, "-m", "benchmarks.pipeline_efficiency",
            "--worker", role,
        ])
        self.cpu_seconds = []  # CPU time per step of each reply, all threads

    def step_time(self, m: int, steps: int) -> float:
        reply = self.request({"m": m, "steps": steps})
        self.cpu_seconds.append(reply["cpu"])
        return reply["seconds"]


def measure(rounds: int, steps: int) -> dict:
    """Interleaved rounds; returns per-M lists of per-round ratios."""
    reference, pipeline = _Worker("reference"), _Worker("pipeline")
    try:
        # Warm up every configuration before timing anything.
        reference.step_time(0, 1)
        for m in (0, *MICROBATCHES):
            pipeline.step_time(m, 1)
        vs_same = {m: [] for m in MICROBATCHES}
        vs_one_thread = {m: [] for m in MICROBATCHES}
        work = {m: [] for m in MICROBATCHES}
        ref_times, same_times = [], {m: [] for m in MICROBATCHES}
        pipe_times = {m: [] for m in MICROBATCHES}
        for r in range(rounds):
            k = r % len(MICROBATCHES)
            order = list(MICROBATCHES[k:]) + list(MICROBATCHES[:k])
            # The one-thread reference (secondary) once per round, at its
            # start or end alternately.
            if r % 2 == 0:
                ref_times.append(reference.step_time(0, steps))
            for n, m in enumerate(order):
                # Headline pair: the unpipelined model and the pipeline in
                # the same process (same threads), A B or B A alternately.
                if (r + n) % 2 == 0:
                    t_same = pipeline.step_time(0, steps)
                    cpu_same = pipeline.cpu_seconds[-1]
                    t_pipe = pipeline.step_time(m, steps)
                    cpu_pipe = pipeline.cpu_seconds[-1]
                else:
                    t_pipe = pipeline.step_time(m, steps)
                    cpu_pipe = pipeline.cpu_seconds[-1]
                    t_same = pipeline.step_time(0, steps)
                    cpu_same = pipeline.cpu_seconds[-1]
                same_times[m].append(t_same)
                pipe_times[m].append(t_pipe)
                vs_same[m].append(t_same / t_pipe)
                work[m].append(cpu_pipe / cpu_same)
            if r % 2 == 1:
                ref_times.append(reference.step_time(0, steps))
            for m in MICROBATCHES:
                vs_one_thread[m].append(ref_times[-1] / pipe_times[m][-1])
            print(
                f"[pipeline_efficiency] round {r + 1}/{rounds}: "
                + ", ".join(
                    f"M={m} {pipe_times[m][-1]:.3f}s vs "
                    f"{same_times[m][-1]:.3f}s "
                    f"({vs_same[m][-1] / bound(m):.2f})"
                    for m in MICROBATCHES
                )
                + f"; 1-thread reference {ref_times[-1]:.3f}s",
                flush=True,
            )
    finally:
        reference.close()
        pipeline.close()
    return {
        "vs_same_threads": vs_same,
        "vs_one_thread": vs_one_thread,
        "work": work,
        "same_threads_seconds": same_times,
        "reference_seconds": ref_times,
        "pipeline_seconds": pipe_times,
    }


CPU_NOTE = (
    "CPU virtual devices share one thread pool: this shows stage overlap on "
    "shared threads, not the speed-up of stages on devices of their own"
)


def two_axes():
    """(pyplot, figure, (left, right) axes) of a two-panel figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    return plt, fig, axes


def band(per_m: dict, key: str):
    """(medians, [below, above]) of `per_m[m][key]` for errorbar()."""
    ms = list(MICROBATCHES)
    med = [per_m[m][key]["median"] for m in ms]
    lo = [per_m[m][key]["median"] - per_m[m][key]["min"] for m in ms]
    hi = [per_m[m][key]["max"] - per_m[m][key]["median"] for m in ms]
    return med, [lo, hi]


def finish_speedup_axes(ax, title: str) -> None:
    """The GPipe bound, the 1.0 line, log-M axis and legend of a plot."""
    ms = list(MICROBATCHES)
    ax.plot(ms, [bound(m) for m in ms], "k--", label="GPipe bound 2M/(M+1)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xticks=ms, xticklabels=ms,
           xlabel="micro-batches M", ylabel="speed-up", title=title)
    ax.set_ylim(0, K + 0.2)
    ax.legend(fontsize=8, loc="lower right")


def plot(per_m: dict, path, note: str = "") -> None:
    plt, fig, (ax1, ax2) = two_axes()
    ms = list(MICROBATCHES)

    med, err = band(per_m, "speedup_vs_same_threads")
    ax1.errorbar(ms, med, yerr=err, marker="o", capsize=3,
                 label="vs unpipelined, same 2 threads (median, min–max)")
    med1, err1 = band(per_m, "speedup_vs_one_thread")
    ax1.errorbar(ms, med1, yerr=err1, marker="s", ls=":", capsize=3,
                 color="gray", alpha=0.7,
                 label="secondary: vs unpipelined, 1 thread")
    finish_speedup_axes(ax1, "Speed-up, K=2 stages")
    eff = [per_m[m]["efficiency"]["median"] for m in ms]
    ax2.plot(ms, eff, marker="o",
             label="headline: speed-up vs same threads ÷ bound")
    sec = [per_m[m]["efficiency_vs_one_thread"]["median"] for m in ms]
    ax2.plot(ms, sec, marker="s", ls=":", color="gray",
             label="secondary: vs 1 thread ÷ bound")
    ax2.axhline(TARGET, color="r", ls=":", label=f"target {TARGET}")
    ax2.set(xscale="log", xticks=ms, xticklabels=ms,
            xlabel="micro-batches M", ylabel="efficiency (median)",
            ylim=(0, max(1.2, *eff, *sec) + 0.1),
            title="Pipeline efficiency")
    ax2.legend(fontsize=8, loc="lower left")
    fig.suptitle(CPU_NOTE + ("\n" + note if note else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(full: bool = False) -> dict:
    rounds, steps = (9, 4) if full else (5, 2)
    load_before = os.getloadavg()
    raw = measure(rounds, steps)
    load_after = os.getloadavg()
    per_m = {}
    for m in MICROBATCHES:
        same, one = raw["vs_same_threads"][m], raw["vs_one_thread"][m]
        per_m[m] = {
            "bound": bound(m),
            # Headline: against the unpipelined model with the same threads.
            "speedup_vs_same_threads": common.ratio_stats(same),
            "efficiency": common.ratio_stats([v / bound(m) for v in same]),
            "pipeline_seconds_per_step": raw["pipeline_seconds"][m],
            "same_threads_seconds_per_step": raw["same_threads_seconds"][m],
            # CPU time of a pipelined step ÷ the unpipelined model's with the
            # same threads: the extra work pipelining does (split,
            # accumulation, smaller matmuls).
            "cpu_work_ratio": common.ratio_stats(raw["work"][m]),
            # Secondary: against one device with ONE thread; mixes
            # pipelining with the pipeline's second thread.
            "speedup_vs_one_thread": common.ratio_stats(one),
            "efficiency_vs_one_thread": common.ratio_stats(
                [v / bound(m) for v in one]
            ),
        }
    plot_path = save_plot(
        plot, per_m, "pipeline_efficiency",
        f"{DEPTH} x Dense({WIDTH}), batch {BATCH}, {rounds} rounds",
        (load_before, load_after),
    )
    meets = all(
        per_m[m]["efficiency"]["median"] >= TARGET
        for m in MICROBATCHES
        if m >= 8
    )

    def medians(key):
        return {str(m): round(per_m[m][key]["median"], 3)
                for m in MICROBATCHES}

    return {
        "ratio": per_m[8]["efficiency"],
        "ratio_definition": "speed-up(M=8) over the unpipelined model given "
        "the same threads (same process, 2 virtual CPUs, intra_op=1, "
        "inter_op=2) ÷ GPipe bound 2·8/(8+1); per_microbatches has every M",
        "note": CPU_NOTE + ". The unpipelined model given the same two "
        "threads already runs independent operations two at a time; the "
        "pipeline adds work (cpu_work_ratio). Real speed-up needs stages on "
        "separate devices.",
        "target": f">= {TARGET} at M >= 8",
        "meets_target": meets,
        "per_microbatches": {str(m): v for m, v in per_m.items()},
        "median_efficiency": medians("efficiency"),
        "median_speedup_vs_same_threads": medians("speedup_vs_same_threads"),
        "median_cpu_work_ratio": medians("cpu_work_ratio"),
        "secondary_one_thread_reference": {
            "definition": "speed-up over the unpipelined model on one device "
            "with ONE thread (intra_op=1, inter_op=1) ÷ bound; the pipeline "
            "has 2 threads, so this mixes pipelining with the extra thread",
            "median_efficiency": medians("efficiency_vs_one_thread"),
            "median_speedup": medians("speedup_vs_one_thread"),
            "reference_seconds_per_step": raw["reference_seconds"],
        },
        "plot": plot_path,
        "environment": common.environment(
            stages=K,
            model=f"{DEPTH} x Dense({WIDTH}, relu), SGD, mse",
            batch_size=BATCH,
            headline_reference="the unpipelined model in the pipeline's "
            f"process: {K} virtual CPUs, intra_op=1, inter_op={K} threads",
            secondary_reference="1 device, intra_op=1, inter_op=1 threads, "
            "its own process",
            pipeline=f"{K} virtual CPUs, intra_op=1, inter_op={K} threads",
            rounds=rounds,
            load_average=[load_rounded(load_before), load_rounded(load_after)],
            load_note="1/5/15-minute load averages before and after; the "
            "machine is shared with other jobs, ratios are interleaved",
            steps_per_measurement=steps,
            interleaving="per round, for each M in rotating order: the "
            "pipeline and the unpipelined model (same process, same threads) "
            "side by side, alternating which goes first; ratio per pair. "
            "The 1-thread reference once per round",
        ),
    }


def save_plot(plot_fn, per_m: dict, name: str, note: str, loads) -> str:
    """Writes results/NAME.png with `plot_fn`; returns its path or why not.

    The note gets the load averages before and after (`loads`).
    """
    before, after = loads
    load = (
        f"load average (1/5/15 min) {load_text(before)} → "
        f"{load_text(after)} on {os.cpu_count()} cores"
    )
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    png = common.RESULTS / f"{name}.png"
    try:
        plot_fn(per_m, png, f"{note}; {load}")
    except ImportError:
        return "not written: pip install matplotlib (setup.cfg 'bench')"
    return str(png.relative_to(common.RESULTS.parent.parent))


def load_rounded(load) -> list:
    """Load averages rounded for the JSON result."""
    return [round(x, 2) for x in load]


def load_text(load) -> str:
    """Load averages as 1.0/2.0/3.0."""
    return "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        print(json.dumps(main("--full" in sys.argv), indent=2))

"""pipeline_processes: GPipe speed-up with stages in worker processes.

Headline: the speed-up of `kd.placement.PipelineModel` with K = 2 stages on
two **worker processes** (`kd.placement.join_cluster()`, each stage worker
with 1 intra-op and 1 inter-op thread) over the unsplit model in one
process with 1 thread, divided by the GPipe bound 2M/(M+1), for
M ∈ {1, 2, 4, 8, 16} micro-batches. Unlike `pipeline_efficiency` (virtual
CPUs sharing one thread pool), each stage here has its own thread and, on
a quiet machine with ≥ 2 cores, its own core: the overlap is real. The
chief (a third process) only drives the steps.

Per round, for each M in rotating order, the reference and the pipeline
are timed side by side, alternating which goes first; the median of
per-round ratios is reported with min and max (benchmarks/common.py).

Also reported: the bytes crossing the cut per step (activations forward,
their gradients backward) and the bytes of the batch sent from the chief
(inputs to stage 1, targets to stage 2, where the loss is computed); the
time those transfers take on their own (the same messages sent between the
two stage workers one after another, no computation), per M; and the CPU
time per step of each process (stage workers, chief, reference), which
shows where the work runs and that each stage worker uses one thread;
`stage_cpu_ratio` is the two stage workers' CPU time per step over the
unsplit model's (1.0: splitting added no work).

The model is compute-bound: 8 Dense(1024, relu) layers (4 per stage), a
batch of 2048, SGD and mean squared error; steps are timed through Keras's
train function (the one `fit` runs) after a warm-up that traces it.

Run: `python -m benchmarks.run pipeline_processes [--full]`; needs a quiet
machine with at least 2 free cores for a meaningful figure. Another model
shape, as a side run: `KERASDIST_PIPELINE_WIDTH=2048
KERASDIST_PIPELINE_BATCH=1024 python -m benchmarks.run pipeline_processes
[--full]` (results in pipeline_processes_w2048_b1024.{json,png}, through
RESULT_NAME).

The figure depends on the machine: it is the overlap of the stages'
computation against what each micro-batch adds (its transfers, a smaller
matrix product, one more gradient to sum), so a machine whose cores
multiply faster shows a lower efficiency. The reference's seconds per step
(`reference_seconds_per_step`) and the processor (`environment.cpu`) say
which machine a figure comes from.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from benchmarks import common
from benchmarks.common import RequestProcess
from benchmarks.pipeline_efficiency import (
    MICROBATCHES,
    K,
    band,
    bound,
    build_model,
    finish_speedup_axes,
    load_rounded,
    save_plot,
    time_steps,
    two_axes,
)

# The model's shape. KERASDIST_PIPELINE_WIDTH and KERASDIST_PIPELINE_BATCH
# change it for a side run (the chief, the stage workers and the reference
# inherit the environment); its results then go to
# pipeline_processes_w<WIDTH>_b<BATCH>.{json,png}, never over the
# committed ones.
WIDTH = int(os.environ.get("KERASDIST_PIPELINE_WIDTH", 1024))
BATCH = int(os.environ.get("KERASDIST_PIPELINE_BATCH", 2048))
DEPTH = 8
RESULT_NAME = (
    "pipeline_processes" if (WIDTH, BATCH) == (1024, 2048)
    else f"pipeline_processes_w{WIDTH}_b{BATCH}")
TARGET = 0.85
_PREFIX = common.REPLY_PREFIX


def cut_bytes(m: int) -> dict:
    """Bytes moved per training step (float32), whatever M."""
    del m  # M messages of 1/M the size each
    tensor = BATCH * WIDTH * 4
    return {
        "activations_forward": tensor,
        "gradients_backward": tensor,
        "batch_from_chief": 2 * tensor,  # inputs to stage 1, targets to 2
    }


# ---------------------------------------------------------------- workers


def _threads_one() -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _data():
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, WIDTH)).astype("float32")
    y = rng.standard_normal((BATCH, WIDTH)).astype("float32")
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def _transfer_time(devices, m, reps=3) -> float:
    """Seconds to send one step's cut traffic between the stage workers.

    2·M messages of BATCH/M × WIDTH floats, one after another (forward
    activations to stage 2, gradients back to stage 1), no computation.
    """
    import tensorflow as tf

    with tf.device(devices[0]):
        first = tf.random.normal([BATCH // m, WIDTH])

    @tf.function
    def hops(t):
        for i in range(2 * m):
            with tf.device(devices[(i + 1) % 2]):
                t = t + 1.0  # a copy must arrive (not optimised away)
        with tf.device(devices[0]):
            return tf.reduce_sum(t[:1, :1])

    float(hops(first))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        float(hops(first))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reference() -> None:
    """The unsplit model in this process, 1 thread; answers requests."""
    _threads_one()
    _serve_requests(
        lambda m: build_model(0, None, _data(), WIDTH, DEPTH), transfer=None
    )


def _chief() -> None:
    """Joins the cluster; times the pipeline over workers 1 and 2."""
    import tensorflow as tf

    import kerasdist as kd

    tf.config.threading.set_intra_op_parallelism_threads(1)
    devices = kd.placement.join_cluster()[1:3]
    _serve_requests(
        lambda m: build_model(m, devices, _data(), WIDTH, DEPTH),
        transfer=lambda m: _transfer_time(devices, m),
    )


def _serve_requests(build, transfer) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    models = {}
    for line in sys.stdin:
        request = json.loads(line)
        if "transfer" in request:
            seconds = transfer(request["transfer"])
        else:
            m = request["m"]
            if m not in models:
                models[m] = build(m)
            seconds = time_steps(*models[m], request["steps"])
        print(_PREFIX + json.dumps({"seconds": seconds}), flush=True)


def _stage_server() -> None:
    """A stage worker: 1 intra-op, 1 inter-op thread; serves the chief."""
    _threads_one()
    import kerasdist as kd

    kd.placement.join_cluster()  # never returns


# ---------------------------------------------------------------- parent


class _Group:
    """The chief (a RequestProcess) and its two stage-worker processes."""

    def __init__(self):
        from kerasdist import cluster

        config = cluster.make_tf_config(K + 1, 0)
        self.servers = []
        for i in range(1, K + 1):
            config["task"]["index"] = i
            self.servers.append(RequestProcess(f"stage worker {i}", [
                sys.executable, "-m", "benchmarks.pipeline_processes",
                "--worker", "stage",
            ], env=_env(config)))
        config["task"]["index"] = 0
        self.chief = RequestProcess("chief", [
            sys.executable, "-m", "benchmarks.pipeline_processes",
            "--worker", "chief",
        ], env=_env(config))

    def cpu_seconds(self) -> list[float]:
        """CPU time used so far by each stage worker, then the chief."""
        return [
            _cpu_seconds(p.proc.pid) for p in (*self.servers, self.chief)
        ]

    def close(self) -> None:
        self.chief.close()  # its exit tells the stage workers to exit
        for s in self.servers:
            s.close()


def _env(config) -> dict:
    return dict(
        os.environ, TF_CONFIG=json.dumps(config), TF_CPP_MIN_LOG_LEVEL="2"
    )


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(rounds: int, steps: int) -> dict:
    """Interleaved rounds; returns per-M lists of per-round figures."""
    reference = RequestProcess("reference", [
        sys.executable, "-m", "benchmarks.pipeline_processes",
        "--worker", "reference",
    ])
    group = _Group()
    try:
        reference.request({"m": 0, "steps": 1})
        for m in MICROBATCHES:  # warm up every configuration
            group.chief.request({"m": m, "steps": 1})
        transfer = {
            m: group.chief.request({"transfer": m})["seconds"]
            for m in MICROBATCHES
        }
        speedup = {m: [] for m in MICROBATCHES}
        pipe_t = {m: [] for m in MICROBATCHES}
        ref_t = {m: [] for m in MICROBATCHES}
        stage_cpu = {m: [] for m in MICROBATCHES}
        for r in range(rounds):
            k = r % len(MICROBATCHES)
            for n, m in enumerate(MICROBATCHES[k:] + MICROBATCHES[:k]):
                request = {"m": m, "steps": steps}
                if (r + n) % 2:
                    t_pipe, cpu = _timed_pipeline(group, request)
                    t_ref, cpu_ref = _timed_reference(reference, steps)
                else:
                    t_ref, cpu_ref = _timed_reference(reference, steps)
                    t_pipe, cpu = _timed_pipeline(group, request)
                cpu = dict(zip(("stage_1", "stage_2", "chief"), cpu,
                               strict=True), reference=cpu_ref)
                pipe_t[m].append(t_pipe)
                ref_t[m].append(t_ref)
                speedup[m].append(t_ref / t_pipe)
                stage_cpu[m].append(cpu)
            print(
                f"[pipeline_processes] round {r + 1}/{rounds}: " + ", ".join(
                    f"M={m} {pipe_t[m][-1]:.3f}s vs {ref_t[m][-1]:.3f}s "
                    f"({speedup[m][-1] / bound(m):.2f})"
                    for m in MICROBATCHES
                ), flush=True,
            )
    finally:
        reference.close()
        group.close()
    return {
        "speedup": speedup, "pipeline_seconds": pipe_t,
        "reference_seconds": ref_t, "stage_cpu": stage_cpu,
        "transfer_seconds": transfer,
    }


def _timed_reference(reference, steps):
    """(seconds per step, CPU seconds per step) of the unsplit model."""
    before = _cpu_seconds(reference.proc.pid)
    seconds = reference.request({"m": 0, "steps": steps})["seconds"]
    return seconds, (_cpu_seconds(reference.proc.pid) - before) / steps


def _timed_pipeline(group, request):
    """(seconds per step, CPU seconds per step of each process)."""
    before = group.cpu_seconds()
    seconds = group.chief.request(request)["seconds"]
    after = group.cpu_seconds()
    return seconds, [
        (a - b) / request["steps"] for a, b in zip(after, before, strict=True)
    ]


def _stage_cpu_ratio(cpus: list[dict]) -> float | None:
    """Median over rounds of the stage workers' CPU time over the unsplit
    model's; None when the reference used less than a clock tick (a tiny
    model in a quick check)."""
    ratios = [(c["stage_1"] + c["stage_2"]) / c["reference"]
              for c in cpus if c["reference"] > 0]
    return statistics.median(ratios) if ratios else None


def plot(per_m: dict, path, note: str = "") -> None:
    plt, fig, (ax1, ax2) = two_axes()
    ms = list(MICROBATCHES)
    med, err = band(per_m, "speedup")
    ax1.errorbar(ms, med, yerr=err, marker="o", capsize=3,
                 label="2 stage processes vs unsplit, 1 thread each")
    finish_speedup_axes(ax1, "Speed-up, K=2 stage worker processes")
    eff = [per_m[m]["efficiency"]["median"] for m in ms]
    share = [per_m[m]["transfer_share"] for m in ms]
    ax2.plot(ms, eff, marker="o", label="speed-up ÷ bound (median)")
    ax2.plot(ms, share, marker="s", ls=":", color="gray",
             label="cut transfers alone ÷ pipelined step time")
    ax2.axhline(TARGET, color="r", ls=":", label=f"target {TARGET} at M=8")
    ax2.set(xscale="log", xticks=ms, xticklabels=ms,
            xlabel="micro-batches M", ylabel="ratio",
            ylim=(0, max(1.2, *eff) + 0.1), title="Pipeline efficiency")
    ax2.legend(fontsize=8, loc="lower left")
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(full: bool = False) -> dict:
    rounds, steps = (7, 4) if full else (5, 2)
    rounds = int(os.environ.get("KERASDIST_BENCH_ROUNDS", rounds))
    steps = int(os.environ.get("KERASDIST_BENCH_STEPS", steps))
    load_before = os.getloadavg()
    raw = measure(rounds, steps)
    load_after = os.getloadavg()
    per_m = {}
    for m in MICROBATCHES:
        pipe_median = statistics.median(raw["pipeline_seconds"][m])
        per_m[m] = {
            "bound": bound(m),
            "speedup": common.ratio_stats(raw["speedup"][m]),
            "efficiency": common.ratio_stats(
                [v / bound(m) for v in raw["speedup"][m]]
            ),
            "pipeline_seconds_per_step": raw["pipeline_seconds"][m],
            "reference_seconds_per_step": raw["reference_seconds"][m],
            "cpu_seconds_per_step": raw["stage_cpu"][m],
            "stage_cpu_ratio": _stage_cpu_ratio(raw["stage_cpu"][m]),
            "bytes_per_step": cut_bytes(m),
            "transfer_seconds_per_step": raw["transfer_seconds"][m],
            "transfer_share": raw["transfer_seconds"][m] / pipe_median,
        }
    plot_path = save_plot(
        plot, per_m, RESULT_NAME,
        f"{DEPTH} x Dense({WIDTH}), batch {BATCH}, {rounds} rounds of "
        f"{steps} steps", (load_before, load_after),
    )
    return {
        "ratio": per_m[8]["efficiency"],
        "ratio_definition": "speed-up(M=8) of the pipeline with 2 stage "
        "worker processes (1 intra-op, 1 inter-op thread each) over the "
        "unsplit model in one process with 1 thread, ÷ GPipe bound "
        "2·8/(8+1); per_microbatches has every M",
        "target": f">= {TARGET} at M = 8",
        "meets_target": per_m[8]["efficiency"]["median"] >= TARGET,
        "per_microbatches": {str(m): v for m, v in per_m.items()},
        "median_efficiency": {
            str(m): round(per_m[m]["efficiency"]["median"], 3)
            for m in MICROBATCHES
        },
        "plot": plot_path,
        "environment": common.environment(
            stages=K,
            model=f"{DEPTH} x Dense({WIDTH}, relu), SGD, mse",
            batch_size=BATCH,
            reference="unsplit model, its own process, intra_op=1, "
            "inter_op=1",
            pipeline="chief + 2 stage worker processes on 127.0.0.1 "
            "(kd.placement.join_cluster), each stage worker intra_op=1, "
            "inter_op=1",
            rounds=rounds,
            steps_per_measurement=steps,
            load_average=[load_rounded(load_before), load_rounded(load_after)],
            load_note="1/5/15-minute load averages before and after; on a "
            "shared machine the stage workers may not get a core each",
            interleaving="per round, for each M in rotating order: the "
            "pipeline and the reference side by side, alternating which "
            "goes first; ratio per pair",
        ),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        {"reference": _reference, "chief": _chief,
         "stage": _stage_server}[sys.argv[2]]()
    else:
        result = main("--full" in sys.argv)
        if RESULT_NAME != "pipeline_processes":  # a side run
            common.write_result(RESULT_NAME, result)
        print(json.dumps(result, indent=2))

"""Gradient compression: step time with fp16 all-reduce ÷ fp32.

Two workers (real processes, MultiWorkerMirroredStrategy, gRPC on
127.0.0.1), one thread each. The model is communication-bound by design: one
large Dense layer (IN x OUT weights) on a tiny batch, so almost all of a step
is the gradient all-reduce. Each worker builds the same model twice, once
with `compression=None` and once with `"fp16"` (same strategy, toggled with
`kd.compression.enable` before each model is built), warms both up, then
times them interleaved (A B A B ...) round by round.

Bytes: (1) the bytes handed to the collectives per step, summed from the
traced graphs' `CollectiveReduceV2` inputs; (2) the bytes actually sent over
the loopback interface during each round (`/proc/net/dev`, `lo` tx bytes,
both workers; other traffic on the machine adds noise, so the median is
reported).

Run: `python -m benchmarks.run compression [--full]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

IN, OUT = 1024, 2048  # 2M weights: 8 MB of float32 gradient per step
PER_WORKER_BATCH = 8


def _lo_tx_bytes() -> int | None:
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])
    except OSError:
        return None
    return None


def _collective_bytes(model) -> int:
    """Bytes per step given to CollectiveReduceV2 ops in the train step."""
    total, seen = 0, set()

    def walk(graph):
        nonlocal total
        for op in graph.get_operations():
            if op.type == "CollectiveReduceV2":
                t = op.inputs[0]
                n = t.shape.num_elements() or 0
                total += n * t.dtype.size
        for fn in getattr(graph, "_functions", {}).values():
            g = getattr(fn, "graph", None)
            if g is not None and id(g) not in seen:
                seen.add(id(g))
                walk(g)

    fns = [c.cell_contents for c in (model.train_function.__closure__ or ())]
    for fn in fns:
        for cf in getattr(fn, "_list_all_concrete_functions", list)():
            walk(cf.graph)
    return total


def worker(out: str, rounds: int, steps: int) -> None:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    import keras

    import kerasdist as kd

    task = kd.cluster.from_env()
    strategy = kd.get_strategy("multi_worker")
    n = strategy.num_replicas_in_sync
    global_batch = PER_WORKER_BATCH * n
    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch * 4, IN)).astype("float32")
    y = rng.normal(size=(global_batch * 4, OUT)).astype("float32")
    ds = kd.data.distribute(
        tf.data.Dataset.from_tensor_slices((x, y)).repeat(), strategy,
        global_batch_size=global_batch,
    )

    models = {}
    for name in ("fp32", "fp16"):
        kd.compression.enable(strategy, None if name == "fp32" else "fp16")
        keras.utils.set_random_seed(1)
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((IN,)),
                keras.layers.Dense(OUT, use_bias=False),
            ])
            model.compile(keras.optimizers.SGD(1e-4), "mse")
        model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)  # warm-up
        models[name] = model

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.t0)

    def run(name):
        cb = StepTimes()
        cb.times = []
        lo0 = _lo_tx_bytes()
        models[name].fit(ds, epochs=1, steps_per_epoch=steps, verbose=0,
                         callbacks=[cb])
        lo1 = _lo_tx_bytes()
        sent = None if lo0 is None else (lo1 - lo0) / steps
        return float(np.median(cb.times)), sent

    rows = []
    for i in range(rounds):
        order = ("fp32", "fp16") if i % 2 == 0 else ("fp16", "fp32")
        row = {}
        for name in order:
            row[name] = run(name)
        rows.append(row)

    final = {name: float(m.evaluate(ds, steps=2, verbose=0))
             for name, m in models.items()}
    if task.is_chief:
        with open(out, "w") as f:
            json.dump({
                "rows": rows,
                "collective_bytes": {
                    k: _collective_bytes(m) for k, m in models.items()
                },
                "final_loss": final,
                "replicas": n,
                "global_batch": global_batch,
            }, f)


def main(full: bool = False) -> dict:
    from benchmarks import common

    rounds, steps = (11, 30) if full else (7, 16)
    data = common.run_worker_script(
        __file__, ["--rounds", str(rounds), "--steps", str(steps)],
        timeout=900 if full else 300,
    )
    rows = data["rows"]
    time_ratio = common.ratio_stats(
        [r["fp16"][0] / r["fp32"][0] for r in rows]
    )
    lo = [r["fp16"][1] / r["fp32"][1] for r in rows
          if r["fp32"][1] and r["fp16"][1] is not None]
    cb = data["collective_bytes"]
    return {
        "ratio": time_ratio,
        "target": "<= 0.7 step time (fp16 / fp32)",
        "meets_target": time_ratio["median"] <= 0.7,
        "bytes_ratio_collective_inputs": cb["fp16"] / cb["fp32"],
        "collective_bytes_per_step": cb,
        "bytes_ratio_loopback": (
            common.ratio_stats(lo) if lo else None
        ),
        "step_time_seconds": {
            "fp32_median": sorted(r["fp32"][0] for r in rows)[len(rows) // 2],
            "fp16_median": sorted(r["fp16"][0] for r in rows)[len(rows) // 2],
        },
        "final_loss": data["final_loss"],
        "environment": common.environment(
            workers=2,
            threads_per_worker=1,
            model=f"Dense({IN}->{OUT}, no bias), {IN * OUT} weights",
            per_worker_batch=PER_WORKER_BATCH,
            steps_per_round=steps,
            transport="gRPC over 127.0.0.1 (MultiWorkerMirroredStrategy)",
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.out, args.rounds, args.steps)
    else:
        sys.path.insert(0, os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        print(json.dumps(main(args.full), indent=2))

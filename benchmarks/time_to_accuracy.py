"""time_to_accuracy: wall time to a target accuracy over slow links.

4 workers (`kd.MultiWorkerMirroredStrategy`, one replica and one thread
each) on 4 emulated hosts: network namespaces behind 1 Gbit/s or 100 Mbit/s
links (`kerasdist.testing.links`, tc tbf caps, both directions). Same data
(a 10-class Gaussian mixture, 256 features; each worker its own quarter),
model (MLP 256-2048-512-10: 1.58 M parameters, 6.3 MB of float32
gradient), initial weights and number of steps for every method:

- `sync`: synchronous SGD (one gradient all-reduce per step);
- `sync_fp16`, `sync_bf16`: the same, gradients all-reduced in 16 bits;
- `local_h8`, `local_h32`: `LocalSGD(8)` / `(32)`, plain averaging;
- `local_h8_int8`: `LocalSGD(8, compression="int8")` (error feedback);
- `diloco_h32`: `LocalSGD(32)` with the documented DiLoCo outer optimizer,
  inner SGD + momentum (what users bring), and `local_h32_adamw` /
  `diloco_h32_adamw` with an inner AdamW (DiLoCo's own regime).

Each worker evaluates the test set every 8 steps (every H steps for local
SGD: the averaged model exists only at syncs) and stamps it with its
training wall time: from the end of its first step (tracing excluded) to
now, minus the time spent evaluating. The target accuracy is sync's final
accuracy (over the same steps) minus 1 pp, per round and link speed; time
to target is the first evaluation at or above it. Bytes sent per worker are
read from the host's interface (`/proc/net/dev` inside its namespace: what
really crossed the link, gRPC and TCP overhead included) and counted on the
collective (`AllReduceCounter`, payload only).

Rounds interleave methods (A B C ... A B C ...) and link speeds; ratios
are per round, median over rounds. The default is a short check (one round
per speed, 64 steps); `--full` is the measurement: 256 steps, 3 rounds at
100 Mbit/s (where the target is) and 1 at 1 Gbit/s, about 50 min on a quiet
2-core machine. `--steps N` and `--rounds 1gbit=R1,100mbit=R2` change
either. Needs root (network namespaces).

Run: `python -m benchmarks.run time_to_accuracy [--full]`, or
`python -m benchmarks.time_to_accuracy [--full] [--steps N] [--rounds ...]`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from benchmarks import common, communication_efficiency

WORKERS, FEATURES, CLASSES, HIDDEN = 4, 256, 10, (2048, 512)
TRAIN_PER_WORKER, TEST, BATCH = 4096, 2048, 32
PORT = 23456
EVAL_EVERY = 8
RATES = ("1gbit", "100mbit")
DILOCO = (0.7, 0.5)  # the documented line: SGD(0.7, momentum=0.5, Nesterov)
METHODS = {
    # name: (sync_every, outer, compression, inner)
    "sync": (None, None, None, "sgdm"),
    "sync_fp16": (None, None, "fp16", "sgdm"),
    "sync_bf16": (None, None, "bf16", "sgdm"),
    "local_h8": (8, None, None, "sgdm"),
    "local_h32": (32, None, None, "sgdm"),
    "local_h8_int8": (8, None, "int8", "sgdm"),
    "diloco_h32": (32, DILOCO, None, "sgdm"),
    "local_h32_adamw": (32, None, None, "adamw"),
    "diloco_h32_adamw": (32, DILOCO, None, "adamw"),
}


def make_data(n, seed):
    return communication_efficiency.make_data(
        n, seed, classes=CLASSES, features=FEATURES, modes=2, spread=0.3)


def _tx_bytes() -> int:
    """Bytes this network namespace's eth0 has sent."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "eth0":
                return int(rest.split()[8])
    return 0


def _build(inner_name):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(HIDDEN[0], activation="relu"),
        keras.layers.Dense(HIDDEN[1], activation="relu"),
        keras.layers.Dense(CLASSES),
    ])
    inner = (keras.optimizers.AdamW(0.001) if inner_name == "adamw"
             else keras.optimizers.SGD(0.02, momentum=0.9))
    model.compile(inner, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    return model


def _clock(xt, yt, every):
    """Callback: (training seconds, test accuracy) every `every` steps."""
    import keras
    import numpy as np

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.curve, self.start, self.paused = [], None, 0.0

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if self.start is None:  # the first step traces: not counted
                self.start = now
                return
            if (batch + 1) % every:
                return
            logits = self.model(xt, training=False)
            acc = float(np.mean(np.argmax(logits, -1) == yt))
            self.curve.append((now - self.start - self.paused, batch + 1,
                               acc))
            self.paused += time.perf_counter() - now

    return Clock()


def run_worker(config_path: str) -> None:
    """One worker (inside its host's namespace); writes its JSON result."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    import kerasdist as kd

    with open(config_path) as f:
        config = json.load(f)
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    h, outer, compression, inner = METHODS[config["method"]]
    strategy = kd.MultiWorkerMirroredStrategy(
        compression=compression if h is None else None)
    counter = kd.callbacks.AllReduceCounter(strategy)
    x, y = make_data(TRAIN_PER_WORKER * WORKERS, 1)
    xt, yt = make_data(TEST, 2)
    ds = tf.data.Dataset.from_tensor_slices(
        (x[rank::WORKERS], y[rank::WORKERS])).repeat().batch(BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    ds = ds.with_options(options)
    with strategy.scope():
        model = _build(inner)
    callbacks = []
    if h is not None:
        callbacks.append(kd.callbacks.LocalSGD(
            h, None if outer is None else keras.optimizers.SGD(
                outer[0], momentum=outer[1], nesterov=True),
            compression=compression))
    clock = _clock(xt, yt, h or EVAL_EVERY)
    sent = _tx_bytes()
    model.fit(ds, epochs=1, steps_per_epoch=config["steps"], verbose=0,
              callbacks=[*callbacks, clock])
    result = {
        "curve": clock.curve,
        "link_bytes": _tx_bytes() - sent,
        "allreduce_bytes": counter.bytes,
        "allreduces": counter.calls,
    }
    out = os.path.join(config["out"], f"worker{rank}.json")
    with open(out, "w") as f:
        json.dump(result, f)


def _run_method(hosts, method, steps, tmp, timeout) -> dict:
    """The 4 workers of one method on `hosts`; their results."""
    from kerasdist.launch import supervisor

    out = tempfile.mkdtemp(dir=tmp)
    config_path = os.path.join(out, "config.json")
    with open(config_path, "w") as f:
        json.dump({"method": method, "steps": steps, "out": out}, f)
    cluster = {"worker": [f"{h.address}:{PORT}" for h in hosts]}
    procs = []
    try:
        for i, host in enumerate(hosts):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                       TF_CONFIG=json.dumps({
                           "cluster": cluster,
                           "task": {"type": "worker", "index": i}}))
            procs.append(supervisor.Process(
                host.command([sys.executable, "-m",
                              "benchmarks.time_to_accuracy", "--worker",
                              config_path]),
                env=env, cwd=common.ROOT, capture=True))
        deadline = time.monotonic() + timeout
        while any(p.running() for p in procs):
            if any(p.returncode for p in procs) or (
                    time.monotonic() > deadline):
                break
            time.sleep(0.2)
    finally:
        supervisor.stop_all(procs, grace=1.0)
    if any(p.returncode for p in procs):
        bad = next(p for p in procs if p.returncode)
        raise RuntimeError(
            f"{method}: a worker failed or timed out after {timeout:.0f}s:"
            f"\n{bad.output()[-4000:]}")
    results = []
    for i in range(len(hosts)):
        with open(os.path.join(out, f"worker{i}.json")) as f:
            results.append(json.load(f))
    return results


def _summarize(workers: list, target: float) -> dict:
    curve = workers[0]["curve"]  # the same model on every worker
    reached = next((t for t, _, a in curve if a >= target), None)
    return {
        "final_accuracy": curve[-1][2],
        "seconds_to_target": reached,
        "train_seconds": curve[-1][0],
        "link_bytes_per_worker": statistics.mean(
            w["link_bytes"] for w in workers),
        "allreduce_bytes_per_worker": workers[0]["allreduce_bytes"],
        "allreduces": workers[0]["allreduces"],
        "curve": curve,
    }


def _round(rate, steps, methods, tmp, timeout) -> dict:
    from kerasdist.testing import links

    raw = {}
    with links.slow_links(WORKERS, rate) as hosts:
        for method in methods:
            raw[method] = _run_method(hosts, method, steps, tmp, timeout)
            print(f"[time_to_accuracy] {rate} {method}: acc "
                  f"{raw[method][0]['curve'][-1][2]:.4f} in "
                  f"{raw[method][0]['curve'][-1][0]:.1f}s", flush=True)
    target = raw["sync"][0]["curve"][-1][2] - 0.01
    runs = {m: _summarize(w, target) for m, w in raw.items()}
    sync = runs["sync"]
    for r in runs.values():
        r["speedup_to_target"] = (
            sync["seconds_to_target"] / r["seconds_to_target"]
            if r["seconds_to_target"] and sync["seconds_to_target"]
            else None)
        r["gap_to_sync_pp"] = 100 * (r["final_accuracy"]
                                     - sync["final_accuracy"])
    return {"target_accuracy": target, "runs": runs}


def plot(rounds: dict, path) -> None:
    panels, targets = {}, {}
    for rate, per_round in rounds.items():
        title = f"{rate}: 4 workers, round 1"
        panels[title] = {
            name: ([t for t, _, _ in r["curve"]],
                   [a for _, _, a in r["curve"]])
            for name, r in per_round[0]["runs"].items()
        }
        targets[title] = per_round[0]["target_accuracy"]
    communication_efficiency.accuracy_panels(
        panels, "training wall time (s, log scale)", path, targets)


def _medians(rounds: list) -> dict:
    out = {}
    for name in rounds[0]["runs"]:
        speedups = [r["runs"][name]["speedup_to_target"] for r in rounds]
        known = [s for s in speedups if s is not None]
        out[name] = {
            "speedup_to_target": (common.ratio_stats(known)
                                  if known else None),
            "reached_target_rounds": len(known),
            "gap_to_sync_pp": statistics.median(
                r["runs"][name]["gap_to_sync_pp"] for r in rounds),
            "link_bytes_per_worker": statistics.median(
                r["runs"][name]["link_bytes_per_worker"] for r in rounds),
        }
    return out


FULL = {"steps": 256, "rounds": {"1gbit": 1, "100mbit": 3}}
SHORT = {"steps": 64, "rounds": {"1gbit": 1, "100mbit": 1}}


def parse_rounds(text: str) -> dict:
    """`"1gbit=1,100mbit=3"` -> {"1gbit": 1, "100mbit": 3}."""
    out = {}
    for part in filter(None, text.split(",")):
        rate, _, n = part.partition("=")
        if rate not in RATES or not n.isdigit() or int(n) < 1:
            raise ValueError(
                f"--rounds: {part!r} is not RATE=N with RATE in {RATES} "
                "and N >= 1; e.g. --rounds 1gbit=1,100mbit=3")
        out[rate] = int(n)
    return out


def main(full: bool = False, steps: int | None = None,
         per_rate: dict | None = None) -> dict:
    plan = FULL if full else SHORT
    steps = steps or plan["steps"]
    per_rate = {r: (per_rate or {}).get(r, plan["rounds"][r]) for r in RATES}
    timeout = 3600 if full else 1200
    rounds = {rate: [] for rate in RATES}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(max(per_rate.values())):
            for rate in (r for r in RATES if i < per_rate[r]):
                rounds[rate].append(
                    _round(rate, steps, list(METHODS), tmp, timeout))
    summary = {rate: _medians(r) for rate, r in rounds.items()}
    png = common.RESULTS / "time_to_accuracy.png"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rounds, png)
    slow = summary["100mbit"]
    best = max(("local_h8", "local_h32"), key=lambda m: (
        slow[m]["speedup_to_target"] or {}).get("median", 0))
    ratio = (slow[best]["speedup_to_target"] or {}).get("median")
    return {
        "ratio": ratio,
        "ratio_method": best,
        "target": "100 Mbit/s: local SGD reaches sync's final accuracy "
                  "- 1 pp >= 3x sooner than sync, final accuracy within "
                  "0.5 pp of sync's",
        "meets_target": bool(ratio and ratio >= 3
                             and slow[best]["gap_to_sync_pp"] >= -0.5),
        "short_check": not full,
        "summary": summary,
        "rounds": rounds,
        "plot": str(png.relative_to(common.RESULTS.parent.parent)),
        "environment": common.environment(
            workers="4 MultiWorkerMirroredStrategy processes, 1 intra-op "
                    "and 1 inter-op thread each, each in its own network "
                    "namespace behind a tc tbf link (both directions)",
            model="MLP 256-2048-512-10 (1.58 M parameters)",
            data=f"{TRAIN_PER_WORKER} examples per worker, {TEST} test, "
                 "10-class Gaussian mixture",
            per_worker_batch=BATCH, steps=steps, rounds=per_rate),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2])
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--full", action="store_true")
        parser.add_argument("--steps", type=int, default=None)
        parser.add_argument("--rounds", type=parse_rounds, default=None)
        args = parser.parse_args()
        result = main(args.full, args.steps, args.rounds)
        print(common.write_result("time_to_accuracy", result))

"""Worker script for the training-toolkit multi-worker tests (issue 5).

Run by `kerasdist.testing.run_workers` as 2 real workers on 127.0.0.1 with
`--out DIR`; each worker writes `DIR/result-<rank>.json`. One process runs
every scenario in turn (an MWMS strategy can be created once per process):

- metric_average: per-worker `local_val` logs without `MetricAverage`, then
  with it and `EarlyStopping`;
- chief_only: `ChiefOnly` around ModelCheckpoint, CSVLogger, TensorBoard;
- accumulation: `gradient_accumulation_steps=k` vs a k-times larger batch;
- compression: the same model trained with fp32 and fp16 all-reduce, and
  the dtypes of the collectives in the traced train step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from collectives import collective_dtypes

import kerasdist as kd

DIM = 8


def make_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype("float32")
    w = rng.normal(size=(DIM, 1)).astype("float32")
    y = (x @ w + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def build(lr=0.05, accumulation=None, seed=1, momentum=0.0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((DIM,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ])
    optimizer = keras.optimizers.SGD(lr, momentum=momentum)
    if accumulation:
        optimizer = kd.accumulate_gradients(optimizer, accumulation)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def worker_dataset(strategy, x, y, global_batch):
    """Global batch i is exactly x[i*B:(i+1)*B] (worker w: its slice)."""

    def fn(ctx):
        per = ctx.get_per_replica_batch_size(global_batch)
        w = ctx.input_pipeline_id
        xs = x.reshape(-1, global_batch, x.shape[1])[:, w * per:(w + 1) * per]
        ys = y.reshape(-1, global_batch, y.shape[1])[:, w * per:(w + 1) * per]
        return tf.data.Dataset.from_tensor_slices(
            (xs.reshape(-1, x.shape[1]), ys.reshape(-1, y.shape[1]))
        ).batch(per).repeat()

    return strategy.distribute_datasets_from_function(fn)


class LocalValidation(keras.callbacks.Callback):
    """Puts a per-worker value into logs: the mse on this worker's own
    held-out rows, plus a drift on worker 1 from epoch 2 on (as a worker
    whose local data goes stale would see)."""

    def __init__(self, x, y, rank):
        super().__init__()
        self.x, self.y, self.rank = x, y, rank

    def on_epoch_end(self, epoch, logs=None):
        pred = self.model(self.x, training=False)
        mse = float(np.mean((np.asarray(pred) - self.y) ** 2))
        logs["local_val"] = mse + self.rank * 0.5 * max(0, epoch - 1)


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({k: float(v) for k, v in logs.items()})


class PidWriter(keras.callbacks.Callback):
    """Writes LOG_DIR/<pid>.txt at every epoch end."""

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self.epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, f"{os.getpid()}.txt"), "a") as f:
            f.write(f"{epoch}\n")
        self.epochs += 1


def scenario_metric_average(strategy, rank, result):
    x, y = make_data()
    rng = np.random.default_rng(100 + rank)  # each worker's own rows
    xl = rng.normal(size=(64, DIM)).astype("float32")
    yl = (xl @ np.ones((DIM, 1), "float32")).astype("float32")
    runs = {}
    for name, average in (("plain", False), ("averaged", True)):
        with strategy.scope():
            model = build()
        rec = Recorder()
        stop = keras.callbacks.EarlyStopping("local_val", patience=1,
                                             mode="min")
        cbs = [LocalValidation(xl, yl, rank)]
        if average:
            cbs += [kd.callbacks.MetricAverage(every_batch=True), stop]
        cbs.append(rec)
        model.fit(worker_dataset(strategy, x, y, 32), epochs=6,
                  steps_per_epoch=4, verbose=0, callbacks=cbs)
        runs[name] = {
            "logs": rec.epochs,
            "stopped_epoch": stop.stopped_epoch if average else None,
            "epochs_run": len(rec.epochs),
        }
    # Different keys on the workers: every worker raises, none hangs.
    with strategy.scope():
        model = build()

    class ChiefExtra(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if rank == 0:
                logs["only_on_chief"] = 1.0

    try:
        model.fit(worker_dataset(strategy, x, y, 32), epochs=2,
                  steps_per_epoch=2, verbose=0,
                  callbacks=[ChiefExtra(), kd.callbacks.MetricAverage()])
        runs["mismatch_error"] = None
    except kd.callbacks.MetricAverageError as e:
        runs["mismatch_error"] = str(e)
    result["metric_average"] = runs


def scenario_chief_only(strategy, rank, result, out):
    x, y = make_data()
    shared = os.path.join(out, "shared")
    os.makedirs(shared, exist_ok=True)
    with strategy.scope():
        model = build()
    ckpt = kd.callbacks.ChiefOnly(keras.callbacks.ModelCheckpoint(
        os.path.join(shared, "model-{epoch}.keras")))
    csv = kd.callbacks.ChiefOnly(
        keras.callbacks.CSVLogger(os.path.join(shared, "log.csv")))
    # TensorBoard is not installed here; these write like it (a file per
    # process, named by pid) so the test sees which process wrote.
    skip = kd.callbacks.ChiefOnly(PidWriter(os.path.join(shared, "skip")))
    temp = kd.callbacks.ChiefOnly(
        PidWriter(os.path.join(shared, "temp")), mode="temp_dir",
        path_attrs=["log_dir"])
    lines = []
    summary = kd.callbacks.RunSummary(print_fn=lines.append)
    model.fit(worker_dataset(strategy, x, y, 32), epochs=2,
              steps_per_epoch=3, callbacks=[ckpt, csv, skip, temp, summary],
              verbose=kd.callbacks.chief_verbose(0))
    result["chief_only"] = {
        "pid": os.getpid(),
        "ckpt_mode": ckpt.mode,
        "ckpt_filepath": ckpt.callback.filepath,
        "temp_dir": ckpt.temp_dir,
        "pid_writer_temp_dir": temp.temp_dir,
        "pid_writer_log_dir": temp.callback.log_dir,
        "pid_writer_epochs": temp.callback.epochs,
        "temp_dir_exists": (
            os.path.exists(ckpt.temp_dir) if ckpt.temp_dir else None
        ),
        "summary_lines": lines,
        "summary": summary.summary,
    }


def scenario_accumulation(strategy, rank, result):
    k, batch = 2, 16
    x, y = make_data(n=128)
    steps = 8  # accumulation steps -> 4 optimizer updates
    with strategy.scope():
        acc = build(accumulation=k, momentum=0.9)
    acc.fit(worker_dataset(strategy, x, y, batch), epochs=1,
            steps_per_epoch=steps, verbose=0)
    with strategy.scope():
        big = build(momentum=0.9)
    big.fit(worker_dataset(strategy, x, y, k * batch), epochs=1,
            steps_per_epoch=steps // k, verbose=0)
    # No strategy: one device, batch k * B, same example order.
    ref = build(momentum=0.9)
    ref.fit(x[: steps * batch], y[: steps * batch], batch_size=k * batch,
            epochs=1, shuffle=False, verbose=0)
    result["accumulation"] = {
        "max_diff_vs_single_device": float(max(
            np.max(np.abs(a - r))
            for a, r in zip(acc.get_weights(), ref.get_weights(), strict=True)
        )),
        "max_diff_vs_big_batch": float(max(
            np.max(np.abs(a - b))
            for a, b in zip(acc.get_weights(), big.get_weights(), strict=True)
        )),
        "max_update": float(max(
            np.max(np.abs(a - b))
            for a, b in zip(acc.get_weights(), build().get_weights(),
                            strict=True)
        )),
        "iterations": int(acc.optimizer.iterations.numpy()),
    }


def scenario_compression(strategy, rank, result):
    x, y = make_data(n=512)
    out = {}
    for compression in (None, "fp16", "bf16"):
        kd.compression.enable(strategy, compression)
        with strategy.scope():
            model = build(lr=0.02)
        hist = model.fit(worker_dataset(strategy, x, y, 32), epochs=3,
                         steps_per_epoch=16, verbose=0)
        out[str(compression)] = {
            "loss": hist.history["loss"],
            "collective_dtypes": collective_dtypes(model.train_function),
        }
    kd.compression.enable(strategy, None)
    result["compression"] = out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--scenarios",
        default="metric_average,chief_only,accumulation,compression",
    )
    args = parser.parse_args(argv)
    task = kd.cluster.from_env()
    strategy = kd.get_strategy("multi_worker")
    result = {"rank": task.worker_rank, "is_chief": task.is_chief}
    for name in args.scenarios.split(","):
        if name == "metric_average":
            scenario_metric_average(strategy, task.worker_rank, result)
        elif name == "chief_only":
            scenario_chief_only(strategy, task.worker_rank, result, args.out)
        elif name == "accumulation":
            scenario_accumulation(strategy, task.worker_rank, result)
        elif name == "compression":
            scenario_compression(strategy, task.worker_rank, result)
        else:
            raise SystemExit(f"unknown scenario {name!r}")
    path = os.path.join(args.out, f"result-{task.worker_rank}.json")
    with open(path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worker script and runner shared by the recovery benchmarks.

As a script (run by `kerasdist-run`), trains a small MLP on generated data
with `kd.callbacks.BackupAndRestore` and appends one JSON line per trained
step to `OUT/steps-RANK.jsonl` (attempt, global step, wall time). A fault
`ATTEMPT:STEP:SIGNAL` makes worker 1 (or the only worker) send itself
SIGNAL after global step STEP of that attempt, and records the time in
`OUT/faults.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--backup_dir", required=True)
    parser.add_argument("--save_freq", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps_per_epoch", type=int, default=40)
    parser.add_argument("--fault", action="append", default=[])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    import keras
    import numpy as np
    import tensorflow as tf

    import kerasdist as kd

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    strategy = kd.get_strategy()
    task = kd.cluster.from_env()
    attempt = kd.launch.restart_count()
    victim = 1 if task.num_workers > 1 else 0
    faults = {}
    for spec in args.fault:
        a, step, sig = spec.split(":")
        if int(a) == attempt and task.worker_rank == victim:
            faults[int(step)] = getattr(signal, sig)

    batch = 64
    n = batch * args.steps_per_epoch
    rng = np.random.RandomState(0)
    x = rng.normal(size=(n, 32)).astype("float32")
    y = rng.randint(0, 10, n)
    ds = kd.data.distribute(
        tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
            n, seed=1, reshuffle_each_iteration=True),
        strategy, global_batch_size=batch)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((32,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ])
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, f"steps-{task.worker_rank}.jsonl")

    class StepLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, step, logs=None):
            gstep = self.epoch * args.steps_per_epoch + step + 1
            with open(log_path, "a") as f:
                f.write(json.dumps({"attempt": attempt, "step": gstep,
                                    "time": time.time()}) + "\n")
            if gstep in faults:
                with open(os.path.join(args.out, "faults.jsonl"), "a") as f:
                    f.write(json.dumps({
                        "attempt": attempt, "step": gstep,
                        "signal": faults[gstep].name, "time": time.time(),
                    }) + "\n")
                os.kill(os.getpid(), faults[gstep])

    model.fit(ds, epochs=args.epochs, verbose=0, callbacks=[
        StepLog(), kd.callbacks.BackupAndRestore(args.backup_dir,
                                                 args.save_freq)])
    return 0


def run_job(workdir: str, faults: list[str], *, num_workers: int = 2,
            save_freq: int = 10, epochs: int = 2, steps_per_epoch: int = 40,
            max_restarts: int = 10) -> dict:
    """Runs this script under the launcher; returns steps and faults."""
    import io

    import kerasdist as kd

    out = os.path.join(workdir, "out")
    command = [sys.executable, os.path.abspath(__file__), "--out", out,
               "--backup_dir", os.path.join(workdir, "backup"),
               "--save_freq", str(save_freq), "--epochs", str(epochs),
               "--steps_per_epoch", str(steps_per_epoch)]
    for f in faults:
        command += ["--fault", f]
    stream = io.StringIO()
    result = kd.launch.run(
        command, num_workers=num_workers, max_restarts=max_restarts,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"},
        stream=stream, log_dir=os.path.join(workdir, "logs"),
    )
    if not result.ok:
        raise RuntimeError(f"benchmark job failed:\n{stream.getvalue()}")

    def read(name):
        with open(os.path.join(out, name)) as f:
            return [json.loads(line) for line in f if line.strip()]

    return {"steps": read("steps-0.jsonl"), "faults": read("faults.jsonl"),
            "result": result}


if __name__ == "__main__":
    sys.exit(main())

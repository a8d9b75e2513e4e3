"""Worker for the multi-host elastic scenarios (tests/test_elastic_hosts.py).

Run by `kerasdist-run --hosts ...` on emulated hosts (127.0.0.x). Trains
`fault_worker`'s fingerprinting model on its id-carrying data with a fixed
global batch, whatever the group size, under `kd.callbacks.BackupAndRestore`;
logs each step (attempt, epoch, step, ids) to `OUT/steps-<rank>.jsonl`;
writes `PID_DIR/<host>-a<attempt>-w<rank>.pid` ("pid pgid") so a test can
take its host down by process group; the chief saves `OUT/final.npz`.

With `--metrics`, for benchmarks/elastic_recovery.py, each worker also
appends to `OUT/metrics-<rank>.jsonl` one line per trained step (attempt,
epoch, step, wall time at the end of the step, and the loss of that step's
global batch, computed before the update) and to `OUT/phases-<rank>.jsonl`
one line per attempt with the wall times of its start-up phases (script
started, TensorFlow imported, strategy ready, `fit` called). This adds a
forward pass per step and leaves the training itself unchanged.

    python tests/elastic_hosts_worker.py --out DIR --backup_dir DIR \\
        --pid_dir DIR --global_batch 12 --step_delay 0.2
"""

from __future__ import annotations

import time

STARTED = time.time()  # Before any other import: the phases' origin.

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import fault_worker  # noqa: E402


def with_batch_loss(model):
    """Makes `model`'s train step also report `batch_loss`: the loss of the
    batch before the update (Keras' own `loss` is a running mean)."""
    import keras

    step = model.train_step

    def train_step(data):
        # The per-example function: a `keras.losses.Loss` object would
        # divide by the replicas in sync (scaled for distribution).
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
            data[1], model(data[0], training=True), from_logits=True))
        logs = dict(step(data))
        logs["batch_loss"] = loss  # Averaged over replicas by Keras.
        return logs

    model.train_step = train_step
    return model


def metrics_callback(path: str):
    """Appends attempt, epoch, step, time and batch loss per step."""
    import keras

    from kerasdist.launch import restart_count

    class MetricsLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            record = {"attempt": restart_count(), "epoch": self.epoch,
                      "step": batch, "time": time.time(),
                      "loss": float(logs["batch_loss"])}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsLog()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--backup_dir", required=True)
    parser.add_argument("--pid_dir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--global_batch", type=int, default=12)
    parser.add_argument("--save_freq", type=int, default=2)
    parser.add_argument("--step_delay", type=float, default=0.0)
    parser.add_argument("--metrics", action="store_true",
                        help="also log times and per-batch losses")
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf

    phases = {"started": STARTED, "imported": time.time()}

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import kerasdist as kd
    from kerasdist.launch import restart_count

    strategy = kd.MultiWorkerMirroredStrategy()
    phases["strategy_ready"] = time.time()
    task = kd.cluster.from_env()
    host = os.environ.get("KERASDIST_HOST", "127.0.0.1")
    os.makedirs(args.pid_dir, exist_ok=True)
    with open(os.path.join(
        args.pid_dir, f"{host}-a{restart_count()}-w{task.worker_rank}.pid"
    ), "w") as f:
        f.write(f"{os.getpid()} {os.getpgid(0)}\n")

    with strategy.scope():
        model = fault_worker.build_model()
    x, y = fault_worker.make_arrays()
    tf.random.set_seed(fault_worker.SEED)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        len(x), seed=fault_worker.SEED, reshuffle_each_iteration=True
    )
    # The user's global batch: the same at every group size.
    dataset = kd.data.distribute(ds, strategy,
                                 global_batch_size=args.global_batch)
    os.makedirs(args.out, exist_ok=True)
    log = fault_worker.step_log_callback(
        os.path.join(args.out, f"steps-{task.worker_rank}.jsonl"),
        strategy.num_replicas_in_sync,
        lambda epoch, step: time.sleep(args.step_delay),
    )
    callbacks = [log, kd.callbacks.BackupAndRestore(
        args.backup_dir, save_freq=args.save_freq)]
    if args.metrics:
        with_batch_loss(model)
        # First: its time stamp is taken before the step log's delay.
        callbacks.insert(0, metrics_callback(
            os.path.join(args.out, f"metrics-{task.worker_rank}.jsonl")))
        phases["fit"] = time.time()
        with open(os.path.join(
            args.out, f"phases-{task.worker_rank}.jsonl"), "a") as f:
            f.write(json.dumps({"attempt": restart_count(), **phases})
                    + "\n")
    model.fit(dataset, epochs=args.epochs, verbose=0, callbacks=callbacks)
    print(f"worker {task.worker_rank} done", flush=True)
    if task.is_chief:
        np.savez(os.path.join(args.out, "final.npz"),
                 *[np.asarray(w) for w in model.get_weights()])
    keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())

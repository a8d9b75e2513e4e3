"""A tiny deterministic training job for fault-injection tests.

Imported by the tests (model, data, `StepLog`) and run as a worker script
under `kerasdist-run`:

    python tests/fault_worker.py --out DIR --backup_dir DIR --save_freq 4 \\
        --fault 0:1:1:5:SIGKILL

Every example carries its id in column 0 (dropped by the model), and the
training step reports the sum and the sum of squares of the ids it trained
on, so the log of (epoch, step, fingerprint) proves which batch was applied
at each step. `--fault ATTEMPT:WORKER:EPOCH:STEP:WHAT` injects a fault on
that attempt (`KERASDIST_RESTART_COUNT`) and worker after that step (EPOCH
-1: after the strategy is created, before `fit`): WHAT is
a signal name sent to the worker itself, `KILL_IN_SAVE` (SIGKILL inside
the next save, after the temporary file is written and before the rename)
or `HOLD_FOR_SIGTERM` (wait there until SIGTERM arrives, at most 300 s).

For elastic and multi-host tests: `--global_batch B` (default 16; the same
at every group size), `--per_worker_batch P` (the global batch is P x the
workers: resizing without kerasdist's handling), `--max_replica_batch M`
(`kd.elastic.batch_plan` accumulates gradients above it), `--backup epoch`
(a hand-written epoch-end backup instead of kerasdist's), `--pid_dir DIR`
(each worker writes `<KERASDIST_HOST or 127.0.0.1>-w<index>-a<attempt>.pid`
holding "pid pgid"), `--batchnorm plain|sync`, `--all_weights` and
`--steps_per_epoch S` (the dataset repeats forever; S steps an epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

NUM_EXAMPLES = 192
FEATURES = 8
CLASSES = 4
GLOBAL_BATCH = 16
SEED = 7


def make_arrays(num_examples: int = NUM_EXAMPLES, seed: int = SEED):
    import numpy as np

    rng = np.random.RandomState(seed)
    ids = np.arange(num_examples, dtype="float32")[:, None]
    x = rng.normal(size=(num_examples, FEATURES)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + 2 * (x[:, 1] > 0).astype("int64")
    return np.concatenate([ids, x], axis=1), y


def make_dataset(strategy=None, num_examples: int = NUM_EXAMPLES,
                 seed: int = SEED, global_batch: int = GLOBAL_BATCH,
                 accumulation_steps: int = 1, repeat: bool = False):
    """Deterministic pipeline: seeded shuffle, reshuffled every epoch.

    With the default 192 examples an epoch has 12 batches of 16.
    `repeat`: the shuffled examples repeat forever (train with `fit(...,
    steps_per_epoch=...)`); each pass is shuffled anew.
    """
    import tensorflow as tf

    import kerasdist as kd

    x, y = make_arrays(num_examples, seed)
    # The shuffle order depends on TF's global seed too: fix it, so the
    # in-process reference (run after other tests that set seeds) and fresh
    # worker processes shuffle alike.
    tf.random.set_seed(SEED)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        num_examples, seed=seed, reshuffle_each_iteration=True
    )
    if repeat:
        ds = ds.repeat()
    return kd.data.distribute(
        ds, strategy or tf.distribute.get_strategy(),
        global_batch_size=global_batch,
        accumulation_steps=accumulation_steps,
    )


def build_model(hidden: int = 16, steps_per_execution: int = 1,
                batchnorm: str = "none", accumulation_steps: int = 1):
    """Seeded MLP whose `train_step` also logs a fingerprint of its batch.

    `batchnorm`: "none", "plain" (a `BatchNormalization` after the hidden
    layer) or "sync" (the same with `synchronized=True`).
    `accumulation_steps` > 1: `kd.accumulate_gradients` on the optimizer.
    """
    import keras
    import tensorflow as tf

    import kerasdist as kd

    class DropId(keras.layers.Layer):
        def call(self, x):
            return x[:, 1:]

    class FingerprintModel(keras.Sequential):
        def train_step(self, data):
            logs = dict(super().train_step(data))
            ids = data[0][:, 0]
            logs["id_sum"] = tf.reduce_sum(ids)
            logs["id_sq"] = tf.reduce_sum(ids * ids)
            return logs

    init = keras.initializers.GlorotUniform
    model = FingerprintModel([
        keras.Input((FEATURES + 1,)),
        DropId(),
        keras.layers.Dense(hidden, activation="relu",
                           kernel_initializer=init(seed=1)),
        *([] if batchnorm == "none" else [keras.layers.BatchNormalization(
            synchronized=batchnorm == "sync")]),
        keras.layers.Dense(CLASSES, kernel_initializer=init(seed=2)),
    ])
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    if accumulation_steps > 1:
        kd.accumulate_gradients(optimizer, accumulation_steps)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def _hold_for_sigterm(limit: float = 300.0) -> None:
    """Pauses until SIGTERM arrives (at most `limit` seconds), then lets
    the handler already installed (BackupAndRestore's) see it: the test
    preempts at a known step, not at whatever step a fast machine reached."""
    import threading

    got = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        got.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    try:
        deadline = time.monotonic() + limit
        while not got.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)  # the handler runs between sleeps
    finally:
        signal.signal(signal.SIGTERM, previous)


def step_log_callback(path: str, replicas: int = 1, on_step=None):
    """Appends one JSON line per trained step: attempt, epoch, step, ids."""
    import keras

    from kerasdist.launch import restart_count

    class StepLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            # Keras averages the per-replica sums over replicas.
            record = {
                "attempt": restart_count(),
                "epoch": self.epoch,
                "step": batch,
                "id_sum": round(float(logs["id_sum"]) * replicas),
                "id_sq": round(float(logs["id_sq"]) * replicas),
            }
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if on_step is not None:
                on_step(self.epoch, batch)

    return StepLog()


def read_steps(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def lineage(records: list[dict]) -> list[dict]:
    """The steps whose effect survived: drop what a restart rolled back.

    An attempt's first step is where it resumed; steps of earlier attempts
    at or after that point were trained but lost with the process.
    """
    by_attempt: dict[int, list[dict]] = {}
    for r in records:
        by_attempt.setdefault(r["attempt"], []).append(r)
    kept: list[dict] = []
    for attempt in sorted(by_attempt):
        rows = by_attempt[attempt]
        start = (rows[0]["epoch"], rows[0]["step"])
        kept = [r for r in kept if (r["epoch"], r["step"]) < start]
        kept.extend(rows)
    return kept


def retrained(records: list[dict]) -> int:
    """Steps trained more than once, over all attempts."""
    seen: dict[tuple[int, int], int] = {}
    for r in records:
        key = (r["epoch"], r["step"])
        seen[key] = seen.get(key, 0) + 1
    return sum(n - 1 for n in seen.values())


class Interrupted(Exception):
    """Raised from a callback to interrupt `fit` (what a crash looks like)."""


def interrupt_at(epoch: int, step: int):
    """An `on_step` for `step_log_callback` that interrupts at (epoch, step)."""
    def on_step(e, s):
        if (e, s) == (epoch, step):
            raise Interrupted()

    return on_step


def fingerprints(records: list[dict]) -> list[tuple]:
    """(epoch, step, id sum, id square sum) of each logged step."""
    return [(r["epoch"], r["step"], r["id_sum"], r["id_sq"]) for r in records]


def assert_weights_equal(a, b) -> None:
    """Weights equal up to float32 round-off, variable by variable."""
    import numpy as np

    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def epoch_backup_callback(backup_dir: str):
    """What users write without kerasdist (the negative control): weights
    and optimizer state saved by every worker at each epoch end."""
    import keras
    import numpy as np

    class EpochBackup(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            os.makedirs(backup_dir, exist_ok=True)
            values = [np.asarray(v.numpy()) for v in
                      self.model.variables + self.model.optimizer.variables]
            np.savez(os.path.join(backup_dir, "epoch.npz"),
                     np.asarray(epoch + 1), *values)

    return EpochBackup()


def load_epoch_backup(model, backup_dir: str) -> int:
    """Restores `epoch_backup_callback`'s file; returns the epoch to start."""
    import numpy as np

    path = os.path.join(backup_dir, "epoch.npz")
    if not os.path.exists(path):
        return 0
    with model.distribute_strategy.scope():
        model.optimizer.build(model.trainable_variables)
    with np.load(path) as f:
        values = [f[f"arr_{i}"] for i in range(len(f.files))]
    for v, value in zip(model.variables + model.optimizer.variables,
                        values[1:], strict=True):
        v.assign(value)
    return int(values[0])


def write_pid(pid_dir: str) -> str:
    """Writes `<host>-w<index>-a<attempt>.pid` holding "pid pgid".

    The host is `KERASDIST_HOST` (127.0.0.1 when unset), the index
    `KERASDIST_WORKER_INDEX`, the attempt `KERASDIST_RESTART_COUNT`: a test
    can stop exactly the processes of one emulated host. Returns the path.
    """
    from kerasdist.launch import protocol

    host = os.environ.get(protocol.ENV_HOST) or "127.0.0.1"
    index = os.environ.get(protocol.ENV_WORKER_INDEX, "0")
    path = os.path.join(
        pid_dir, f"{host}-w{index}-a{protocol.restart_count()}.pid")
    os.makedirs(pid_dir, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {os.getpgid(0)}\n")
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--backup_dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save_freq", default="4")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--fault", action="append", default=[])
    parser.add_argument("--num_examples", type=int, default=NUM_EXAMPLES)
    parser.add_argument("--steps_per_execution", type=int, default=1)
    parser.add_argument("--validation", choices=["none", "same", "separate"],
                        default="none")
    parser.add_argument("--strict_logs", action="store_true",
                        help="a callback that reads logs['loss'] at epoch "
                        "end (raises KeyError on empty logs)")
    parser.add_argument("--global_batch", type=int, default=GLOBAL_BATCH,
                        help="examples per step over all workers")
    parser.add_argument("--per_worker_batch", type=int, default=0,
                        help="if > 0, the global batch is this times the "
                        "number of workers (what resizing without "
                        "kerasdist's elastic handling does)")
    parser.add_argument("--max_replica_batch", type=int, default=None,
                        help="a per-replica memory cap: "
                        "kd.elastic.batch_plan accumulates gradients when "
                        "a replica's share of the global batch exceeds it")
    parser.add_argument("--pid_dir", default=None,
                        help="each worker writes <host>-w<index>-a<attempt>"
                        ".pid here, holding 'pid pgid'")
    parser.add_argument("--backup", choices=["kerasdist", "epoch"],
                        default="kerasdist",
                        help="epoch: the usual hand-written way, each "
                        "worker saves weights and optimizer at every epoch "
                        "end and a restart resumes at the next epoch's "
                        "start (use {rank} in --backup_dir)")
    parser.add_argument("--batchnorm", choices=["none", "plain", "sync"],
                        default="none")
    parser.add_argument("--all_weights", action="store_true",
                        help="every worker writes final-w<rank>.npz")
    parser.add_argument("--steps_per_epoch", type=int, default=None,
                        help="repeat the dataset forever and train this "
                        "many steps per epoch")
    args = parser.parse_args(argv)
    if args.pid_dir:
        write_pid(args.pid_dir)

    import keras
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import kerasdist as kd
    from kerasdist.callbacks import backup_and_restore
    from kerasdist.launch import restart_count

    strategy = kd.get_strategy(args.strategy)
    task = kd.cluster.from_env()
    attempt = restart_count()
    faults = []
    for spec in args.fault:
        a, w, e, s, what = spec.split(":")
        if int(a) == attempt and int(w) == task.worker_rank:
            faults.append((int(e), int(s), what))

    def on_step(epoch, step):
        for e, s, what in faults:
            if (e, s) != (epoch, step):
                continue
            if what == "HOLD_FOR_SIGTERM":
                _hold_for_sigterm()
            elif what == "KILL_IN_SAVE":
                real_replace = os.replace

                def replace_then_die(src, dst, real_replace=real_replace):
                    if os.path.basename(dst).startswith("ckpt-"):
                        os.kill(os.getpid(), signal.SIGKILL)
                    real_replace(src, dst)

                backup_and_restore.os.replace = replace_then_die
            else:
                os.kill(os.getpid(), getattr(signal, what))

    # EPOCH -1: the fault happens after the strategy is created, before fit.
    for e, _, what in faults:
        if e == -1:
            os.kill(os.getpid(), getattr(signal, what))
    global_batch = args.global_batch
    if args.per_worker_batch:
        global_batch = args.per_worker_batch * task.num_workers
    accumulation_steps = 1
    if args.max_replica_batch:
        accumulation_steps = kd.elastic.batch_plan(
            global_batch, args.max_replica_batch, strategy).accumulation_steps
    with strategy.scope():
        model = build_model(steps_per_execution=args.steps_per_execution,
                            batchnorm=args.batchnorm,
                            accumulation_steps=accumulation_steps)
    save_freq = args.save_freq
    save_freq = save_freq if save_freq == "epoch" else int(save_freq)
    os.makedirs(args.out, exist_ok=True)
    log = step_log_callback(
        os.path.join(args.out, f"steps-{task.worker_rank}.jsonl"),
        strategy.num_replicas_in_sync, on_step,
    )
    dataset = make_dataset(strategy, args.num_examples,
                           global_batch=global_batch,
                           accumulation_steps=accumulation_steps,
                           repeat=args.steps_per_epoch is not None)
    validation = {"none": None, "same": dataset}.get(args.validation)
    if args.validation == "separate":
        validation = make_dataset(strategy, 64, seed=SEED + 1,
                                  global_batch=global_batch)
    callbacks = [log]
    if args.strict_logs:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: float(logs["loss"])))
    backup_dir = args.backup_dir.replace("{rank}", str(task.worker_rank))
    initial_epoch = 0
    if args.backup == "epoch":
        initial_epoch = load_epoch_backup(model, backup_dir)
        callbacks.append(epoch_backup_callback(backup_dir))
    else:
        callbacks.append(kd.callbacks.BackupAndRestore(backup_dir, save_freq))
    history = model.fit(
        dataset,
        initial_epoch=initial_epoch,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        verbose=0,
        validation_data=validation,
        callbacks=callbacks,
    )
    print(f"worker {task.worker_rank} done", flush=True)
    weights = [np.asarray(w) for w in model.get_weights()]
    if task.is_chief:
        np.savez(os.path.join(args.out, "final.npz"), *weights)
        print("history epochs:", len(history.history.get("loss", [])))
    if args.all_weights:
        np.savez(os.path.join(args.out, f"final-w{task.worker_rank}.npz"),
                 *weights)
    keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worker for the 16-worker tests (tests/test_scale16.py) and the
`launcher_scale` benchmark (benchmarks/launcher_scale.py).

Run by `kerasdist-run --num_workers N` or `--hosts A:2,B:2,...`. Trains
`fault_worker`'s fingerprinting model (one intra-op and one inter-op
thread) on its id-carrying data with a fixed global batch, whatever the
group size, under `kd.callbacks.BackupAndRestore`. The chief appends one
JSON line per trained step to `OUT/steps-0.jsonl` (attempt, epoch, step,
id fingerprint) and to `OUT/times-0.jsonl` (attempt, epoch, step, wall
times at the epoch's begin, the step's begin and its end: where a slow
step's time went), and saves `OUT/final.npz`; every worker appends
to `OUT/phases-<rank>.jsonl` one line per attempt with the wall
times of its start-up phases (script started, TensorFlow imported,
strategy ready, first step ended) and to `OUT/ends-<rank>.jsonl` one
line per attempt that finished training (its last step's end, the
`on_train_end` hooks before the backup's, the backup's `on_train_end`
(its final save) begun and done, `fit` returned, final weights written:
where the time after the last step goes; a worker still in `fit` 10 s
after its hooks began prints its threads' stacks). Every
worker writes `PID_DIR/<host>-w<index>-a<attempt>.pid` ("pid pgid") so a
test can take its emulated host down.

`--kill RANK:EPOCH:STEP` makes worker RANK of the first attempt SIGKILL
itself after that step, recording the time first in `OUT/kill.json`.
`--hold FILE`: after each step, every worker waits while FILE exists (a
test holds the group at a step it chose, then lets it go on); with
`--hold_from A`, only on attempts A and later (a first attempt runs on
to its `--kill` step).
`--collective_rounds K` (benchmark): after `fit`, every worker times K
all-reduces of the model's trainable variables (one step's gradients) and
the chief writes their median to `OUT/collective.json`.

    python tests/scale16_worker.py --out DIR --backup_dir DIR \\
        --pid_dir DIR --global_batch 1680 --num_examples 13440 \\
        --kill 5:0:3
"""

from __future__ import annotations

import time

STARTED = time.time()  # Before any other import: the phases' origin.

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import fault_worker  # noqa: E402


def _parse(argv):
    parser = argparse.ArgumentParser()
    for directory in ("out", "backup_dir", "pid_dir"):
        parser.add_argument(f"--{directory}", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--global_batch", type=int, default=1680)
    parser.add_argument("--num_examples", type=int, default=1680 * 4)
    parser.add_argument("--save_freq", type=int, default=2)
    parser.add_argument("--hold", default=None,
                        help="after each step, wait while this file exists")
    parser.add_argument("--hold_from", type=int, default=0,
                        help="hold only on this attempt and later ones")
    parser.add_argument("--kill", default=None,
                        help="RANK:EPOCH:STEP, on the first attempt")
    parser.add_argument("--collective_rounds", type=int, default=0)
    return parser.parse_args(argv)


def _collective_seconds(strategy, model, rounds: int) -> float:
    """Median seconds of one all-reduce of the trainable variables."""
    import tensorflow as tf

    values = [tf.zeros_like(v) for v in model.trainable_variables]

    @tf.function
    def all_reduce():
        def fn():
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce("sum", values)

        return strategy.run(fn)

    all_reduce()  # Traced and warmed up.
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy")
                              else t, strategy.experimental_local_results(
                                  all_reduce()))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    args = _parse(argv)
    # `kill -USR2 PID` prints every thread's Python stack (to the worker's
    # log): what a hung worker waits for.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    fault_worker.write_pid(args.pid_dir)

    import keras
    import numpy as np
    import tensorflow as tf

    phases = {"started": STARTED, "imported": time.time()}
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import kerasdist as kd
    from kerasdist.launch import restart_count

    strategy = kd.MultiWorkerMirroredStrategy()
    task = kd.cluster.from_env()
    phases["strategy_ready"] = time.time()
    kill = None
    if args.kill and restart_count() == 0:
        rank, epoch, step = map(int, args.kill.split(":"))
        if rank == task.worker_rank:
            kill = (epoch, step)
    os.makedirs(args.out, exist_ok=True)
    hold = args.hold if restart_count() >= args.hold_from else None
    clock = {}  # Wall times: "epoch" and "step" begins.

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            clock["epoch"] = time.time()

        def on_train_batch_begin(self, batch, logs=None):
            clock["step"] = time.time()

        def on_train_batch_end(self, batch, logs=None):
            clock["last_step"] = time.time()

        def on_train_end(self, logs=None):  # Before the backup's (last).
            clock["train_ended"] = time.time()
            # A worker still in `fit` 10 s later prints where it waits.
            faulthandler.dump_traceback_later(10)

    class Backup(kd.callbacks.BackupAndRestore):
        def on_train_end(self, logs=None):
            clock["backup_end_begun"] = time.time()
            super().on_train_end(logs)
            clock["backup_end_done"] = time.time()

    def on_step(epoch, step):
        now = time.time()
        if "first_step" not in phases:
            phases["first_step"] = now
            with open(os.path.join(
                    args.out, f"phases-{task.worker_rank}.jsonl"), "a") as f:
                f.write(json.dumps({"attempt": restart_count(), **phases})
                        + "\n")
        if task.is_chief:
            with open(os.path.join(args.out, "times-0.jsonl"), "a") as f:
                f.write(json.dumps({"attempt": restart_count(),
                                    "epoch": epoch, "step": step,
                                    "epoch_begun": clock.get("epoch"),
                                    "step_begun": clock.get("step"),
                                    "time": now}) + "\n")
        if (epoch, step) == kill:
            with open(os.path.join(args.out, "kill.json"), "w") as f:
                json.dump({"time": time.time(), "epoch": epoch,
                           "step": step}, f)
            os.kill(os.getpid(), signal.SIGKILL)
        while hold and os.path.exists(hold):
            time.sleep(0.05)

    with strategy.scope():
        model = fault_worker.build_model()
    dataset = fault_worker.make_dataset(strategy, args.num_examples,
                                        global_batch=args.global_batch)
    log = fault_worker.step_log_callback(
        os.path.join(args.out, f"steps-{task.worker_rank}.jsonl"),
        strategy.num_replicas_in_sync, on_step)
    model.fit(dataset, epochs=args.epochs, verbose=0, callbacks=[
        Clock(), log, Backup(args.backup_dir, save_freq=args.save_freq)])
    fit_returned = time.time()
    faulthandler.cancel_dump_traceback_later()
    if args.collective_rounds:
        seconds = _collective_seconds(strategy, model,
                                      args.collective_rounds)
        if task.is_chief:
            with open(os.path.join(args.out, "collective.json"), "w") as f:
                json.dump({"seconds": seconds,
                           "rounds": args.collective_rounds}, f)
    weights = model.get_weights()
    keras.backend.clear_session()
    if task.is_chief:  # What the test compares.
        np.savez(os.path.join(args.out, "final.npz"), *weights)
    with open(os.path.join(args.out, f"ends-{task.worker_rank}.jsonl"),
              "a") as f:
        f.write(json.dumps({
            "attempt": restart_count(), "last_step": clock.get("last_step"),
            "train_ended": clock.get("train_ended"),
            "backup_end_begun": clock.get("backup_end_begun"),
            "backup_end_done": clock.get("backup_end_done"),
            "fit_returned": fit_returned, "done": time.time()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

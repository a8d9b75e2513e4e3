"""Worker script for the multi-worker tests (run by kerasdist.testing).

    python tests/mw_worker.py OUT_DIR MODE

MODE `kd` trains every parity case under kd.MultiWorkerMirroredStrategy and
saves `CASE-workerRANK.npz`. MODE `hang` (under kerasdist-run) trains a small
model, touching the launcher's heartbeat at every step; on the first attempt
worker 1 stops itself (SIGSTOP) at step `HANG_STEP` (env, default 3), so
worker 0 blocks in the next all-reduce; later attempts finish. MODE
`upstream_fit` / `upstream_reduce` runs the failing Keras 3 code paths under
tf.distribute's own strategy and records the error in
`upstream-workerRANK.json` (exit 0 either way).
"""

import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Mode `hang`: start-up (importing TensorFlow, connecting the workers) and
# shut-down print nothing for seconds. Beat the launcher's heartbeat from a
# thread outside training, from before the imports; during training only
# the steps beat, so a worker blocked in a collective stops beating like a
# real one.
_TRAINING = threading.Event()


def _beat_outside_training():
    path = os.environ.get("KERASDIST_HEARTBEAT_FILE")
    while path:
        if not _TRAINING.is_set():
            try:
                os.utime(path)
            except OSError:  # The launcher removed it: we are stopping.
                return
        time.sleep(0.5)


if sys.argv[2:3] == ["hang"]:
    threading.Thread(target=_beat_outside_training, daemon=True).start()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from dp_cases import CASES, run  # noqa: E402

import kerasdist as kd  # noqa: E402


def _record(out, rank, fn):
    try:
        fn()
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 (recording any upstream failure)
        result = {"error": type(e).__name__, "message": str(e)[:2000]}
    with open(os.path.join(out, f"upstream-worker{rank}.json"), "w") as f:
        json.dump(result, f)


def _sharding_check(out, rank, strategy):
    """One TFRecord file, two workers: kd.data shards by data.

    (TF's own AUTO policy fails on this input with "Could not apply FILE based
    sharding: the dataset only has 1 file(s)", which also aborts the
    collective executor, so it is not run here.)
    """
    path = os.path.join(out, f"records-{rank}.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for i in range(16):
            w.write(str(i).encode())

    def records():
        return tf.data.TFRecordDataset([path]).map(
            lambda r: tf.strings.to_number(r, tf.int64))

    ours = kd.data.distribute(records(), strategy, global_batch_size=4)
    seen = [int(v) for batch in strategy.experimental_distribute_dataset(ours)
            for v in strategy.experimental_local_results(batch)[0].numpy()]
    with open(os.path.join(out, f"sharding-worker{rank}.json"), "w") as f:
        json.dump({"seen": seen}, f)


def _few_batches(out, rank, strategy):
    """1 global batch of 4 for 2 workers: each trains on its 2 rows.

    (Issue 21: this was refused, "The dataset has 1 global batch(es) but
    there are 2 workers"; under DATA sharding every worker has its part.)
    """
    x = np.arange(8, dtype="float32").reshape(4, 2)
    try:
        with strategy.scope():
            model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
                1, kernel_initializer="ones")])
            model.compile(keras.optimizers.SGD(0.01), "mse")
        model.fit(kd.data.distribute(
            tf.data.Dataset.from_tensor_slices((x, x[:, :1])), strategy,
            global_batch_size=4), epochs=2, verbose=0)
        result = {"error": None,
                  "weights": [w.tolist() for w in model.get_weights()]}
    except ValueError as e:
        result = {"error": str(e)}
    with open(os.path.join(out, f"few-batches-worker{rank}.json"),
              "w") as f:
        json.dump(result, f)


def _has_data_allreduces(out, rank, strategy):
    """How many "does each worker still have data" all-reduces each input
    puts in the training step (counted as TensorFlow traces them)."""
    from tensorflow.python.distribute import input_lib

    traced = []
    name = "_calculate_replicas_with_values"  # TF's has-data all-reduce
    original = getattr(input_lib, name)

    def counting(*args, **kwargs):
        traced.append(1)
        return original(*args, **kwargs)

    x = np.arange(64, dtype="float32").reshape(32, 2)

    def examples():
        return tf.data.Dataset.from_tensor_slices((x, x[:, :1]))

    inputs = {
        # kd.data.distribute, known size: no all-reduce (kerasdist).
        "kd": lambda: kd.data.distribute(examples(), strategy,
                                         global_batch_size=8),
        # The same, distributed before fit: TensorFlow's default.
        "pre_distributed": lambda: strategy.experimental_distribute_dataset(
            kd.data.distribute(examples(), strategy, global_batch_size=8)),
        # Unknown size (filter): kept, the last step is not known.
        "unknown_size": lambda: kd.data.distribute(
            examples().filter(lambda a, b: a[0] >= 0), strategy,
            global_batch_size=8),
    }
    result = {}
    setattr(input_lib, name, counting)
    try:
        for key, make in inputs.items():
            traced.clear()
            with strategy.scope():
                model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
                    1, kernel_initializer="ones")])
                model.compile(keras.optimizers.SGD(0.001), "mse")
            history = model.fit(make(), epochs=2, verbose=0)
            result[key] = {"traced": len(traced),
                            "loss": history.history["loss"],
                            "weights": [w.tolist()
                                        for w in model.get_weights()]}
    finally:
        setattr(input_lib, name, original)
    with open(os.path.join(out, f"has-data-worker{rank}.json"), "w") as f:
        json.dump(result, f)


def _hang():
    from kerasdist.launch import protocol

    strategy = kd.get_strategy("auto")
    assert isinstance(strategy, kd.MultiWorkerMirroredStrategy)
    rank = kd.cluster.from_env().worker_rank
    stop_at = int(os.environ.get("HANG_STEP", "3"))
    first_attempt = protocol.restart_count() == 0

    class Steps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            _TRAINING.set()
            protocol.touch_heartbeat()
            if first_attempt and rank == 1 and batch == stop_at:
                print(f"stopping myself at step {batch}", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)

        def on_train_batch_end(self, batch, logs=None):
            protocol.touch_heartbeat()

    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    x = np.ones((64, 4), "float32")
    data = kd.data.distribute(
        tf.data.Dataset.from_tensor_slices((x, x[:, :1])), strategy,
        global_batch_size=8)
    model.fit(data, epochs=1, verbose=0, callbacks=[Steps()])
    _TRAINING.clear()
    print("training done", flush=True)


def main(out, mode):
    if mode == "hang":
        _hang()
        return
    rank = kd.cluster.from_env().worker_rank
    if mode == "kd":
        strategy = kd.get_strategy("auto", timeout_seconds=60)
        assert isinstance(strategy, kd.MultiWorkerMirroredStrategy)
        for case in CASES:
            np.savez(os.path.join(out, f"{case}-worker{rank}.npz"),
                     **run(case, strategy))
        _few_batches(out, rank, strategy)
        _sharding_check(out, rank, strategy)
        _has_data_allreduces(out, rank, strategy)
        return
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if mode == "upstream_fit":
        _record(out, rank, lambda: run("adam_dict", strategy))
    elif mode == "upstream_reduce":
        # Keras's own reduction of a scalar log under MWMS: the code path
        # model.fit reaches once bug 1 is out of the way.
        from keras.src.backend.tensorflow import trainer

        def reduce_logs():
            per_replica = strategy.run(lambda: tf.constant(1.0))
            trainer.reduce_per_replica({"loss": per_replica}, strategy,
                                       reduction="auto")

        _record(out, rank, reduce_logs)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

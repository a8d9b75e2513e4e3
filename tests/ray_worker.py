"""Training functions run by Ray Train workers in tests/test_ray_train.py.

Importable by the Ray workers (the test puts tests/ on their PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import uuid


def docs_example(config):
    """Ray's "Get started with TensorFlow/Keras" example, as in Ray's docs,
    with only kerasdist's lines added or changed (marked) and generated,
    seeded data instead of the MNIST download."""
    import numpy as np
    import tensorflow as tf
    from ray import train

    import kerasdist as kd  # kerasdist
    from kerasdist.integrations.ray import BackupAndRestore  # kerasdist

    def mnist_dataset(batch_size):
        rng = np.random.RandomState(0)
        x_train = rng.randint(0, 255, size=(640, 28, 28)).astype("uint8")
        y_train = rng.randint(0, 10, size=(640,)).astype("int64")
        x_train = x_train / np.float32(255)
        return (
            tf.data.Dataset.from_tensor_slices((x_train, y_train))
            .shuffle(640, seed=0).repeat().batch(batch_size)
        )

    def build_and_compile_cnn_model():
        # Ray's docs build it unseeded with InputLayer(input_shape=...),
        # deprecated in Keras 3: seeded, a restarted or resized run
        # trains as an unfailed one.
        tf.keras.utils.set_random_seed(0)  # kerasdist
        model = tf.keras.Sequential([
            tf.keras.Input(shape=(28, 28)),  # kerasdist
            tf.keras.layers.Reshape(target_shape=(28, 28, 1)),
            tf.keras.layers.Conv2D(8, 3, activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(32, activation="relu"),
            tf.keras.layers.Dense(10),
        ])
        model.compile(
            loss=tf.keras.losses.SparseCategoricalCrossentropy(
                from_logits=True),
            optimizer=tf.keras.optimizers.SGD(learning_rate=0.001),
            metrics=["accuracy"],
        )
        return model

    per_worker_batch_size = config.get("batch_size", 64)
    num_workers = train.get_context().get_world_size()
    # Ray's docs: strategy = tf.distribute.MultiWorkerMirroredStrategy()
    strategy = kd.MultiWorkerMirroredStrategy()  # kerasdist
    global_batch_size = per_worker_batch_size * num_workers
    multi_worker_dataset = mnist_dataset(global_batch_size)
    with strategy.scope():
        multi_worker_model = build_and_compile_cnn_model()
    history = multi_worker_model.fit(
        multi_worker_dataset, epochs=config["epochs"], steps_per_epoch=5,
        # Ray's docs: callbacks=[ReportCheckpointCallback()]
        callbacks=[BackupAndRestore(config["backup_dir"])],  # kerasdist
        verbose=0,
    )
    return history.history


def _attempt(out: str, rank: int) -> int:
    """How many times this rank has started (0 on the first run)."""
    os.makedirs(out, exist_ok=True)
    n = sum(1 for f in os.listdir(out) if f.startswith(f"start-{rank}-"))
    with open(os.path.join(out, f"start-{rank}-{uuid.uuid4().hex}"), "w"):
        pass
    return n


def _hold(out: str, rank: int, attempt: int, world: int, step: int,
          seconds: float) -> None:
    """Pauses this worker (bounded) so the test can change the cluster at
    a known step; Ray's restart or resize stops the worker meanwhile."""
    import time

    if rank == 0:
        name = f"hold-{attempt}-{world}-{step}.json"
        tmp = os.path.join(out, f".{name}")
        with open(tmp, "w") as f:
            json.dump({"attempt": attempt, "world": world, "step": step}, f)
        os.replace(tmp, os.path.join(out, name))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)


def fault_job(config):
    """tests/fault_worker.py's deterministic job as a Ray Train function.

    Config: `out` (logs, final weights), `backup_root`, `epochs`,
    `step_delay` (seconds slept after each step), `holds` (list of
    `[world_size, global_step]`: at that step, in a group of that size that
    already trained in this attempt, every worker pauses for `hold_s`
    seconds after rank 0 writes `hold-<attempt>-<world>-<step>.json`).
    Rank 0 logs each step to `steps-0.jsonl` with the group size and the
    step's fingerprint summed over all replicas.
    """
    import sys

    import keras
    import numpy as np
    import ray
    import tensorflow as tf
    from ray import train

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fault_worker

    import kerasdist as kd
    from kerasdist.integrations.ray import BackupAndRestore

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    out = config["out"]
    context = train.get_context()
    rank = context.get_world_rank()
    world = context.get_world_size()
    attempt = _attempt(out, rank)
    env = {k: v for k, v in os.environ.items()
           if k.startswith("KERASDIST_")}
    with open(os.path.join(out, f"node-{rank}-{attempt}.json"), "w") as f:
        json.dump({"node_id": ray.get_runtime_context().get_node_id(),
                   "pid": os.getpid(), "world": world, "env": env}, f)
    strategy = kd.MultiWorkerMirroredStrategy()
    replicas = strategy.num_replicas_in_sync
    holds = [tuple(h) for h in config.get("holds", [])]
    with strategy.scope():
        model = fault_worker.build_model()

    class StepLog(keras.callbacks.Callback):
        trained = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if self.trained and (world, step) in holds:
                _hold(out, rank, attempt, world, step,
                      config.get("hold_s", 300))

        def on_train_batch_end(self, batch, logs=None):
            self.trained += 1
            if rank == 0:
                # Keras averages the per-replica sums over the replicas.
                record = {
                    "attempt": attempt, "world": world,
                    "epoch": self.epoch, "step": batch,
                    "id_sum": round(float(logs["id_sum"]) * replicas),
                    "id_sq": round(float(logs["id_sq"]) * replicas),
                }
                with open(os.path.join(out, "steps-0.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
            if config.get("step_delay"):
                import time

                time.sleep(config["step_delay"])

    model.fit(
        fault_worker.make_dataset(strategy), epochs=config["epochs"],
        verbose=0,
        callbacks=[StepLog(), BackupAndRestore(
            os.path.join(config["backup_root"], f"node-{rank}"), 4)],
    )
    if rank == 0:
        np.savez(os.path.join(out, "final.npz"),
                 *[np.asarray(w) for w in model.get_weights()])
    keras.backend.clear_session()

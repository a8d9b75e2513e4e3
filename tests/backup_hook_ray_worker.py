"""A Ray Train function for tests/test_ray_train.py (importable by
the Ray workers: the test puts tests/ on their PYTHONPATH)."""

from __future__ import annotations

import json
import os


def accumulating_job(config):
    """tests/fault_worker.py's job with 2 gradient accumulation steps,
    saving every `save_freq` steps through the Ray `BackupAndRestore`;
    each worker logs the saves its hook saw to `saves-<rank>.jsonl`."""
    import sys

    import tensorflow as tf
    from ray import train

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fault_worker

    import kerasdist as kd
    from kerasdist.integrations.ray import BackupAndRestore

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rank = train.get_context().get_world_rank()
    log = os.path.join(config["out"], f"saves-{rank}.jsonl")

    class Logged(BackupAndRestore):
        def on_backup_saved(self, backup):
            super().on_backup_saved(backup)
            with open(log, "a") as f:
                f.write(json.dumps({
                    "global_step": backup.global_step,
                    "finished": backup.finished,
                    "file": backup.path and os.path.basename(backup.path),
                }) + "\n")

    strategy = kd.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = fault_worker.build_model(accumulation_steps=2)
    model.fit(
        fault_worker.make_dataset(strategy, accumulation_steps=2),
        epochs=1, verbose=0,
        callbacks=[Logged(os.path.join(config["out"], f"b-{rank}"),
                          config["save_freq"])],
    )

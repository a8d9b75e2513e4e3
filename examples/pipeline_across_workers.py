"""Pipeline-parallel training with each stage on another worker process.

Every worker runs this script. `kd.placement.join_cluster()` makes the
chief (worker 0) drive training and every other worker serve one pipeline
stage: the stage's layers, their optimizer state and their computation live
in that worker's process, and TensorFlow's runtime sends activations and
their gradients between the workers over gRPC. With
`--backup_dir`, a worker lost mid-epoch restarts the group and training
resumes at the step after the last backup.

    kerasdist-run --num_workers 3 -- python examples/pipeline_across_workers.py
    kerasdist-run --num_workers 5 -- python \\
        examples/pipeline_across_workers.py --num_microbatches=8 \\
        --backup_dir=/tmp/pipe_backup

Under SLURM: `srun --ntasks=3 python examples/pipeline_across_workers.py`.
The chief holds no stage; with N workers, the model is split into N - 1
stages. The data is generated (10 Gaussian clusters in 32 dimensions).
"""

import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("num_microbatches", 4, "Micro-batches per batch.")
flags.DEFINE_integer("batch_size", 64, "Examples per training step.")
flags.DEFINE_integer("epochs", 3, "Training epochs.")
flags.DEFINE_integer("num_examples", 4096, "Training examples.")
flags.DEFINE_integer("hidden", 256, "Width of the hidden layers.")
flags.DEFINE_integer("depth", 4, "Number of hidden layers.")
flags.DEFINE_string("backup_dir", "", "BackupAndRestore directory (or none).")
flags.DEFINE_integer("backup_freq", 20, "Steps between backups.")
flags.DEFINE_integer("seed", 1, "Random seed (data and weights).")
FLAGS = flags.FLAGS


def make_data(n, centers, rng):
    """Examples drawn around one of the given class centres."""
    y = rng.randint(0, len(centers), n)
    x = centers[y] + rng.normal(0, 1.0, (n, centers.shape[1]))
    return x.astype("float32"), y.astype("int64")


def build_model():
    import keras

    return keras.Sequential(
        [keras.Input((32,))]
        + [
            keras.layers.Dense(
                FLAGS.hidden, activation="relu", name=f"hidden_{i}"
            )
            for i in range(FLAGS.depth)
        ]
        + [keras.layers.Dense(10, name="logits")],
        name="mlp",
    )


def main(argv):
    del argv
    import keras

    import kerasdist as kd

    # First, before any tensor: the other workers serve here until the
    # chief's script ends, then exit.
    devices = kd.placement.join_cluster()
    stage_devices = devices[1:]  # One stage per worker; none on the chief.
    keras.utils.set_random_seed(FLAGS.seed)
    rng = np.random.RandomState(FLAGS.seed)
    centers = rng.normal(0, 0.6, (10, 32))
    x, y = make_data(FLAGS.num_examples, centers, rng)
    x_test, y_test = make_data(1024, centers, rng)

    model = build_model()
    plan = kd.placement.plan(
        model, len(stage_devices), devices=stage_devices,
        batch_size=FLAGS.batch_size,
        num_microbatches=FLAGS.num_microbatches, optimizer="adam",
    )
    print(plan, flush=True)
    pipe = kd.placement.PipelineModel(
        model, num_microbatches=FLAGS.num_microbatches, plan=plan
    )
    pipe.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = []
    if FLAGS.backup_dir:
        callbacks.append(kd.callbacks.BackupAndRestore(
            FLAGS.backup_dir, save_freq=FLAGS.backup_freq
        ))
    start = time.time()
    pipe.fit(x, y, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs,
             callbacks=callbacks, verbose=2)
    loss, acc = pipe.evaluate(x_test, y_test, verbose=0)
    where = sorted({
        w.value.device.split("/device:")[0] for w in model.weights
    })
    print(
        f"result: test accuracy {acc:.3f} (chance 0.100), loss {loss:.3f}; "
        f"{plan.num_stages} stage(s) on {where}, "
        f"{FLAGS.num_microbatches} micro-batches of "
        f"{FLAGS.batch_size // FLAGS.num_microbatches}, "
        f"{time.time() - start:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)

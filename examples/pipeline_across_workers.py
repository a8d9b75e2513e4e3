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
stages (or `--num_stages`). The model, the generated data (10 Gaussian
clusters in 32 dimensions) and their flags are those of pipeline_mlp.py.
"""

import time

# The model, its data and their flags (--num_microbatches, --batch_size,
# --epochs, --hidden, --depth, --recompute, --seed) are pipeline_mlp.py's.
import pipeline_mlp
from absl import app, flags

flags.DEFINE_integer("num_examples", 4096, "Training examples.")
flags.DEFINE_string("backup_dir", "", "BackupAndRestore directory (or none).")
flags.DEFINE_integer("backup_freq", 20, "Steps between backups.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import kerasdist as kd

    # First, before any tensor: the other workers serve here until the
    # chief's script ends, then exit.
    devices = kd.placement.join_cluster()
    if FLAGS.num_virtual_cpus:
        raise app.UsageError(
            "--num_virtual_cpus does not apply: the stages are on the "
            "other workers. Leave it at 0."
        )
    # One stage per worker after the chief (--num_stages of them at most).
    stage_devices = devices[1:][: FLAGS.num_stages] if (
        FLAGS["num_stages"].present
    ) else devices[1:]
    (x, y), (x_test, y_test) = pipeline_mlp.make_datasets(FLAGS.num_examples)
    model, plan, pipe = pipeline_mlp.build_pipeline(stage_devices)
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

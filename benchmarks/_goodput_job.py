"""The job `benchmarks/goodput_sim.py --validate` runs under `kerasdist-run`.

Trains a small MLP on generated data for a fixed number of steps with
`kd.callbacks.BackupAndRestore(save_freq=...)`; each worker writes its pid
to `OUT/pid-<attempt>-<rank>` when it starts (the fault injector reads
them). The goodput facts are in the launcher's heartbeat files.

The input repeats (`.repeat()` and `fit(steps_per_epoch=100)`), as
docs/guide/scale.md advises across workers: a dataset of finite size makes
a new iterator every epoch, and tearing the old one down can hold the
whole group for seconds at an epoch boundary. `--input finite` trains on
the finite dataset instead (the validation rows marked "finite").
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--backup_dir", required=True)
    parser.add_argument("--save_freq", default="50")
    parser.add_argument("--mtbf", default=None)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--input", choices=["repeated", "finite"],
                        default="repeated")
    args = parser.parse_args(argv)
    import keras
    import tensorflow as tf

    import kerasdist as kd

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    task = kd.cluster.from_env()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(
        args.out, f"pid-{kd.launch.restart_count()}-{task.worker_rank}"
    ), "w") as f:
        f.write(str(os.getpid()))
    strategy = kd.get_strategy()
    batch, steps_per_epoch = 64, 100

    def example(i):  # generated in the pipeline, the same in every run
        x = tf.random.stateless_normal([64], seed=tf.stack([i, 0]))
        return x, i % 10

    ds = tf.data.Dataset.range(batch * steps_per_epoch).map(example).cache()
    ds = ds.shuffle(batch * steps_per_epoch, seed=1)
    repeated = args.input == "repeated"
    if repeated:
        ds = ds.repeat()
    ds = kd.data.distribute(ds, strategy, global_batch_size=batch)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((64,)),
            keras.layers.Dense(args.hidden, activation="relu"),
            keras.layers.Dense(args.hidden, activation="relu"),
            keras.layers.Dense(10),
        ])
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    save_freq = args.save_freq if args.save_freq in ("auto", "epoch") else (
        int(args.save_freq))
    mtbf = args.mtbf if save_freq == "auto" else None
    model.fit(ds, epochs=args.steps // steps_per_epoch, verbose=0,
              steps_per_epoch=steps_per_epoch if repeated else None,
              callbacks=[kd.callbacks.BackupAndRestore(
                  args.backup_dir, save_freq, mtbf=mtbf)])
    return 0


if __name__ == "__main__":
    sys.exit(main())

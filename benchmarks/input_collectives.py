"""input_collectives: `fit`'s step time across workers on a finite dataset.

Under `MultiWorkerMirroredStrategy`, TensorFlow's distributed iterator
all-reduces, at every step, whether each worker still has data (partial-batch
handling, `_calculate_replicas_with_values` in tensorflow/python/distribute/
input_lib.py) unless the dataset is infinite. kerasdist turns that off for
Keras's `fit` on a dataset of known size that every worker reads as many
batches of (`DATA` sharding, `kd.data.distribute`'s choice). Three arms,
each a real `kd.MultiWorkerMirroredStrategy` job of N workers on
127.0.0.1 with the same small MLP and global batch, run one after another
in a rotating order each round:

- `kerasdist`: `fit(kd.data.distribute(ds, ...))`, the dataset of finite
  size as users write it;
- `tf_default`: the same dataset distributed by
  `strategy.experimental_distribute_dataset` before `fit` (what
  tf.distribute does on its own: one more all-reduce per step);
- `repeated`: `.repeat()` and `fit(steps_per_epoch=...)`, the dataset
  TensorFlow itself runs without the all-reduce.

One epoch holds the warm-up and the timed steps (no epoch boundary is
timed). Reported: per-round ratios `tf_default ÷ kerasdist` and
`repeated ÷ kerasdist` of the seconds per step (median, min, max).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ARMS = ("kerasdist", "tf_default", "repeated")


def _worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--arm", choices=ARMS, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    args = parser.parse_args(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    import kerasdist as kd
    from benchmarks import _models

    strategy = kd.get_strategy("multi_worker")
    batch = 64
    steps = args.warmup + args.steps

    ds = tf.data.Dataset.range(batch * steps).map(_models.example).cache()
    ds = ds.shuffle(batch * steps, seed=1)
    if args.arm == "repeated":
        ds = ds.repeat()
    train = kd.data.distribute(ds, strategy, global_batch_size=batch)
    if args.arm == "tf_default":
        train = strategy.experimental_distribute_dataset(train)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _models.mlp(64, 256, 256, 10)
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = _models.StepTimer(args.warmup)
    model.fit(train, epochs=1, verbose=0, callbacks=[timer],
              steps_per_epoch=steps if args.arm == "repeated" else None)
    if kd.is_chief():
        with open(args.out, "w") as f:
            json.dump({"seconds_per_step": timer.seconds_per_step,
                       "steps": timer.steps}, f)


def main(full: bool = False) -> dict:
    from benchmarks import common

    workers = int(os.environ.get("KERASDIST_INPUT_WORKERS", "4"))
    rounds, steps, warmup = (9, 300, 30) if full else (5, 200, 20)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    start = time.time()
    for i in range(rounds):
        order = ARMS[i % 3:] + ARMS[:i % 3]  # rotate who goes first
        for arm in order:
            result = common.run_worker_script(
                __file__, ["--arm", arm, "--steps", str(steps),
                           "--warmup", str(warmup)],
                num_workers=workers, timeout=900)
            times[arm].append(result["seconds_per_step"])
    base = times["kerasdist"]
    default = common.ratio_stats(
        [t / k for t, k in zip(times["tf_default"], base, strict=True)])
    repeated = common.ratio_stats(
        [t / k for t, k in zip(times["repeated"], base, strict=True)])
    return {
        "ratio": default,
        "repeated_ratio": repeated,
        "seconds_per_step": times,
        "target": ">= 1.0 (kerasdist no slower than tf.distribute's "
                  "default input)",
        "meets_target": default["median"] >= 1.0,
        "measured": (
            "seconds per step, tf_default ÷ kerasdist and repeated ÷ "
            "kerasdist, per round (arms in rotating order)"
        ),
        "wall_seconds": round(time.time() - start, 1),
        "environment": common.environment(
            workers=workers, model="MLP 64-256-256-10, Adam",
            global_batch_size=64, timed_steps=steps, warmup_steps=warmup,
            threads_per_worker="intra-op 1, inter-op 1",
            transport="gRPC on 127.0.0.1, RING"),
    }


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.path.insert(0, os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        _worker(sys.argv[1:])

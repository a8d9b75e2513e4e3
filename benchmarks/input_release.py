"""input_release: epochs of a finite dataset across workers, and what Keras's
dropped iterators cost.

Keras's `fit` on a dataset that ends makes a new distributed iterator each
epoch and drops the old one. Destroying it stops tf.data's autotuning
thread, whose wake-up TensorFlow can lose (`CancellationManager::
StartCancel` runs its callbacks before marking itself cancelled): the
destructor then waits out the rest of the thread's period, up to 60 s, and
every other worker waits for that one in the next step's collective.
kerasdist destroys the pipelines of the iterators Keras drops on a thread
of their own (`kerasdist/strategies.py`, `_release_pipelines_off_thread`).
Two arms, each a real `kd.MultiWorkerMirroredStrategy` job of N workers on
127.0.0.1 (one intra-op and one inter-op thread each, the MLP and input of
`input_collectives`), several epochs of a finite dataset, run one after
another in alternating order each round:

- `kerasdist`: `fit(kd.data.distribute(ds, ...), epochs=E)` as users write
  it;
- `inline`: the same, with the dropped iterators destroyed where Keras
  drops them (TensorFlow's behaviour; kerasdist's release turned off).

Timed on the chief: from the first step's end to the last step's end
(every epoch boundary but none of start-up or the end of `fit`). Reported:
per-round ratio `inline ÷ kerasdist` of that time (median, min, max), and
each run's seconds and longest step (an epoch boundary's pause).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ARMS = ("kerasdist", "inline")


def _worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--arm", choices=ARMS, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--steps_per_epoch", type=int, required=True)
    args = parser.parse_args(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    import kerasdist as kd
    from benchmarks import _models

    if args.arm == "inline":
        from kerasdist import strategies

        # TensorFlow's own behaviour: no release off thread.
        strategies._release_pipelines_off_thread = lambda dist: dist  # noqa: SLF001

    strategy = kd.get_strategy("multi_worker")
    batch = 64
    ds = tf.data.Dataset.range(batch * args.steps_per_epoch)
    ds = ds.map(_models.example).cache()
    ds = ds.shuffle(batch * args.steps_per_epoch, seed=1)
    train = kd.data.distribute(ds, strategy, global_batch_size=batch)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _models.mlp(64, 256, 256, 10)
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ends: list[float] = []
    ends_callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: ends.append(
            time.perf_counter()))
    model.fit(train, epochs=args.epochs, verbose=0, callbacks=[ends_callback])
    if kd.is_chief():
        gaps = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
        with open(args.out, "w") as f:
            json.dump({"seconds": ends[-1] - ends[0], "steps": len(gaps),
                       "longest_step": max(gaps)}, f)


def main(full: bool = False) -> dict:
    from benchmarks import common

    workers = int(os.environ.get("KERASDIST_RELEASE_WORKERS", "8"))
    rounds, epochs, steps = (9, 8, 50) if full else (5, 8, 50)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    start = time.time()
    for i in range(rounds):
        order = ARMS if i % 2 == 0 else ARMS[::-1]
        for arm in order:
            runs[arm].append(common.run_worker_script(
                __file__, ["--arm", arm, "--epochs", str(epochs),
                           "--steps_per_epoch", str(steps)],
                num_workers=workers, timeout=1200))
    ratio = common.ratio_stats([
        inline["seconds"] / ours["seconds"]
        for inline, ours in zip(runs["inline"], runs["kerasdist"],
                                strict=True)])
    return {
        "ratio": ratio,
        "runs": runs,
        "target": "> 1.0 (kerasdist's epochs no slower than TensorFlow's "
                  "inline teardown)",
        "meets_target": ratio["median"] > 1.0,
        "measured": (
            "seconds from the first step's end to the last step's end on "
            "the chief, inline ÷ kerasdist, per round (arms alternating)"
        ),
        "wall_seconds": round(time.time() - start, 1),
        "environment": common.environment(
            workers=workers, model="MLP 64-256-256-10, Adam",
            global_batch_size=64, epochs=epochs, steps_per_epoch=steps,
            threads_per_worker="intra-op 1, inter-op 1",
            transport="gRPC on 127.0.0.1, RING"),
    }


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.path.insert(0, os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        _worker(sys.argv[1:])

"""checkpoint_overhead: training time with a backup every K steps, divided by
training time without, for kd.callbacks.BackupAndRestore and, side by side,
keras.callbacks.BackupAndRestore at the same save_freq.

One process, no strategy, an MLP 784-512-512-10 with Adam (~0.67 M
parameters; weights plus optimizer state ~8 MB per backup), global batch
256, 3 epochs of 100 steps, save_freq=100 (the lower end of what
docs/guide/fault_tolerance.md recommends: a backup every 100 steps or more).
Each round times the three variants back to back in rotating order, on the
same already-traced model, each with a fresh backup directory. Besides the
wall-time ratios (the protocol's), the result has the process CPU-time
ratios and the time spent inside the saves divided by the plain run's time,
which are less sensitive to a busy machine.
Target: <= 1.035 (CheckFreq), and below Keras's ratio.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

from benchmarks import common

SAVE_FREQ = 100
STEPS = 100
EPOCHS = 3
BATCH = 256
TARGET = 1.035


def _setup():
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks import _models

    rng = np.random.RandomState(0)
    x = rng.normal(size=(BATCH * STEPS, 784)).astype("float32")
    y = rng.randint(0, 10, BATCH * STEPS)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache()
    model = _models.mlp(784, 512, 512, 10)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds, epochs=1, verbose=0)  # Warm-up: tracing, cache fill.
    return model, ds


def main(full: bool = False) -> dict:
    import keras

    import kerasdist as kd

    model, ds = _setup()

    cpu = {"none": [], "kerasdist": [], "keras": []}
    saving = {"kerasdist": [], "keras": []}

    def timed(name) -> float:
        backup_dir = tempfile.mkdtemp(prefix="kd-ckpt-bench-")
        callbacks = []
        spent = [0.0]
        if variants[name]:
            cb = variants[name](backup_dir)
            # Time spent writing backups, to separate it from machine noise.
            attr = "_save" if name == "kerasdist" else "_save_model"
            save = getattr(cb, attr)

            def timed_save(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return save(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - t

            setattr(cb, attr, timed_save)
            callbacks = [cb]
        try:
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(ds, epochs=EPOCHS, verbose=0, callbacks=callbacks)
            elapsed = time.perf_counter() - start
            cpu[name].append(time.process_time() - start_cpu)
            if name in saving:
                saving[name].append(spent[0])
            return elapsed
        finally:
            shutil.rmtree(backup_dir, ignore_errors=True)

    variants = {
        "none": None,
        "kerasdist": lambda d: kd.callbacks.BackupAndRestore(
            d, save_freq=SAVE_FREQ),
        "keras": lambda d: keras.callbacks.BackupAndRestore(
            d, save_freq=SAVE_FREQ),
    }
    names = list(variants)
    times = {n: [] for n in names}
    rounds = 10 if full else 5
    for r in range(rounds):
        order = names[r % 3:] + names[:r % 3]  # Rotate who goes first.
        for name in order:
            times[name].append(timed(name))
    ours = [k / n for k, n in zip(times["kerasdist"], times["none"],
                                  strict=True)]
    theirs = [k / n for k, n in zip(times["keras"], times["none"],
                                    strict=True)]
    cpu_ratio = {
        n: common.ratio_stats([c / b for c, b in zip(
            cpu[n], cpu["none"], strict=True)])["median"]
        for n in ("kerasdist", "keras")
    }
    # Wall time of the saves over the plain run's wall time: the overhead
    # with the machine's noise taken out.
    save_ratio = {
        n: 1 + statistics.median(saving[n]) / statistics.median(times["none"])
        for n in saving
    }
    stats = common.ratio_stats(ours)
    keras_stats = common.ratio_stats(theirs)
    return {
        "name": "checkpoint_overhead",
        "ratio": stats,
        "keras_ratio": keras_stats,
        "kerasdist_over_keras_overhead": (stats["median"] - 1) / max(
            keras_stats["median"] - 1, 1e-9),
        "target": f"<= {TARGET} and below keras.callbacks.BackupAndRestore",
        "meets_target": stats["median"] <= TARGET
        and stats["median"] < keras_stats["median"],
        "cpu_time_ratio_median": cpu_ratio,
        "save_time_ratio": save_ratio,
        "save_seconds_per_run": saving,
        "seconds": {n: t for n, t in times.items()},
        "median_step_ms": {
            n: 1000 * statistics.median(t) / (EPOCHS * STEPS)
            for n, t in times.items()
        },
        "environment": common.environment(
            model="MLP 784-512-512-10, Adam", batch=BATCH,
            steps=EPOCHS * STEPS, save_freq=SAVE_FREQ, strategy="none"),
    }


if __name__ == "__main__":
    print(main())

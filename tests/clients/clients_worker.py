"""One worker of the client-pattern tests, run by `kerasdist-run`.

    kerasdist-run --num_workers 2 -- python clients_worker.py OUT all
    python clients_worker.py OUT after_startup    (TF_CONFIG set by the test)

`all` runs every pattern of `patterns.py` and every multi-worker check
under one `kd.get_strategy("multi_worker")` per call (the process's
strategy is handed back each time), and writes `NAME-workerRANK.npz` /
`checks-workerRANK.json` into OUT. A check that must fail records the
exception's type and message.
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (recording the user's view)
        return {"type": type(e).__name__, "message": str(e)}
    return None


def after_startup(out):
    import tensorflow as tf

    import kerasdist as kd

    tf.constant(1.0) + 1.0  # Any TF op before the strategy.
    error = _error(lambda: kd.get_strategy("multi_worker"))
    with open(os.path.join(out, "after_startup.json"), "w") as f:
        json.dump(error, f)


def main(out):
    import keras
    import patterns
    import tensorflow as tf

    import kerasdist as kd

    def strategy():
        # Called again for each pattern, as a script's `run_training()`.
        return kd.get_strategy("multi_worker", timeout_seconds=120)

    first = strategy()
    rank = kd.cluster.from_env().worker_rank
    checks = {"same_strategy": strategy() is first}

    def save(name, result):
        np.savez(os.path.join(out, f"{name}-worker{rank}.npz"), **result)

    for name, fn in {**patterns.EXACT, **patterns.WORKERS_ONLY}.items():
        save(name, fn(strategy()))

    # Issue 14.1: an unscaled custom train_step is warned about.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save("hand_loss_unscaled", patterns.hand_loss(strategy(),
                                                      scale=False))
    checks["unscaled_warnings"] = [str(w.message) for w in caught
                                   if "train_step" in str(w.message)]
    # Issue 14.4 and the GAN's unbuilt optimizers.
    checks["unbuilt_loop"] = _error(
        lambda: patterns.unbuilt_optimizer_loop(strategy()))
    checks["gan_unbuilt"] = _error(
        lambda: patterns.gan(strategy(), build=False))

    # Issue 16.1: uneven global batches.
    for case in patterns.UNEVEN:
        checks[f"uneven_{case}"] = _error(
            lambda case=case: patterns.uneven(strategy(), case))
    for case in patterns.EVEN:
        save(f"even_{case}", patterns.uneven(strategy(), case))

    # Issue 23.7: an unseeded shuffle under DATA sharding is warned of.
    for seed in (None, 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patterns.shuffled_fit(strategy(), seed)
        checks[f"shuffle_warnings_seed_{seed}"] = [
            str(w.message) for w in caught
            if "shuffles without a seed" in str(w.message)]

    # Issue 23.7: BackupAndRestore refuses a resume it cannot make exact.
    for seed in (None, 1):
        backup = kd.callbacks.BackupAndRestore(
            os.path.join(out, f"backup_shuffle_{seed}"))
        checks[f"backup_shuffle_seed_{seed}"] = _error(
            lambda backup=backup, seed=seed: patterns.shuffled_fit(
                strategy(), seed, callbacks=[backup]))
    # Issue 23.3: each replica draws its own random numbers.
    save("random_streams", patterns.random_streams(strategy()))

    # Issue 16.3: jit_compile=True on CPU falls back with a warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save("jit", patterns.jit(strategy()))
    checks["jit_warnings"] = [str(w.message) for w in caught
                              if "jit_compile" in str(w.message)]

    # Issue 14.2: Keras's file callbacks, unchanged.
    files_dir = os.path.join(out, "files")
    save("file_callbacks", patterns.file_callbacks(strategy(), files_dir))
    checks["keras_backup"] = _error(lambda: patterns.keras_backup(
        strategy(), os.path.join(out, "keras_backup")))

    # Issue 15.2: the keras.io guide calls run_training() twice.
    ckpt = os.path.join(out, "guide_ckpt")
    os.makedirs(ckpt, exist_ok=True)
    first_run = patterns.run_training(strategy, ckpt, epochs=1)
    # Readers of a file the chief writes wait for it (see the guide).
    first.reduce("SUM", first.run(lambda: tf.constant(1.0)), axis=None)
    second_run = patterns.run_training(strategy, ckpt, epochs=1)
    save("guide_first", first_run)
    save("guide_second", second_run)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": ["127.0.0.1:1", "127.0.0.1:2"]}),
        task_type="worker", task_id=rank)
    checks["other_cluster"] = _error(
        lambda: kd.MultiWorkerMirroredStrategy(cluster_resolver=resolver))
    checks["keras_version"] = keras.__version__
    with open(os.path.join(out, f"checks-worker{rank}.json"), "w") as f:
        json.dump(checks, f, indent=1)


if __name__ == "__main__":
    if sys.argv[2] == "after_startup":
        after_startup(sys.argv[1])
    else:
        main(sys.argv[1])

"""One process of the peer_step_time benchmark; serves timing requests.

Run as a script (the JAX role runs in its own venv without TensorFlow or
kerasdist, so this file imports neither at module level):

    python benchmarks/_peer_worker.py ROLE

ROLE is one of:
- `kd_mwms`: Keras 3 + `kd.MultiWorkerMirroredStrategy` (TF_CONFIG set);
- `tfkeras_mwms`: tf_keras (`TF_USE_LEGACY_KERAS=1`) +
  `tf.distribute.MultiWorkerMirroredStrategy` (TF_CONFIG set);
- `keras3_single`, `tfkeras_single`: Keras 3 and tf_keras with no strategy
  in one process (one thread each, half the global batch, i.e. one worker's
  share): what each trainer costs without distribution. (Keras 3 with the
  plain TF strategy is no option: its `fit` fails on `PerReplica` inputs,
  the bug kerasdist works around.)
- `kd_mirrored`: Keras 3 + `kd.MirroredStrategy` over 2 virtual CPUs;
- `jax_dp`: Keras 3 on JAX, `keras.distribution.DataParallel` over the host
  devices (XLA_FLAGS=--xla_force_host_platform_device_count=2).

Every role builds the same convnet (the one in `benchmarks/_models.py`,
written against whichever Keras the role uses), the same 512 random 32x32x3
images and labels (seed 0), SGD with momentum, sparse cross-entropy and an
accuracy metric, and the same global batch. Each stdin line `{"steps": N}`
runs one `fit` of WARMUP + N steps and answers `RESULT {"seconds": s}`, the
wall time per step of the last N steps (the warm-up steps and `fit`'s own
set-up are excluded).
"""

import json
import os
import sys
import time

PREFIX = "RESULT "
N_EXAMPLES = 512


def _set_threads(tf, intra: int, inter: int) -> None:
    # Must run before TensorFlow initialises its devices.
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)


def _convnet(keras, width: int, num_classes: int = 10):
    """Same layers as `benchmarks._models.convnet`, for any Keras module."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(width, 3, padding="same", activation="relu"),
        layers.Conv2D(width, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(2 * width, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.GlobalAveragePooling2D(),
        layers.Dense(num_classes),
    ])


def _compile(keras, model):
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _arrays():
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.uniform(size=(N_EXAMPLES, 32, 32, 3)).astype("float32")
    y = rng.randint(0, 10, N_EXAMPLES).astype("int64")
    return x, y


def _timer(keras, warmup: int):
    """A callback timing the steps after `warmup` (syncing at both ends)."""

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.start = self.end = self.last_logs = None
            self.seen = self.steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen == warmup:
                float(logs["loss"])  # wait for the step (JAX is async)
                self.start = time.perf_counter()
            elif self.seen > warmup:
                self.steps += 1
                self.last_logs = logs

        def on_train_end(self, logs=None):
            float(self.last_logs["loss"])
            self.end = time.perf_counter()

        @property
        def seconds_per_step(self):
            return (self.end - self.start) / self.steps

    return StepTimer()


def _tf_fitter(role: str, width: int, global_batch: int, warmup: int):
    import tensorflow as tf

    if role != "kd_mirrored":
        _set_threads(tf, 1, 1)  # 2 workers on 2 cores: one core each
    x, y = _arrays()
    if role.endswith("_single"):
        # One worker's share of the global batch, no strategy.
        global_batch //= 2
    if role.startswith("tfkeras_") or role == "keras3_single":
        if role.startswith("tfkeras_"):
            keras = tf.keras  # tf_keras under TF_USE_LEGACY_KERAS=1
            if not keras.layers.Dense.__module__.startswith("tf_keras"):
                raise RuntimeError(
                    f"tf.keras is {keras.layers.Dense.__module__}, not "
                    "tf_keras; set TF_USE_LEGACY_KERAS=1 and pip install "
                    "tf_keras"
                )
        else:
            import keras
        strategy = (
            tf.distribute.get_strategy() if role.endswith("_single")
            else tf.distribute.MultiWorkerMirroredStrategy()
        )
        # What kd.data.distribute does, written out as a tf_keras user would.
        ds = tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()
        ds = ds.batch(global_batch)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        ds = ds.with_options(options).prefetch(tf.data.AUTOTUNE)
    else:
        import keras

        import kerasdist as kd

        if role == "kd_mirrored":
            kd.virtual_cpus(2)
            strategy = kd.MirroredStrategy(["/cpu:0", "/cpu:1"])
        else:
            strategy = kd.MultiWorkerMirroredStrategy()
        ds = tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()
        ds = kd.data.distribute(ds, strategy, global_batch_size=global_batch)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _compile(keras, _convnet(keras, width))

    def fit(steps: int) -> float:
        timer = _timer(keras, warmup)
        model.fit(ds, epochs=1, steps_per_epoch=warmup + steps, verbose=0,
                  callbacks=[timer])
        return timer.seconds_per_step

    return fit


def _jax_fitter(width: int, global_batch: int, warmup: int):
    os.environ["KERAS_BACKEND"] = "jax"
    import keras
    import numpy as np

    devices = keras.distribution.list_devices("cpu")
    if len(devices) != 2:
        raise RuntimeError(
            f"expected 2 host devices, got {devices}; set XLA_FLAGS="
            "--xla_force_host_platform_device_count=2"
        )
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    keras.utils.set_random_seed(0)
    model = _compile(keras, _convnet(keras, width))
    x, y = _arrays()
    cache = {}

    def fit(steps: int) -> float:
        n = (warmup + steps) * global_batch
        if n not in cache:  # the 512 examples repeated, in order
            reps = -(-n // N_EXAMPLES)
            cache[n] = (np.concatenate([x] * reps)[:n],
                        np.concatenate([y] * reps)[:n])
        timer = _timer(keras, warmup)
        model.fit(*cache[n], batch_size=global_batch, epochs=1,
                  shuffle=False, verbose=0, callbacks=[timer])
        return timer.seconds_per_step

    return fit


def main(role: str, width: int, global_batch: int, warmup: int) -> None:
    if role == "jax_dp":
        fit = _jax_fitter(width, global_batch, warmup)
    else:
        fit = _tf_fitter(role, width, global_batch, warmup)
    print(PREFIX + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        seconds = fit(request["steps"])
        print(PREFIX + json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:5]))

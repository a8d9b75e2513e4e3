"""Worker script for the model-parallel-across-workers tests.

    kerasdist-run --num_workers 3 -- python tests/placement_worker.py \\
        --out DIR --scenarios pipeline,place,functional

Every worker calls `kd.placement.join_cluster()`; workers 1 and 2 serve,
the chief trains each scenario with its stages on workers 1 and 2 and
writes `DIR/<scenario>.npz` (final weights, in `model.get_weights()` order)
and `DIR/<scenario>.json` (the device of every model and optimizer
variable, the evaluation loss, the sum of the predictions).

With `--backup DIR2` the scenario trains under
`kd.callbacks.BackupAndRestore(DIR2, save_freq=2)`; `--kill chief|stage`
makes the chief, on the first attempt, SIGKILL itself or worker 2 at step
`KILL_STEP`, after a backup.

The tests import this module for `build`, `data` and `reference` (the
unsplit model trained in one process).
"""

import argparse
import json
import os
import signal
import sys

import numpy as np

EPOCHS = 2
BATCH = 16
SAMPLES = 64
KILL_STEP = 5
SCENARIOS = ("pipeline", "place", "functional")


def data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(SAMPLES, 8)).astype("float32")
    y = rng.normal(size=(SAMPLES, 4)).astype("float32")
    return x, y


def build(scenario):
    """(model, optimizer, num_microbatches) of a scenario."""
    import keras

    keras.utils.set_random_seed(1)
    layers = keras.layers
    if scenario == "functional":
        inputs = keras.Input((8,))
        a = layers.Dense(16, activation="relu", name="a")(inputs)
        b = layers.Dense(16, activation="relu", name="b")(a)
        c = layers.Dense(16, activation="relu", name="c")(b)
        d = layers.Dense(4, name="d")(layers.Add(name="skip")([a, c]))
        model = keras.Model(inputs, d, name="skip_model")
        return model, keras.optimizers.Adam(1e-2, epsilon=1e-3), 2
    if scenario == "place":
        model = keras.Sequential([
            keras.Input((8,)),
            layers.Dense(16, activation="relu", name="d0"),
            layers.BatchNormalization(name="bn"),
            layers.Dense(16, activation="relu", name="d1"),
            layers.Dropout(0.25, seed=3, name="drop"),
            layers.Dense(16, activation="relu", name="d2"),
            layers.Dense(4, name="d3"),
        ], name="placed_mlp")
        opt = keras.optimizers.SGD(0.05, momentum=0.9, clipvalue=0.5)
        return model, opt, 1
    model = keras.Sequential([
        keras.Input((8,)),
        layers.Dense(16, activation="relu", name="d0"),
        layers.Dense(16, activation="relu", name="d1"),
        layers.Dense(16, activation="relu", name="d2"),
        layers.Dense(4, name="d3"),
    ], name="mlp")
    return model, keras.optimizers.Adam(1e-2, epsilon=1e-3, clipnorm=1.0), 4


def reference(scenario):
    """Final weights of the unsplit model trained in this process."""
    model, opt, _ = build(scenario)
    model.compile(optimizer=opt, loss="mse")
    x, y = data()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
              verbose=0)
    return model.get_weights()


def _device_table(pipe):
    import tensorflow as tf

    def short(v):
        spec = tf.DeviceSpec.from_string(v.value.device)
        return f"/job:{spec.job}/task:{spec.task}"

    return {
        "model": {v.path: short(v) for v in pipe.inner_model.variables},
        "optimizer": {v.path: short(v) for v in pipe.optimizer.variables},
        "slots": {
            v.path: [short(s) for s in slots]
            for v, slots in _slots(pipe.optimizer, pipe.trainable_variables)
        },
    }


def _slots(optimizer, variables):
    """(variable, its slot variables) pairs, by Keras's slot naming."""
    out = []
    for v in variables:
        key = v.path.replace("/", "_")
        out.append((v, [
            s for s in optimizer.variables if s.path.split("/")[-1]
            .startswith(key + "_")
        ]))
    return out


class _Killer:
    """On the first attempt, SIGKILLs a process at step KILL_STEP."""

    def __init__(self, target, pids):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(cb, batch, logs=None):
                self.step += 1
                if self.step == KILL_STEP:
                    os.kill(pids[target], signal.SIGKILL)

        self.step = 0
        self.callback = Callback()


def run(scenario, devices, args):
    import keras

    import kerasdist as kd

    model, opt, m = build(scenario)
    pipe = kd.placement.PipelineModel(
        model, devices[1:3], num_microbatches=m
    )
    pipe.compile(optimizer=opt, loss="mse")
    x, y = data()
    callbacks = []
    if args.backup:
        callbacks.append(
            kd.callbacks.BackupAndRestore(args.backup, save_freq=2)
        )
    first = os.environ.get("KERASDIST_RESTART_COUNT", "0") == "0"
    if args.kill and first:
        pids = {"chief": os.getpid(), "stage": args.stage_pid()}
        callbacks.append(_Killer(args.kill, pids).callback)
    pipe.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
             verbose=0, callbacks=callbacks)
    loss = pipe.evaluate(x, y, batch_size=BATCH, verbose=0)
    pred = pipe.predict(x, batch_size=BATCH, verbose=0)
    np.savez(os.path.join(args.out, f"{scenario}.npz"), *model.get_weights())
    result = {
        "devices": devices,
        "placement": _device_table(pipe),
        "eval_loss": float(loss),
        "pred_sum": float(np.sum(pred)),
        "attempt": int(os.environ.get("KERASDIST_RESTART_COUNT", "0")),
    }
    with open(os.path.join(args.out, f"{scenario}.json"), "w") as f:
        json.dump(result, f, indent=1)
    keras.backend.clear_session()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--backup", default="")
    parser.add_argument("--kill", choices=("chief", "stage"), default=None)
    args = parser.parse_args()
    # Every worker writes its pid, so the chief can SIGKILL a stage.
    rank = os.environ.get("KERASDIST_WORKER_INDEX", "0")
    with open(os.path.join(args.out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))

    def stage_pid():
        with open(os.path.join(args.out, "pid-2")) as f:
            return int(f.read())

    args.stage_pid = stage_pid

    import kerasdist as kd

    devices = kd.placement.join_cluster()  # Workers 1 and 2 stay here.
    try:
        kd.placement.join_cluster()
        second = "no error"
    except RuntimeError as e:
        second = str(e)
    with open(os.path.join(args.out, "second_call.txt"), "w") as f:
        f.write(second)
    for scenario in args.scenarios.split(","):
        run(scenario, devices, args)


if __name__ == "__main__":
    sys.exit(main())

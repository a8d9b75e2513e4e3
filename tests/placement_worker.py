"""Worker script for the model-parallel-across-workers tests.

    kerasdist-run --num_workers 3 -- python tests/placement_worker.py \\
        --out DIR --scenarios pipeline,place,functional

Every worker calls `kd.placement.join_cluster()`; workers 1 and 2 serve,
the chief trains each scenario with its stages on workers 1 and 2 and
writes `DIR/<scenario>.npz` (final weights, in `model.get_weights()` order)
and `DIR/<scenario>.json` (the device of every model and optimizer
variable, the evaluation loss, the sum of the predictions, the workers'
addresses and the source `kd.cluster.resolve()` found them in).

Scenario `hybrid` (5 workers): the chief trains 2 pipeline replicas × 2
stages on workers 1-4 under BackupAndRestore(`--backup`), stops it at step
`KILL_STEP`, and resumes it in a new model (`DIR/hybrid.json`, `.npz`).

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
    if scenario == "hybrid":  # 2 replicas × 2 micro-batches of 4
        model, opt, _ = build("pipeline")
        return model, opt, 2
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


def assert_on_stage_workers(table, stages=("1", "2")):
    """Asserts a `_device_table`: every model variable on a stage worker,
    the optimizer's variables too, each slot beside its variable; none on
    the chief (task 0)."""
    stage_workers = {f"/job:worker/task:{i}" for i in stages}
    assert set(table["model"].values()) == stage_workers, table["model"]
    assert set(table["optimizer"].values()) <= stage_workers, table
    for path, slots in table["slots"].items():
        assert slots, f"no optimizer slot found for {path}"
        assert set(slots) == {table["model"][path]}, (path, slots)


def _short(v):
    import tensorflow as tf

    spec = tf.DeviceSpec.from_string(v.value.device)
    return f"/job:{spec.job}/task:{spec.task}"


def _device_table(pipe, slots=None):
    """Devices of `pipe`'s model variables, optimizer variables and slots.

    `slots`: id(variable) -> its slots; default `_slots(pipe)`.
    """
    slots = _slots(pipe) if slots is None else slots
    variables = pipe.inner_model.trainable_variables
    optimizer = getattr(pipe, "optimizer", None)  # None: a hybrid's copy
    return {
        "model": {v.path: _short(v) for v in pipe.inner_model.variables},
        "optimizer": {
            v.path: _short(v) for v in optimizer.variables
        } if optimizer else {},
        "slots": {v.path: [_short(s) for s in slots[id(v)]] for v in variables},
    }


def _slots(model):
    """id(variable) -> its slot variables, for every trainable variable.

    Keras builds the slots variable by variable, in `trainable_variables`
    order, each named `<variable path>_<slot>` (names checked here: a
    hybrid model's replicas have equal paths, so names alone cannot tell).
    """
    variables = model.trainable_variables
    slots = [
        s for s in model.optimizer.variables
        if any(s.path.split("/")[-1].startswith(_key(v) + "_")
               for v in variables)
    ]
    n = len(slots) // len(variables)
    out = {}
    for i, v in enumerate(variables):
        mine = slots[i * n:(i + 1) * n]
        assert all(
            s.path.split("/")[-1].startswith(_key(v) + "_") for s in mine
        ), (v.path, [s.path for s in mine])
        out[id(v)] = mine
    return out


def _key(variable):
    return variable.path.replace("/", "_")


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


def _addresses():
    """The workers' addresses in the cluster this chief joined."""
    return json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]


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
        "addresses": _addresses(),
        "source": kd.cluster.resolve().source,
    }
    with open(os.path.join(args.out, f"{scenario}.json"), "w") as f:
        json.dump(result, f, indent=1)
    keras.backend.clear_session()


class _Interrupt(Exception):
    """Ends the first hybrid `fit` at step KILL_STEP, after a backup."""


def _hybrid_fit(devices, args, resume):
    """Builds, compiles and fits the 2 × 2 hybrid model.

    Without `resume`, `fit` ends at step KILL_STEP (after the backup of
    step KILL_STEP - 1); with it, the weights start from zeros and
    BackupAndRestore must restore them and train the remaining steps.

    Returns:
        (hybrid model, number of training steps it ran).
    """
    import keras

    import kerasdist as kd

    model, opt, m = build("hybrid")
    if resume:
        model.set_weights([0 * w for w in model.get_weights()])
    hybrid = kd.placement.HybridPipelineModel(
        model, [devices[1:3], devices[3:5]], num_microbatches=m
    )
    hybrid.compile(optimizer=opt, loss="mse")
    steps = []

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(cb, batch, logs=None):
            steps.append(batch)
            if not resume and len(steps) == KILL_STEP:
                raise _Interrupt

    x, y = data()
    backup = kd.callbacks.BackupAndRestore(args.backup, save_freq=2)
    try:
        hybrid.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                   verbose=0, callbacks=[backup, Steps()])
    except _Interrupt:
        pass
    return hybrid, len(steps)


def run_hybrid(devices, args):
    """2 replicas × 2 stages on workers 1-4; interrupted, then resumed."""
    import keras

    import kerasdist as kd

    _, first_steps = _hybrid_fit(devices, args, resume=False)
    hybrid, steps = _hybrid_fit(devices, args, resume=True)
    x, y = data()
    loss = hybrid.evaluate(x, y, batch_size=BATCH, verbose=0)
    pred = hybrid.predict(x, batch_size=BATCH, verbose=0)
    try:
        hybrid.fit(x, y, batch_size=6, epochs=1, verbose=0)
        bad_batch = "no error"
    except ValueError as e:
        bad_batch = str(e)
    # A time-balanced plan over two stage workers measures their link.
    timed = kd.placement.plan(hybrid.inner_model, 2, cost="time",
                              devices=devices[1:3], batch_size=BATCH)
    pipes = hybrid.pipelines()
    copies = [p.inner_model for p in pipes]
    slots = _slots(hybrid)
    np.savez(os.path.join(args.out, "hybrid.npz"), *copies[0].get_weights())
    np.savez(os.path.join(args.out, "hybrid_copy.npz"),
             *copies[1].get_weights())
    result = {
        "devices": hybrid.device_grid,
        "placement": [_device_table(p, slots) for p in pipes],
        "optimizer": sorted({_short(v) for v in hybrid.optimizer.variables}),
        "eval_loss": float(loss),
        "pred_sum": float(np.sum(pred)),
        "steps": [first_steps, steps],
        "addresses": _addresses(),
        "bad_batch": bad_batch,
        "timed_plan": str(timed),
        "bandwidth": timed.bandwidth,
    }
    with open(os.path.join(args.out, "hybrid.json"), "w") as f:
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
    rank = os.environ.get(
        "KERASDIST_WORKER_INDEX", os.environ.get("SLURM_PROCID", "0"))
    with open(os.path.join(args.out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))

    def stage_pid():
        with open(os.path.join(args.out, "pid-2")) as f:
            return int(f.read())

    args.stage_pid = stage_pid

    from absl import logging

    import kerasdist as kd

    # kerasdist's INFO lines show: a server says where it serves and why it
    # exits (the tests read them, with the launcher's host prefix).
    logging.set_verbosity(logging.INFO)
    devices = kd.placement.join_cluster()  # Workers 1 and 2 stay here.
    try:
        kd.placement.join_cluster()
        second = "no error"
    except RuntimeError as e:
        second = str(e)
    with open(os.path.join(args.out, "second_call.txt"), "w") as f:
        f.write(second)
    for scenario in args.scenarios.split(","):
        if scenario == "hybrid":
            run_hybrid(devices, args)
        else:
            run(scenario, devices, args)


if __name__ == "__main__":
    sys.exit(main())

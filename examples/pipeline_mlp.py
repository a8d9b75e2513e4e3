"""Pipeline-parallel training of an MLP split across devices (GPipe-style).

Prints the placement plan (layers, parameters and memory per stage), then
trains a `kd.placement.PipelineModel` with `fit` and evaluates it:

    python examples/pipeline_mlp.py --num_virtual_cpus=2
    python examples/pipeline_mlp.py --num_virtual_cpus=4 --num_stages=4 \\
        --num_microbatches=8 --recompute

On a machine with GPUs, leave `--num_virtual_cpus` at 0: the stages then go
to the first `--num_stages` GPUs. The data is generated (10 Gaussian
clusters in 32 dimensions), so nothing is downloaded.
"""

import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("num_virtual_cpus", 0, "Split the CPU into N devices.")
flags.DEFINE_integer("num_stages", 2, "Pipeline stages (one per device).")
flags.DEFINE_integer("num_microbatches", 4, "Micro-batches per batch.")
flags.DEFINE_integer("batch_size", 64, "Examples per training step.")
flags.DEFINE_integer("epochs", 3, "Training epochs.")
flags.DEFINE_integer("hidden", 256, "Width of the hidden layers.")
flags.DEFINE_integer("depth", 4, "Number of hidden layers.")
flags.DEFINE_bool("recompute", False, "Recompute activations in backward.")
flags.DEFINE_integer("seed", 1, "Random seed (data and weights).")
FLAGS = flags.FLAGS


def make_data(n, centers, rng):
    """Examples drawn around one of the given class centres."""
    y = rng.randint(0, len(centers), n)
    x = centers[y] + rng.normal(0, 1.0, (n, centers.shape[1]))
    return x.astype("float32"), y.astype("int64")


def make_datasets(num_examples):
    """(train, test) pairs of generated examples; seeds the weights too."""
    import keras

    keras.utils.set_random_seed(FLAGS.seed)
    rng = np.random.RandomState(FLAGS.seed)
    centers = rng.normal(0, 0.6, (10, 32))  # overlapping clusters
    return (
        make_data(num_examples, centers, rng), make_data(1024, centers, rng)
    )


def build_pipeline(devices):
    """The MLP, its printed plan over `devices`, and the compiled pipeline.

    Also used by pipeline_across_workers.py, with other workers' devices.
    """
    import keras

    import kerasdist as kd

    model = keras.Sequential(
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
    plan = kd.placement.plan(
        model,
        len(devices),
        devices=devices,
        batch_size=FLAGS.batch_size,
        num_microbatches=FLAGS.num_microbatches,
        optimizer="adam",
    )
    print(plan, flush=True)
    pipe = kd.placement.PipelineModel(
        model,
        devices,
        num_microbatches=FLAGS.num_microbatches,
        plan=plan,
        recompute=FLAGS.recompute,
    )
    pipe.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model, plan, pipe


def main(argv):
    del argv
    import kerasdist as kd

    if FLAGS.num_virtual_cpus:
        kd.virtual_cpus(FLAGS.num_virtual_cpus)
    devices = kd.devices.local_devices()[: FLAGS.num_stages]
    if len(devices) < FLAGS.num_stages:
        raise app.UsageError(
            f"--num_stages={FLAGS.num_stages} needs as many devices; found "
            f"{len(devices)}. Pass --num_virtual_cpus={FLAGS.num_stages}."
        )
    (x, y), (x_test, y_test) = make_datasets(4096)
    model, plan, pipe = build_pipeline(devices)
    start = time.time()
    pipe.fit(x, y, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, verbose=2)
    loss, acc = pipe.evaluate(x_test, y_test, verbose=0)
    where = sorted({w.value.device.split("device:")[-1] for w in model.weights})
    print(
        f"result: test accuracy {acc:.3f} (chance 0.100), loss {loss:.3f}; "
        f"{plan.num_stages} stages on {where}, {FLAGS.num_microbatches} "
        f"micro-batches of {FLAGS.batch_size // FLAGS.num_microbatches}, "
        f"recompute={FLAGS.recompute}, {time.time() - start:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)

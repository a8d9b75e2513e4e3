"""Federated averaging of a Keras model on Flower's simulation engine.

Each simulated client (a Flower SuperNode) keeps its own part of the data,
trains `--local_epochs` epochs per round and sends its weights back; the
Flower strategy (`--fl_strategy`: FedAvg, FedProx, FedAdam or kerasdist's
DiLoCo) combines them. The server evaluates the global model after every
round. `--label_skew` gives each client mostly two classes (non-IID).

    python examples/federated.py --num_clients=4 --rounds=5
    python examples/federated.py --fl_strategy=diloco --label_skew

For a real deployment the same `client_app`/`server_app` run under
`flower-superlink` and `flower-supernode` (see docs/guide/communication.md).
Data: `--dataset=synthetic` (default) or `--dataset=mnist` (`tfds.load`).
"""

import functools
import os

from absl import app, flags

flags.DEFINE_enum("dataset", "synthetic", ["synthetic", "mnist"], "Data.")
flags.DEFINE_string("data_dir", None, "tensorflow_datasets directory.")
flags.DEFINE_integer("num_examples", 4000, "Synthetic training examples.",
                     lower_bound=1)
flags.DEFINE_integer("num_clients", 4, "Simulated clients.", lower_bound=1)
flags.DEFINE_integer("rounds", 5, "Federated rounds.", lower_bound=1)
flags.DEFINE_integer("local_epochs", 1, "Client epochs per round.",
                     lower_bound=1)
flags.DEFINE_enum("fl_strategy", "fedavg",
                  ["fedavg", "fedprox", "fedadam", "diloco"],
                  "Flower strategy.")
flags.DEFINE_boolean("label_skew", False, "Non-IID: ~2 classes per client.")
flags.DEFINE_integer("seed", 0, "Random seed.")
FLAGS = flags.FLAGS


def load_arrays(dataset, data_dir, num_examples, seed):
    """(x_train, y_train, x_test, y_test) as float32 / int64 arrays."""
    import numpy as np
    from mnist_data import load_datasets

    train, test = load_datasets(dataset, data_dir, num_examples, seed)

    def arrays(ds):
        x, y = zip(*ds.as_numpy_iterator(), strict=True)
        x = np.stack(x).reshape(len(x), -1).astype("float32") / 255.0
        return x, np.asarray(y, dtype="int64")

    return (*arrays(train), *arrays(test))


def build_model():
    """A small MLP for 28x28 images, compiled."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28 * 28,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(
        keras.optimizers.SGD(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def client_data(partition_id, num_partitions, *, dataset, data_dir,
                num_examples, seed, label_skew):
    """This client's (train, validation) part of the training set."""
    import numpy as np

    x, y, _, _ = load_arrays(dataset, data_dir, num_examples, seed)
    if label_skew:
        # Sorted by label, then cut: each client sees ~2 classes.
        order = np.argsort(y, kind="stable")
    else:
        order = np.random.default_rng(seed).permutation(len(y))
    part = np.array_split(order, num_partitions)[partition_id]
    cut = int(len(part) * 0.9)
    return (x[part[:cut]], y[part[:cut]]), (x[part[cut:]], y[part[cut:]])


def main(argv):
    del argv
    # Flower's Ray workers import mnist_data from here.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p)
    from flwr.serverapp import strategy as fl

    from kerasdist.integrations import flower as kdf

    data_fn = functools.partial(
        client_data, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        num_examples=FLAGS.num_examples, seed=FLAGS.seed,
        label_skew=FLAGS.label_skew)
    _, _, x_test, y_test = load_arrays(
        FLAGS.dataset, FLAGS.data_dir, FLAGS.num_examples, FLAGS.seed)
    n = FLAGS.num_clients
    common = {"min_available_nodes": n, "min_train_nodes": n,
              "min_evaluate_nodes": n}
    strategy = {
        "fedavg": lambda: fl.FedAvg(**common),
        "fedprox": lambda: fl.FedProx(proximal_mu=0.01, **common),
        "fedadam": lambda: fl.FedAdam(eta=0.01, **common),
        "diloco": lambda: kdf.DiLoCo(**common),
    }[FLAGS.fl_strategy]()
    results = []
    server = kdf.server_app(
        build_model, strategy, num_rounds=FLAGS.rounds,
        evaluate_data=(x_test, y_test),
        train_config={"epochs": FLAGS.local_epochs},
        on_result=results.append)
    client = kdf.client_app(build_model, data_fn, batch_size=32)
    kdf.simulate(server, client, num_clients=n, strategy=strategy,
                 data_fn=data_fn, num_cpus=2, cpus_per_client=2 / n)
    metrics = results[0].evaluate_metrics_serverapp
    curve = [round(float(metrics[r]["accuracy"]), 3) for r in sorted(metrics)]
    print(f"result: test accuracy {curve[-1]:.3f} (chance 0.100) after "
          f"{FLAGS.rounds} rounds of {FLAGS.fl_strategy}, {n} clients, "
          f"label_skew={FLAGS.label_skew}; per round {curve}", flush=True)


if __name__ == "__main__":
    app.run(main)

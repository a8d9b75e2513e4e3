"""Federated averaging of Keras models on Flower (`kerasdist[federated]`).

Flower (`flwr`) runs the federation: its SuperLink and SuperNodes in a
deployment, or its simulation engine. This module only builds Flower's own
apps from Keras pieces, with Flower's Message API:

- `client_app(model_fn, data_fn)`: a `flwr.clientapp.ClientApp` whose
  `train` sets the received weights, runs `model.fit` on the node's data
  and replies with all weights (trainable and non-trainable) and the number
  of examples; its `evaluate` replies with `model.evaluate`'s metrics.
- `server_app(model_fn, strategy, num_rounds=...)`: a
  `flwr.serverapp.ServerApp` that starts any Flower strategy (`FedAvg`,
  `FedProx`, `FedAdam`, ...) from the model's initial weights, optionally
  evaluating the global model centrally after each round.
- `DiLoCo`: a Flower `FedAvg` whose server step applies the averaged
  pseudo-gradient with Nesterov momentum (DiLoCo's outer optimizer) to the
  trainable weights; Flower's `FedAvgM` uses heavy-ball momentum on every
  array, non-trainable statistics included.
- `simulate(...)`: `flwr run` on a simulation SuperLink (Flower's entry
  point for simulations), after checking that the clients' data has the
  right structure and that there are enough clients for the strategy
  (Flower itself would wait forever).

Arrays travel in an `ArrayRecord` keyed `"trainable/<i>"` and
`"non_trainable/<i>"` in `model.weights` order.
"""

from __future__ import annotations

import logging as std_logging
import numbers
import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
except ImportError as e:  # pragma: no cover (the extra is not installed)
    raise ImportError(
        "kerasdist.integrations.flower needs Flower: "
        "pip install 'kerasdist[federated]' (flwr[simulation])."
    ) from e

__all__ = [
    "DiLoCo",
    "check_client_data",
    "client_app",
    "get_arrays",
    "server_app",
    "set_arrays",
    "simulate",
]

_NUM_EXAMPLES = "num-examples"
# Where a ServerApp run by `simulate` leaves its `Result` for the caller.
_ENV_RESULT = "KERASDIST_FLOWER_RESULT"
# ServerApp -> its `on_result`, for `simulate` to call in the caller.
_ON_RESULT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Flower's logger has its own console handler and also propagates to the
# root logger, where absl's handler prints every record a second time.
std_logging.getLogger("flwr").propagate = False


def get_arrays(model: Any) -> ArrayRecord:
    """All of a Keras model's weights as a Flower `ArrayRecord`.

    Args:
        model: `keras.Model`, built.

    Returns:
        `flwr.app.ArrayRecord` keyed `"trainable/<i>"` /
        `"non_trainable/<i>"`, in `model.weights` order.

    Example:

    ```python
    record = get_arrays(model)
    set_arrays(other_model, record)
    ```
    """
    trainable = {id(v) for v in model.trainable_weights}
    arrays = {}
    for i, v in enumerate(model.weights):
        kind = "trainable" if id(v) in trainable else "non_trainable"
        arrays[f"{kind}/{i}"] = Array(np.asarray(v.numpy()))
    return ArrayRecord(arrays)


def set_arrays(model: Any, record: ArrayRecord) -> None:
    """Sets a Keras model's weights from `get_arrays`'s record.

    Args:
        model: `keras.Model`, built, with the architecture that made
            `record`.
        record: `flwr.app.ArrayRecord`.

    Raises:
        ValueError: if the record does not match the model's weights.

    Example:

    ```python
    set_arrays(model, get_arrays(trained))
    ```
    """
    arrays = record.to_numpy_ndarrays()
    weights = model.weights
    if len(arrays) != len(weights) or any(
        tuple(a.shape) != tuple(w.shape)
        for a, w in zip(arrays, weights, strict=True)
    ):
        raise ValueError(
            f"The received weights do not fit model {model.name!r}: got "
            f"{[tuple(a.shape) for a in arrays]}, the model has "
            f"{[tuple(w.shape) for w in weights]}. Build the same model on "
            "every node (the same `model_fn`)."
        )
    for w, a in zip(weights, arrays, strict=True):
        w.assign(a)


def _is_xy(value: Any) -> bool:
    return (
        isinstance(value, tuple) and len(value) == 2
        and all(hasattr(a, "shape") for a in value)
        and len(value[0]) == len(value[1]) > 0
    )


def _is_dataset(value: Any) -> bool:
    import tensorflow as tf

    return isinstance(value, tf.data.Dataset)


def check_client_data(data: Any, where: str = "data_fn") -> tuple:
    """Checks what a client data function returned.

    Args:
        data: the return value: `(train, validation)` where each is a
            `tf.data.Dataset` of batches or an `(x, y)` tuple of arrays;
            `validation` may be None.
        where: str. How to name the function in the message.

    Returns:
        `(train, validation)`.

    Raises:
        ValueError: naming what was received and what is expected.

    Example:

    >>> import numpy as np
    >>> x, y = np.zeros((4, 2)), np.zeros((4,))
    >>> len(check_client_data(((x, y), None)))
    2
    """
    ok = (
        isinstance(data, tuple) and len(data) == 2
        and (_is_xy(data[0]) or _is_dataset(data[0]))
        and (data[1] is None or _is_xy(data[1]) or _is_dataset(data[1]))
    )
    if not ok:
        summary = type(data).__name__
        if isinstance(data, tuple):
            summary += "(" + ", ".join(type(d).__name__ for d in data) + ")"
        raise ValueError(
            f"Invalid return value of `{where}`. Received: {summary}. "
            "Expected a pair (train, validation): train a tf.data.Dataset "
            "of batches or an (x, y) tuple of equal-length arrays, "
            "validation the same or None."
        )
    return data


def _num_examples(data: Any, batch_size: int) -> int:
    if _is_dataset(data):
        return int(sum(
            int(np.shape(b[0] if isinstance(b, tuple) else b)[0])
            for b in data.as_numpy_iterator()
        )) if batch_size else 0
    return len(data[0])


def _fit_args(data: Any, batch_size: int) -> dict:
    if _is_dataset(data):
        return {"x": data}
    return {"x": data[0], "y": data[1], "batch_size": batch_size}


def client_app(
    model_fn: Callable[[], Any],
    data_fn: Callable[[int, int], tuple],
    *,
    epochs: int = 1,
    batch_size: int = 32,
) -> ClientApp:
    """A Flower `ClientApp` that trains a Keras model on the node's data.

    On a `train` message the node builds the model once (`model_fn`), sets
    the received weights, fits `epochs` epochs (the server's train config
    may override `epochs` and `lr`) and replies with all its weights and
    its number of examples; on `evaluate` it replies with the loss and
    metrics on its validation data.

    Args:
        model_fn: callable returning a compiled `keras.Model`, built.
        data_fn: callable `(partition_id, num_partitions) -> (train,
            validation)`; each a `tf.data.Dataset` of batches or an
            `(x, y)` tuple of arrays, validation may be None. The partition
            comes from the node config (`partition-id`, `num-partitions`),
            which Flower's simulation sets and `flower-supernode
            --node-config` passes.
        epochs: int. Local epochs per round (FedSGD: 1 epoch of one
            full batch). Defaults to 1.
        batch_size: int. For `(x, y)` data. Defaults to 32.

    Returns:
        `flwr.clientapp.ClientApp`.

    Raises:
        ValueError: on bad `epochs`/`batch_size`; on the node, when
            `data_fn` returns the wrong structure.

    Example:

    ```python
    app = client_app(build_model, load_partition, epochs=5)
    ```
    """
    from kerasdist._validate import check_int

    epochs = check_int("epochs", epochs)
    batch_size = check_int("batch_size", batch_size)
    app = ClientApp()
    cache: dict = {}

    def setup(context: Context):
        config = context.node_config
        pid = int(config.get("partition-id", 0))
        num = int(config.get("num-partitions", 1))
        key = (pid, num)
        if key not in cache:
            model = model_fn()
            data = check_client_data(data_fn(pid, num), "data_fn")
            cache[key] = (model, data)
        return cache[key]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model, (train_data, _) = setup(context)
        set_arrays(model, msg.content["arrays"])
        config = msg.content.get("config") or ConfigRecord()
        if "lr" in config:
            model.optimizer.learning_rate.assign(float(config["lr"]))
        n_epochs = int(config.get("epochs", epochs))
        history = model.fit(**_fit_args(train_data, batch_size),
                            epochs=n_epochs, verbose=0)
        metrics = {k: float(v[-1]) for k, v in history.history.items()}
        metrics[_NUM_EXAMPLES] = _num_examples(train_data, batch_size)
        content = RecordDict({
            "arrays": get_arrays(model),
            "metrics": MetricRecord(metrics),
        })
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model, (train_data, val_data) = setup(context)
        set_arrays(model, msg.content["arrays"])
        data = val_data if val_data is not None else train_data
        args = _fit_args(data, batch_size)
        args.pop("batch_size", None)
        logs = model.evaluate(**args, verbose=0, return_dict=True)
        metrics = {k: float(v) for k, v in logs.items()}
        metrics[_NUM_EXAMPLES] = _num_examples(data, batch_size)
        return Message(
            content=RecordDict({"metrics": MetricRecord(metrics)}),
            reply_to=msg,
        )

    return app


def server_app(
    model_fn: Callable[[], Any],
    strategy: FedAvg,
    *,
    num_rounds: int,
    evaluate_data: tuple | None = None,
    train_config: dict | None = None,
    on_result: Callable[[Any], None] | None = None,
) -> ServerApp:
    """A Flower `ServerApp` running `strategy` from a Keras model.

    Args:
        model_fn: callable returning a compiled, built `keras.Model`; its
            initial weights start the federation and it evaluates the global
            model when `evaluate_data` is given.
        strategy: a Flower strategy from `flwr.serverapp.strategy` (e.g.
            `FedAvg`, `FedProx`, `FedAdam`) or `DiLoCo`.
        num_rounds: int. Federated rounds.
        evaluate_data: `(x, y)` tuple or None. Held-out data on which the
            server evaluates the global model before the first round and
            after each one (Flower's centralized evaluation). Defaults to
            None.
        train_config: dict or None. Sent to the clients every round
            (e.g. `{"epochs": 5, "lr": 0.1}`). Defaults to None.
        on_result: callable or None. Called with Flower's `Result` (final
            arrays and the metrics of every round) when the run ends.

    Returns:
        `flwr.serverapp.ServerApp`.

    Raises:
        ValueError: if `num_rounds` is not a positive integer or `strategy`
            is not a Flower strategy.

    Example:

    ```python
    from flwr.serverapp.strategy import FedAvg
    app = server_app(build_model, FedAvg(min_available_nodes=4),
                     num_rounds=10, evaluate_data=(x_test, y_test))
    ```
    """
    from flwr.serverapp.strategy import Strategy

    from kerasdist._validate import check_int

    num_rounds = check_int("num_rounds", num_rounds)
    if not isinstance(strategy, Strategy):
        raise ValueError(
            "Invalid value for argument `strategy`. Received: "
            f"strategy={strategy!r}. Expected a Flower strategy from "
            "flwr.serverapp.strategy (e.g. FedAvg()) or "
            "kerasdist.integrations.flower.DiLoCo()."
        )
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model = model_fn()
        evaluate_fn = None
        if evaluate_data is not None:
            def evaluate_fn(server_round: int, arrays: ArrayRecord):
                set_arrays(model, arrays)
                logs = model.evaluate(
                    evaluate_data[0], evaluate_data[1], verbose=0,
                    return_dict=True)
                return MetricRecord({k: float(v) for k, v in logs.items()})
        result = strategy.start(
            grid=grid,
            initial_arrays=get_arrays(model),
            num_rounds=num_rounds,
            train_config=ConfigRecord(dict(train_config or {})),
            evaluate_fn=evaluate_fn,
        )
        _finish(result, on_result)

    if on_result is not None:
        _ON_RESULT[app] = on_result
    return app


def _finish(result: Any, on_result: Callable[[Any], None] | None) -> None:
    """Hands the run's `Result` to `simulate`'s caller, or to `on_result`."""
    import os
    import pickle

    path = os.environ.get(_ENV_RESULT)
    if path:  # Under `simulate`: its caller calls on_result.
        with open(path + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(path + ".tmp", path)
    elif on_result is not None:
        on_result(result)


class DiLoCo(FedAvg):
    """Flower `FedAvg` with DiLoCo's outer Nesterov step on the server.

    Each round the weighted mean of the clients' weights gives the
    pseudo-gradient `g = global - mean` of every trainable array; the
    server applies it like `keras.optimizers.SGD(learning_rate,
    momentum, nesterov=True)`: `v = momentum * v + g`,
    `global -= learning_rate * (g + momentum * v)`. Non-trainable arrays
    (BatchNormalization statistics) are averaged. With `momentum=0` and
    `learning_rate=1` this is FedAvg.

    Args:
        learning_rate: float. Outer learning rate. Defaults to 0.7.
        momentum: float in [0, 1). Defaults to 0.9.
        **kwargs: passed to `flwr.serverapp.strategy.FedAvg`
            (`min_available_nodes`, `fraction_train`, ...).

    Raises:
        ValueError: on a negative learning rate or momentum outside [0, 1).

    Example:

    ```python
    strategy = DiLoCo(learning_rate=0.7, momentum=0.9,
                      min_available_nodes=4)
    ```
    """

    def __init__(self, learning_rate: float = 0.7, momentum: float = 0.9,
                 **kwargs: Any):
        if not isinstance(learning_rate, numbers.Real) or learning_rate <= 0:
            raise ValueError(
                "Invalid value for argument `learning_rate`. Received: "
                f"learning_rate={learning_rate!r}. Expected a positive "
                "number.")
        if not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
            raise ValueError(
                "Invalid value for argument `momentum`. Received: "
                f"momentum={momentum!r}. Expected a number in [0, 1).")
        super().__init__(**kwargs)
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self._global: ArrayRecord | None = None
        self._velocity: dict[str, np.ndarray] = {}

    def configure_train(self, server_round, arrays, config, grid):
        """Remembers the global weights sent this round."""
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        """Averages the replies, then takes the outer Nesterov step."""
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self._global is None:
            return averaged, metrics
        keys = list(averaged.keys())
        old = dict(zip(keys, self._global.to_numpy_ndarrays(), strict=True))
        new = dict(zip(keys, averaged.to_numpy_ndarrays(), strict=True))
        out = {k: Array(v) for k, v in self.outer_step(old, new).items()}
        return ArrayRecord(out), metrics


    def outer_step(self, old: dict, new: dict) -> dict:
        """The server step from the global arrays and their weighted mean.

        Args:
            old: dict key -> np.ndarray. The global arrays sent this round.
            new: dict key -> np.ndarray. The clients' weighted average.

        Returns:
            dict key -> np.ndarray: the new global arrays.

        Example:

        >>> import numpy as np
        >>> s = DiLoCo(learning_rate=1.0, momentum=0.0)
        >>> s.outer_step({"trainable/0": np.ones(2)},
        ...              {"trainable/0": np.zeros(2)})["trainable/0"]
        array([0., 0.])
        """
        out = {}
        for key, value in new.items():
            if not key.startswith("trainable/"):
                out[key] = np.asarray(value)
                continue
            g = old[key] - value
            v = self.momentum * self._velocity.get(key, 0.0) + g
            self._velocity[key] = v
            out[key] = np.asarray(
                old[key] - self.learning_rate * (g + self.momentum * v),
                dtype=old[key].dtype)
        return out


def _minimum_clients(strategy: Any) -> int:
    return max(
        int(getattr(strategy, name, 0) or 0)
        for name in ("min_available_nodes", "min_train_nodes",
                     "min_evaluate_nodes")
    )


_SIM_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "kerasdist-simulation"
version = "1.0.0"
description = "The apps given to kerasdist.integrations.flower.simulate"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "kerasdist"

[tool.flwr.app.components]
serverapp = "kd_simulation_app:server"
clientapp = "kd_simulation_app:client"
"""

_SIM_MODULE = """\
\"\"\"The ServerApp and ClientApp given to kdf.simulate, unpickled.\"\"\"
import pickle

with open({path!r}, "rb") as f:
    apps = pickle.load(f)
server = apps[0]
client = apps[1]
"""


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _sim_connection(host: str, port: int) -> str:
    """`$FLWR_HOME/config.toml` naming the simulation SuperLink."""
    return (
        '[superlink]\ndefault = "kerasdist"\n\n[superlink.kerasdist]\n'
        f'address = "{host}:{port}"\ninsecure = true\n'
    )


def _federation_config(num_clients: int, cpus_per_client: float,
                       num_cpus: int | None, ray_address: str) -> list[str]:
    """`flwr run --federation-config` items for the simulation.

    Flower takes whole CPUs per client; Ray's CPUs are logical, so a
    fraction f of a CPU per client on C CPUs is 1 CPU per client on C / f
    logical CPUs (the same number of clients at once).
    """
    import math
    import os

    items = [f"num-supernodes={num_clients}", "client-resources-num-gpus=0"]
    if ray_address != "local":  # The cluster's own resources count.
        items.append(f"client-resources-num-cpus={math.ceil(cpus_per_client)}")
        return items
    cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
    items += ["client-resources-num-cpus=1",
              f"init-args-num-cpus={max(1, round(cpus / cpus_per_client))}"]
    return items


def _wait_listening(host: str, port: int, proc: Any, log: str,
                    timeout: float) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited with {proc.returncode} before "
                f"listening on {host}:{port}:\n{_tail(log)}")
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(
        f"flower-superlink did not listen on {host}:{port} within "
        f"{timeout:.0f}s:\n{_tail(log)}")


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


def _flower_bin(name: str) -> str:
    import os
    import shutil
    import sys

    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.access(here, os.X_OK) else shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"`{name}` is not installed: pip install 'kerasdist[federated]'.")
    return found


def _check_simulation(num_clients: int, strategy: Any, data_fn: Any,
                      ray_address: str, host: str) -> int:
    from kerasdist._validate import check_int

    num_clients = check_int("num_clients", num_clients)
    needed = _minimum_clients(strategy)
    if num_clients < needed:
        raise ValueError(
            "Invalid value for argument `num_clients`. Received: "
            f"num_clients={num_clients}, but the strategy "
            f"{type(strategy).__name__} needs at least {needed} clients "
            "(min_available_nodes/min_train_nodes/min_evaluate_nodes) and "
            "would wait forever. Use more clients or lower the strategy's "
            "minimum."
        )
    if not isinstance(ray_address, str) or not ray_address.strip():
        raise ValueError(
            "Invalid value for argument `ray_address`. Received: "
            f"ray_address={ray_address!r}. Expected 'local' (a Ray instance "
            "of the simulation's own) or a cluster's 'HOST:PORT'.")
    if not isinstance(host, str) or not host.strip():
        raise ValueError(
            f"Invalid value for argument `host`. Received: host={host!r}. "
            "Expected an address such as '127.0.0.1'.")
    if data_fn is not None:
        check_client_data(data_fn(0, num_clients), "data_fn")
    return num_clients


def simulate(
    server: ServerApp,
    client: ClientApp,
    *,
    num_clients: int,
    strategy: Any,
    data_fn: Callable[[int, int], tuple] | None = None,
    num_cpus: int | None = None,
    cpus_per_client: float = 1.0,
    host: str = "127.0.0.1",
    port: int | None = None,
    ray_address: str = "local",
    timeout: float | None = None,
) -> None:
    """Runs the apps on Flower's simulation runtime, after checking them.

    Uses Flower's own entry point for simulations (`flwr run` against a
    `flower-superlink --simulation`; `flwr.simulation.run_simulation` is
    deprecated since flwr 1.42): the two apps are pickled into a Flower App
    of their own, a SuperLink in simulation mode listens on `host:port`,
    and `flwr run ... --stream` runs the federation, printing Flower's log.
    The ServerApp runs in Flower's `flwr-serverapp` process and the clients
    in Flower's Ray backend, so `model_fn`/`data_fn` must be importable
    there (a module on `PYTHONPATH`, or defined in the main script).
    `server_app`'s `on_result` is called here, in this process, when the
    run ends.

    Args:
        server: from `server_app`.
        client: from `client_app`.
        num_clients: int. Simulated SuperNodes.
        strategy: the strategy passed to `server_app` (to check its
            minimum number of clients).
        data_fn: the client data function, or None. When given, its
            result for partition 0 is checked before anything starts.
        num_cpus: int or None. CPUs of the simulation's own Ray instance.
            Defaults to None (Ray's choice).
        cpus_per_client: float. CPUs each simulated client reserves.
            Defaults to 1.0.
        host: str. Address the simulation SuperLink listens on. Defaults
            to `"127.0.0.1"`.
        port: int or None. Its port (Flower's HTTP API). Defaults to None
            (a free port).
        ray_address: str. `"local"` starts a Ray instance of the
            simulation's own, even when `ray start` runs a cluster on this
            machine; `"HOST:PORT"` runs the clients on that Ray cluster
            (its GCS address, as `ray start --head --port` printed).
            Defaults to `"local"`.
        timeout: float or None. Seconds before the run is stopped.
            Defaults to None (no limit).

    Raises:
        ValueError: with fewer clients than the strategy's minimum, a data
            function returning the wrong structure, or a bad `host` or
            `ray_address`.
        RuntimeError: if the SuperLink or the run fails (with their log).

    Example:

    ```python
    simulate(server, client, num_clients=4, strategy=strategy)
    ```
    """
    import os
    import tempfile

    num_clients = _check_simulation(num_clients, strategy, data_fn,
                                    ray_address, host)
    port = _free_port(host) if port is None else _check_port(port)
    logging.info("kerasdist: Flower simulation with %d clients on %s:%d",
                 num_clients, host, port)
    with tempfile.TemporaryDirectory(prefix="kerasdist-flower-") as tmp:
        app_dir, home = os.path.join(tmp, "app"), os.path.join(tmp, "home")
        os.makedirs(app_dir)
        os.makedirs(home)
        _write_simulation_app(tmp, app_dir, server, client)
        with open(os.path.join(home, "config.toml"), "w") as f:
            f.write(_sim_connection(host, port))
        federation = _federation_config(
            num_clients, float(cpus_per_client), num_cpus, ray_address)
        result_path = os.path.join(tmp, "result.pkl")
        # The SuperLink starts Flower's other programs from PATH.
        path = os.pathsep.join([os.path.dirname(_flower_bin("flwr")),
                                os.environ.get("PATH", "")])
        env = dict(os.environ, FLWR_HOME=home, RAY_ADDRESS=ray_address,
                   PATH=path)
        if ray_address == "local":
            # Ray on Linux takes the host's outward address for a new node;
            # this keeps the simulation's own instance on loopback
            # (get_node_ip_address in ray/_private/services.py).
            env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env[_ENV_RESULT] = result_path
        env.pop("TF_CONFIG", None)
        log = os.path.join(tmp, "superlink.log")
        _run_with_superlink(env, host, port, app_dir, federation, log,
                            timeout)
        _deliver_result(server, result_path, log)


def _check_port(port: Any) -> int:
    """`port` as an int in [1, 65535], or a ValueError naming it."""
    from kerasdist._validate import check_int

    port = check_int("port", port)
    if port > 65535:
        raise ValueError(
            f"Invalid value for argument `port`. Received: port={port}. "
            "Expected a port number in [1, 65535].")
    return port


def _write_simulation_app(tmp: str, app_dir: str, server: ServerApp,
                          client: ClientApp) -> None:
    import os

    # Ray's cloudpickle (flwr[simulation] needs Ray) pickles the apps'
    # closures and functions defined in the main script by value.
    from ray import cloudpickle

    apps = os.path.join(tmp, "apps.pkl")
    with open(apps, "wb") as f:
        cloudpickle.dump((server, client), f)
    with open(os.path.join(app_dir, "pyproject.toml"), "w") as f:
        f.write(_SIM_PYPROJECT)
    with open(os.path.join(app_dir, "kd_simulation_app.py"), "w") as f:
        f.write(_SIM_MODULE.format(path=apps))


def _run_with_superlink(env: dict, host: str, port: int, app_dir: str,
                        federation: list[str], log: str,
                        timeout: float | None) -> None:
    import subprocess
    import time

    from kerasdist.launch import supervisor

    with open(log, "w") as out:
        link = subprocess.Popen(
            [_flower_bin("flower-superlink"), "--insecure", "--simulation",
             "--host", host, "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    leaders = [supervisor.Leader(link)]
    try:
        _wait_listening(host, port, link, log, timeout=120)
        run = supervisor.Leader(subprocess.Popen(
            [_flower_bin("flwr"), "run", app_dir, "kerasdist", "--stream",
             *(a for item in federation
               for a in ("--federation-config", item))],
            env=env, start_new_session=True))
        leaders.append(run)
        deadline = None if timeout is None else time.monotonic() + timeout
        while run.running():
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(
                    f"The Flower simulation did not end within {timeout}s.")
            time.sleep(0.2)
        if run.returncode != 0:
            raise RuntimeError(
                f"`flwr run` exited with {run.returncode}. SuperLink log:\n"
                f"{_tail(log)}")
    finally:
        # The SuperLink starts flower-superexec in a session of its own
        # (and it the ServerApp, the simulation and Ray): stop those too.
        groups = _descendant_groups(link.pid)
        supervisor.stop_all(leaders, grace=10.0)
        _kill_groups(groups)


def _descendant_groups(pid: int) -> set[int]:
    """Process groups of `pid`'s descendants (not this process's)."""
    from kerasdist.launch import supervisor

    infos = supervisor.processes()
    children: dict[int, list] = {}
    for info in infos:
        children.setdefault(info.ppid, []).append(info)
    groups, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            groups.add(child.pgid)
            todo.append(child.pid)
    return groups - {os.getpgrp(), pid}


def _kill_groups(groups: set[int]) -> None:
    import signal

    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _deliver_result(server: ServerApp, path: str, log: str) -> None:
    import os
    import pickle

    if not os.path.exists(path):
        raise RuntimeError(
            "The Flower simulation ended without a result from the "
            f"ServerApp. SuperLink log:\n{_tail(log)}")
    with open(path, "rb") as f:
        result = pickle.load(f)
    on_result = _ON_RESULT.get(server)
    if on_result is not None:
        on_result(result)

"""Federated averaging on Flower: its simulation engine with 4 clients and
a real SuperLink + 2 SuperNodes deployment on 127.0.0.1."""

import os
import sys

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")
# Ray nodes on loopback (see tests/test_ray_train.py); read at Ray's import.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from flwr.serverapp.strategy import FedAvg, FedProx  # noqa: E402

from kerasdist.integrations import flower as kdf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flower_app  # noqa: E402


@pytest.fixture
def worker_path(monkeypatch):
    # Flower's Ray workers import flower_app / kerasdist from these paths.
    repo = os.path.dirname(HERE)
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join([HERE, repo, os.environ.get("PYTHONPATH", "")]))


def _losses(result):
    rounds = sorted(result.evaluate_metrics_serverapp)
    return [float(result.evaluate_metrics_serverapp[r]["loss"])
            for r in rounds]


def test_arrays_round_trip_all_weights():
    a, b = flower_app.model_fn(), flower_app.model_fn()
    b.fit(*flower_app.data_fn(0, 1)[0], epochs=1, verbose=0)
    record = kdf.get_arrays(b)
    assert sum(k.startswith("non_trainable/") for k in record) == 2
    kdf.set_arrays(a, record)
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_diloco_step_is_outer_nesterov_on_trainable_only():
    strategy = kdf.DiLoCo(learning_rate=0.5, momentum=0.9)
    old = {"trainable/0": np.array([1.0, 2.0]),
           "non_trainable/1": np.array([5.0])}
    mean = {"trainable/0": np.array([0.5, 1.5]),
            "non_trainable/1": np.array([2.0])}
    out = strategy.outer_step(old, mean)
    g = old["trainable/0"] - mean["trainable/0"]
    np.testing.assert_allclose(
        out["trainable/0"], old["trainable/0"] - 0.5 * (g + 0.9 * g))
    np.testing.assert_allclose(out["non_trainable/1"], [2.0])  # averaged
    # Second round: the velocity carries over (v = 0.9 g1 + g2).
    out2 = strategy.outer_step(out, {k: v - 0.1 for k, v in out.items()})
    v = 0.9 * g + 0.1
    np.testing.assert_allclose(
        out2["trainable/0"],
        out["trainable/0"] - 0.5 * (0.1 + 0.9 * v), rtol=1e-6)


def test_bad_client_data_function_is_a_clear_error():
    server = kdf.server_app(flower_app.model_fn, FedAvg(), num_rounds=1)
    client = kdf.client_app(flower_app.model_fn, flower_app.bad_data_fn)
    with pytest.raises(ValueError, match="Invalid return value of `data_fn`"):
        kdf.simulate(server, client, num_clients=2, strategy=FedAvg(),
                     data_fn=flower_app.bad_data_fn)


def test_fewer_clients_than_strategy_minimum_is_a_clear_error():
    strategy = FedAvg(min_available_nodes=5)
    server = kdf.server_app(flower_app.model_fn, strategy, num_rounds=1)
    client = kdf.client_app(flower_app.model_fn, flower_app.data_fn)
    with pytest.raises(ValueError, match="num_clients=4.*at least 5"):
        kdf.simulate(server, client, num_clients=4, strategy=strategy)


def test_rejects_non_flower_strategy():
    with pytest.raises(ValueError, match="Expected a Flower strategy"):
        kdf.server_app(flower_app.model_fn, "fedavg", num_rounds=1)


@pytest.fixture
def ray_cluster_address():
    """A real Ray cluster (head with 2 CPUs on 127.0.0.1) of this test's
    own, stopped after it (never `ray stop`, which stops every Ray cluster
    on the machine)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False,
        "node_ip_address": "127.0.0.1"})
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "diloco"])
def test_simulation_with_4_clients_improves_round_over_round(
        name, worker_path, request, capfd):
    strategy = {
        "fedavg": lambda: FedAvg(min_available_nodes=4),
        "fedprox": lambda: FedProx(min_available_nodes=4,
                                   proximal_mu=0.01),
        "diloco": lambda: kdf.DiLoCo(min_available_nodes=4),
    }[name]()
    results = []
    server = kdf.server_app(
        flower_app.model_fn, strategy, num_rounds=3,
        evaluate_data=flower_app.TEST_DATA,
        train_config={"epochs": 2}, on_result=results.append)
    client = kdf.client_app(flower_app.model_fn, flower_app.data_fn,
                            batch_size=32)
    # fedprox: on a Ray cluster given by address; diloco: on a chosen port.
    where = {"num_cpus": 2, "cpus_per_client": 0.5}
    if name == "fedprox":
        where = {"ray_address": request.getfixturevalue(
            "ray_cluster_address"), "cpus_per_client": 1}
    elif name == "diloco":
        where["port"] = _free_port()
    kdf.simulate(server, client, num_clients=4, strategy=strategy,
                 data_fn=flower_app.data_fn, timeout=800, **where)
    out = capfd.readouterr()
    shown = out.out + out.err
    if "port" in where:
        assert f"Using SuperLink: kerasdist (127.0.0.1:{where['port']})" in (
            shown), shown[-3000:]
    # Flower's log reaches the user, each line once.
    assert shown.count("[ROUND 2/3]") == 1, shown[-3000:]
    assert len(results) == 1
    losses = _losses(results[0])
    assert len(losses) == 4  # before round 1, after rounds 1..3
    assert all(b < a for a, b in zip(losses[:-1], losses[1:],
                                     strict=True)), losses
    final = results[0].evaluate_metrics_serverapp[3]["accuracy"]
    assert final > 0.8
    assert set(results[0].train_metrics_clientapp) == {1, 2, 3}

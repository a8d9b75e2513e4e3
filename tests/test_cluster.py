"""TF_CONFIG parsing, validation and generation."""

import json

import pytest

import kerasdist as kd
from kerasdist import cluster


def _env(config):
    return {"TF_CONFIG": config if isinstance(config, str) else json.dumps(
        config)}


def test_no_tf_config_is_single_chief_worker():
    info = cluster.from_env({})
    assert (info.task_type, info.task_index, info.num_workers) == (
        "worker", 0, 1)
    assert info.is_chief and not info.is_multi_worker


def test_two_workers_second_is_not_chief():
    cfg = cluster.make_tf_config(["127.0.0.1:1000", "127.0.0.1:1001"], 1)
    info = cluster.from_env(_env(cfg))
    assert info.num_workers == 2 and info.worker_rank == 1
    assert not info.is_chief and info.address == "127.0.0.1:1001"
    assert kd.is_chief(_env(cluster.make_tf_config(["h:1", "h:2"], 0)))


def test_separate_chief_task_is_chief_and_rank_zero():
    cfg = cluster.make_tf_config(["h:2"], 0, task_type="chief", chief="h:1")
    info = cluster.from_env(_env(cfg))
    assert info.is_chief and info.num_workers == 2 and info.worker_rank == 0
    cfg["task"] = {"type": "worker", "index": 0}
    info = cluster.from_env(_env(cfg))
    assert not info.is_chief and info.worker_rank == 1


def test_make_tf_config_picks_distinct_free_ports():
    cfg = cluster.make_tf_config(3, 2)
    workers = cfg["cluster"]["worker"]
    assert len(set(workers)) == 3
    assert all(w.startswith("127.0.0.1:") for w in workers)
    assert cfg["task"] == {"type": "worker", "index": 2}


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}',
         "TF_CONFIG has no 'cluster'"),
        (
            {"cluster": {"worker": ["h:1", "h:2"]},
             "task": {"type": "worker", "index": 2}},
            "task index 2 is out of range: cluster has 2 'worker' task(s), "
            "so the index must be in [0, 1]",
        ),
        (
            {"cluster": {"worker": ["h:1", "h:1"]},
             "task": {"type": "worker", "index": 0}},
            "same address 'h:1' to worker:0 and worker:1",
        ),
        (
            {"cluster": {"worker": ["h:1"]}, "task": {"type": "chief"}},
            "task type 'chief' is not in the cluster",
        ),
        (
            {"cluster": {"worker": ["h1"]},
             "task": {"type": "worker", "index": 0}},
            "is not a 'host:port' address. Received: 'h1'",
        ),
        (
            {"cluster": {"worker": "h:1"},
             "task": {"type": "worker", "index": 0}},
            "must be a list of 'host:port' strings",
        ),
        ({"cluster": {"worker": ["h:1"]}}, "TF_CONFIG has no 'task'"),
        (
            {"cluster": {"workers": ["h:1"]},
             "task": {"type": "workers", "index": 0}},
            "unknown task type 'workers'",
        ),
        (
            {"cluster": {"worker": ["h:1"]},
             "task": {"type": "worker", "index": "0"}},
            "task index must be an integer",
        ),
    ],
)
def test_malformed_tf_config_names_the_problem(raw, message):
    with pytest.raises(cluster.TFConfigError) as e:
        cluster.from_env(_env(raw))
    assert message in str(e.value)


def test_make_tf_config_rejects_out_of_range_index():
    with pytest.raises(cluster.TFConfigError, match="out of range"):
        cluster.make_tf_config(["h:1", "h:2"], 5)
    with pytest.raises(cluster.TFConfigError, match="workers=0"):
        cluster.make_tf_config(0, 0)


def test_get_strategy_reports_malformed_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["h:1", "h:1"]},'
                       ' "task": {"type": "worker", "index": 0}}')
    with pytest.raises(cluster.TFConfigError, match="same address"):
        kd.get_strategy("auto")

"""Choosing a strategy by name, and its options."""

import json

import pytest
import tensorflow as tf
from conftest import NUM_CPUS

import kerasdist as kd


def test_auto_without_gpus_or_cluster_is_one_device(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    s = kd.get_strategy("auto")
    assert isinstance(s, tf.distribute.OneDeviceStrategy)
    assert s.num_replicas_in_sync == 1


def test_auto_with_several_devices_is_mirrored(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    s = kd.get_strategy("auto", devices=["/cpu:0", "/cpu:1"])
    assert isinstance(s, kd.MirroredStrategy)
    assert s.num_replicas_in_sync == 2


def test_mirrored_uses_all_local_devices_and_is_a_tf_strategy():
    s = kd.get_strategy("mirrored")
    assert isinstance(s, tf.distribute.MirroredStrategy)
    assert s.num_replicas_in_sync == NUM_CPUS


def test_mirrored_cross_device_ops():
    s = kd.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"],
                        communication="hierarchical_copy")
    assert isinstance(s.extended._cross_device_ops,
                      tf.distribute.HierarchicalCopyAllReduce)


def test_auto_with_multi_worker_tf_config_is_multi_worker(monkeypatch):
    # Reading TF_CONFIG decides; the strategy itself is built in the
    # multi-worker tests (it starts a gRPC server and waits for peers).
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        kd.cluster.make_tf_config(2, 1)))
    assert kd.cluster.from_env().is_multi_worker


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "horovod"}, "Received: name='horovod'. Expected one of "
         "['auto', 'one_device', 'mirrored', 'multi_worker']"),
        ({"name": "mirrored", "communication": "ring"},
         "communication='ring'"),
        ({"name": "mirrored", "communication": "nccl"},
         "NCCL needs GPUs and this host has none"),
        ({"name": "mirrored", "devices": ["/cpu:9"]},
         "Device '/cpu:9' does not exist"),
        ({"name": "multi_worker", "communication": "mpi"},
         "communication='mpi'"),
        ({"name": "multi_worker", "bytes_per_pack": -1},
         "bytes_per_pack=-1"),
        ({"name": "multi_worker", "timeout_seconds": 0},
         "timeout_seconds=0"),
    ],
)
def test_bad_strategy_arguments_are_clear_errors(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError) as e:
        kd.get_strategy(name, **kwargs)
    assert message in str(e.value)

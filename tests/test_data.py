"""kd.data: global batch, sharding policy, and bad input."""

import numpy as np
import pytest
import tensorflow as tf

import kerasdist as kd

AutoShard = tf.data.experimental.AutoShardPolicy


@pytest.fixture(scope="module")
def mirrored2():
    return kd.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])


def test_batches_to_the_global_batch(mirrored2):
    ds = kd.data.distribute(tf.data.Dataset.range(10), mirrored2,
                            global_batch_size=4)
    assert [b.numpy().tolist() for b in ds] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert kd.data.per_replica_batch_size(64, mirrored2) == 32


def test_each_replica_gets_its_half_of_the_global_batch(mirrored2):
    ds = kd.data.distribute(tf.data.Dataset.range(8), mirrored2,
                            global_batch_size=4)
    first = next(iter(mirrored2.experimental_distribute_dataset(ds)))
    parts = [t.numpy().tolist()
             for t in mirrored2.experimental_local_results(first)]
    assert parts == [[0, 1], [2, 3]]


def test_single_worker_does_not_shard(mirrored2):
    ds = kd.data.distribute(tf.data.Dataset.range(8), mirrored2,
                            global_batch_size=4)
    assert ds.options().experimental_distribute.auto_shard_policy == (
        AutoShard.OFF)


def test_policy_choice_for_files_and_in_memory_data(tmp_path):
    files = []
    for i in range(3):
        path = str(tmp_path / f"part-{i}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            w.write(b"x")
        files.append(path)
    records = tf.data.TFRecordDataset(files)
    in_memory = tf.data.Dataset.from_tensor_slices(np.zeros(8))
    choose = kd.data._choose_policy
    assert choose(records, "auto", 2) == AutoShard.FILE
    assert choose(records, "auto", 4) == AutoShard.DATA  # 3 files < 4
    assert choose(in_memory, "auto", 2) == AutoShard.DATA
    assert choose(in_memory, "off", 2) == AutoShard.OFF
    with pytest.raises(ValueError, match="reads 3 file.s. and there are 4"):
        choose(records, "file", 4)


@pytest.mark.parametrize("batch", [3, 0, 2.5, True])
def test_global_batch_must_divide_over_replicas(mirrored2, batch):
    with pytest.raises(ValueError) as e:
        kd.data.distribute(tf.data.Dataset.range(8), mirrored2,
                           global_batch_size=batch)
    assert f"global_batch_size={batch!r}" in str(e.value) or (
        f"global_batch_size={batch}" in str(e.value))


def test_indivisible_batch_message_suggests_multiples(mirrored2):
    with pytest.raises(ValueError) as e:
        kd.data.per_replica_batch_size(5, mirrored2)
    assert "does not divide over the 2 replicas" in str(e.value)
    assert "e.g. 4 or 6" in str(e.value)


def test_bad_policy_and_non_dataset(mirrored2):
    with pytest.raises(ValueError, match="shard_policy='rows'"):
        kd.data.distribute(tf.data.Dataset.range(8), mirrored2,
                           global_batch_size=2, shard_policy="rows")
    with pytest.raises(TypeError, match="Expected a tf.data.Dataset"):
        kd.data.distribute(np.zeros(4), mirrored2, global_batch_size=2)


def test_partial_last_batch_that_splits_unevenly_is_refused(mirrored2):
    ds = tf.data.Dataset.range(9)
    with pytest.raises(kd.data.UnevenBatchError) as info:
        kd.data.distribute(ds, mirrored2, global_batch_size=4)
    assert str(info.value) == (
        "Invalid value for argument `drop_remainder`. Received: "
        "drop_remainder=False with 9 examples and global_batch_size=4, which"
        " leaves a last batch of 1 example(s); it does not divide over the 2"
        " replicas in sync. Pass drop_remainder=True, or use 8 examples.")
    # Even splits and dropped remainders are fine.
    batches = kd.data.distribute(tf.data.Dataset.range(10), mirrored2,
                                 global_batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 2]
    batches = kd.data.distribute(ds, mirrored2, global_batch_size=4,
                                 drop_remainder=True)
    assert [len(b) for b in batches] == [4, 4]


def test_keras_numpy_batch_checks(mirrored2):
    kd.data.check_keras_batches(4, 2, mirrored2, 10)
    with pytest.raises(kd.data.UnevenBatchError,
                       match=r"Received: batch_size=3, a global batch that "
                             r"does not divide over the 2 replicas in sync"
                             r".*use e\.g\. batch_size=2 or 4\."):
        kd.data.check_keras_batches(3, None, mirrored2)

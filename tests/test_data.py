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


def _model(strategy):
    import keras

    with strategy.scope():
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
    return model


def _xy(n):
    x = tf.data.Dataset.range(n).map(lambda i: tf.cast([i], "float32"))
    return tf.data.Dataset.zip((x, x))


def test_partial_last_batch_refused_for_training_only(mirrored2):
    # kd.data.distribute accepts it: evaluation and predict are exact for
    # any split (issue 23.1); fit refuses it before the first step.
    train = kd.data.distribute(_xy(9), mirrored2, global_batch_size=4)
    assert [len(b[0]) for b in train] == [4, 4, 1]
    model = _model(mirrored2)
    with pytest.raises(kd.data.UnevenBatchError) as info:
        model.fit(train, epochs=1, verbose=0)
    assert str(info.value) == (
        "Invalid value for argument `batch_size`. Received: batch_size=4 "
        "with 9 training examples, which leaves a last batch of 1 "
        "example(s) in every epoch; it does not divide over the 2 replicas "
        "in sync, so that training step would differ from one device. Use "
        "a number of examples whose remainder modulo the batch size is a "
        "multiple of 2 (e.g. the first 8 examples), or pass a "
        "tf.data.Dataset batched with drop_remainder=True "
        "(kd.data.distribute(..., drop_remainder=True)).")
    assert int(model.optimizer.iterations.numpy()) == 0
    model.evaluate(train, verbose=0)
    assert model.predict(train.map(lambda x, y: x), verbose=0).shape == (
        9, 1)
    # Even splits and dropped remainders train.
    model.fit(kd.data.distribute(_xy(10), mirrored2, global_batch_size=4),
              verbose=0)
    model.fit(kd.data.distribute(_xy(9), mirrored2, global_batch_size=4,
                                 drop_remainder=True), verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 5


@pytest.fixture
def elastic_1_to_2(monkeypatch):
    # This process: 1 worker x 2 replicas; the group may be 1 or 2 workers.
    monkeypatch.setenv("KERASDIST_MIN_WORKERS", "1")
    monkeypatch.setenv("KERASDIST_MAX_WORKERS", "2")


def test_elastic_partial_batch_checked_at_every_size(mirrored2,
                                                     elastic_1_to_2):
    # Issue 25.1: a last batch of 6 splits over 2 replicas (1 worker) but
    # not over 4 (2 workers): refused before step 1, with advice that
    # works at both sizes (12 examples leave 4).
    model = _model(mirrored2)
    with pytest.raises(kd.data.UnevenBatchError) as info:
        model.fit(kd.data.distribute(_xy(14), mirrored2,
                                     global_batch_size=8), verbose=0)
    message = str(info.value)
    assert "at 2 worker(s) = 4 replicas" in message
    assert "(e.g. the first 12 examples)" in message
    assert isinstance(info.value, kd.errors.PermanentError)
    model.fit(kd.data.distribute(_xy(12), mirrored2, global_batch_size=8),
              verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2


def test_elastic_unknown_size_refused_before_step_1(mirrored2,
                                                   elastic_1_to_2):
    # A `filter`: which size could fail at an epoch end is unknown.
    unknown = _xy(16).filter(lambda x, y: x[0] < 13)
    model = _model(mirrored2)
    for train in (unknown.batch(8),
                  kd.data.distribute(unknown, mirrored2, global_batch_size=8)):
        with pytest.raises(kd.data.UnevenBatchError,
                           match=r"Invalid training dataset for an elastic "
                                 r"run: its number of examples is unknown.*"
                                 r"drop_remainder=True"):
            model.fit(train, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 0
    assert int(model.optimizer.iterations.numpy()) == 0
    history = model.fit(kd.data.distribute(
        unknown, mirrored2, global_batch_size=8, drop_remainder=True),
        verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_configuration_errors_are_permanent(mirrored2):
    # Issue 21: a deterministic ValueError exits 78 under kerasdist-run.
    with pytest.raises(kd.errors.ConfigError) as info:
        kd.data.distribute(tf.data.Dataset.range(8), mirrored2,
                           global_batch_size=2, shard_policy="rows")
    assert isinstance(info.value, kd.errors.PermanentError)
    assert isinstance(info.value, ValueError)


def test_keras_numpy_batch_checks(mirrored2):
    kd.data.check_keras_batches(4, 2, mirrored2, 10)
    with pytest.raises(kd.data.UnevenBatchError,
                       match=r"Received: batch_size=3, a global batch that "
                             r"does not divide over the 2 replicas in sync"
                             r".*use e\.g\. batch_size=2 or 4\."):
        kd.data.check_keras_batches(3, None, mirrored2)


def test_unseeded_shuffles_found_in_the_dataset_graph(mirrored2):
    # A global seed (an earlier test in this process may have set one)
    # seeds every shuffle made after it: start without one.
    tf.random.set_seed(None)
    ds = tf.data.Dataset.range(8)
    assert kd.data.unseeded_shuffles(ds.shuffle(8).batch(2)) == 1
    tf.random.set_seed(5)
    assert kd.data.unseeded_shuffles(ds.shuffle(8).batch(2)) == 0
    tf.random.set_seed(None)
    assert kd.data.unseeded_shuffles(ds.shuffle(8, seed=3).batch(2)) == 0
    assert kd.data.unseeded_shuffles(ds.batch(2)) == 0
    # One worker: nothing to warn about (the multi-worker warning is
    # tested on 2 workers in tests/clients).
    assert not kd.data.warn_if_unseeded_shuffle(ds.shuffle(8), mirrored2)

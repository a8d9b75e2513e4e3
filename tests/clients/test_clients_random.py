"""Per-replica random streams on 2 virtual CPUs (issue 23.3).

Keras's `SeedGenerator` state is the same on every replica; under a kd
strategy each replica still draws its own numbers, seeded from its global
replica id: replica 0 draws what one device draws, and two runs draw the
same. The same draws on 2 workers are checked in
test_clients_multi_worker.py.
"""

import keras
import numpy as np
import patterns
import pytest
import tensorflow as tf

import kerasdist as kd


@pytest.fixture(scope="module")
def strategy():
    return kd.MirroredStrategy(devices=["/cpu:0", "/cpu:1"])


@pytest.mark.timeout(300)
def test_replicas_draw_their_own_numbers_reproducibly(strategy):
    first = patterns.random_streams(strategy)
    second = patterns.random_streams(strategy)
    one = patterns.random_streams(None)
    # Dropout masks (16 draws at rate 0.5) and latents differ per replica.
    assert not np.array_equal(first["mask0"], first["mask1"])
    assert not np.array_equal(first["z0"], first["z1"])
    assert set(np.unique(first["mask1"])) <= {0.0, 2.0}
    # Replica 0 draws what one device draws; a second run draws the same.
    np.testing.assert_array_equal(first["z0"], one["z0"])
    np.testing.assert_array_equal(first["mask0"], one["mask0"])
    patterns.assert_same(second, first, rtol=0, atol=0)


def test_draws_outside_a_kd_strategy_are_unchanged(strategy):
    generator = keras.random.SeedGenerator(11)
    with strategy.scope():
        in_scope = keras.random.SeedGenerator(11)
    plain = keras.random.normal((3,), seed=generator)
    # Cross-replica context (in scope, outside strategy.run): unchanged.
    np.testing.assert_array_equal(keras.random.normal((3,), seed=in_scope),
                                  plain)
    per_replica = strategy.run(
        tf.function(lambda: keras.random.normal((3,), seed=in_scope)))
    local = strategy.experimental_local_results(per_replica)
    np.testing.assert_array_equal(
        local[0], keras.random.normal((3,), seed=generator))
    assert not np.array_equal(local[0], local[1])

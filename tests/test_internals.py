"""Canary: every private Keras/TF attribute kerasdist uses still exists."""

import collectives
import pytest

from kerasdist import _internals


def test_every_private_attribute_exists():
    missing = _internals.check_canaries()
    assert not missing, "\n".join(missing)


def test_the_test_helpers_private_attributes_exist():
    missing = [m for m in (c.missing() for c in collectives.CANARIES) if m]
    assert not missing, "\n".join(missing)


def test_canary_names_the_missing_attribute():
    class StandIn:
        _get_iterator = None

    ok = _internals.missing_attribute(StandIn, "_get_iterator", "resume")
    gone = _internals.missing_attribute(StandIn, "_enumerate_iterator",
                                        "step-exact resume", "TFEpochIterator")
    assert ok is None
    assert gone.startswith("TFEpochIterator._enumerate_iterator no longer")
    assert "step-exact resume" in gone


def test_canary_names_a_missing_module():
    canary = _internals.Canary("keras.src.no_such_module:Thing", "_x", "demo")
    message = canary.missing()
    assert "keras.src.no_such_module:Thing is gone" in message


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2", None])
def test_check_int_rejects(value):
    from kerasdist._validate import check_int

    with pytest.raises(ValueError, match=r"argument `keep`\. Received: keep="):
        check_int("keep", value)


def test_check_int_accepts_numpy_integers():
    import numpy as np

    from kerasdist._validate import check_int

    assert check_int("keep", np.int64(3)) == 3
    assert type(check_int("keep", np.int32(3))) is int


def test_instance_attribute_assigned_in_source_counts_as_present():
    class Owner:
        def __init__(self):
            self._made_in_init = 1

    assert _internals.missing_attribute(Owner, "_made_in_init", "x") is None
    gone = _internals.missing_attribute(Owner, "_made", "demo", "Owner")
    assert gone.startswith("Owner._made no longer exists")


def test_canary_with_make_checks_the_built_instance():
    canary = _internals.Canary(
        "keras:Input", "_keras_historyX", "producing_layer",
        make=lambda keras_input: keras_input((1,)),
    )
    message = canary.missing()
    assert message.startswith("keras:Input._keras_historyX no longer")
    assert "producing_layer" in message


def test_every_private_use_has_a_canary():
    used = {c.used_by for c in _internals.CANARIES}
    for name in ("num_workers", "make_per_replica", "host_address_space",
                 "serialized_dataset_graph",
                 "learning_rate_attribute", "accumulators",
                 "distributed_update_step", "nodes_by_depth",
                 "reinitialize_variable", "compute_loss", "loss_tracker",
                 "_internals.in_keras_symbolic_build",
                 "_internals.dataset_batching"):
        assert name in used, name


def test_dataset_batching_reads_the_batch_op():
    import tensorflow as tf

    found = _internals.dataset_batching(
        tf.data.Dataset.range(10).batch(4).map(lambda b: b * 2).prefetch(1))
    assert (found.batch_size, found.drop_remainder, found.examples,
            found.same_batches) == (4, False, 10, True)
    dropped = _internals.dataset_batching(
        tf.data.Dataset.range(10).batch(4, drop_remainder=True).repeat())
    assert (dropped.drop_remainder, dropped.same_batches) == (True, True)
    # `take` after batching: the batch op's last batch is not the dataset's.
    taken = _internals.dataset_batching(tf.data.Dataset.range(10).batch(4)
                                        .take(2))
    assert not taken.same_batches
    assert _internals.dataset_batching(tf.data.Dataset.range(3)) is None

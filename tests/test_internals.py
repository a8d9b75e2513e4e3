"""Canary: every private Keras/TF attribute kerasdist uses still exists."""

import pytest

from kerasdist import _internals


def test_every_private_attribute_exists():
    missing = _internals.check_canaries()
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

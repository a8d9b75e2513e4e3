"""Logical CPU devices and device validation."""

import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf
from conftest import NUM_CPUS

import kerasdist as kd


def test_virtual_cpus_configured_for_the_session():
    assert len(tf.config.list_logical_devices("CPU")) == NUM_CPUS
    # Same count again is a harmless no-op.
    assert len(kd.virtual_cpus(NUM_CPUS)) == NUM_CPUS


def test_virtual_cpus_after_initialisation_is_a_clear_error():
    tf.constant(1.0)  # TF devices are initialised by now.
    with pytest.raises(RuntimeError) as e:
        kd.virtual_cpus(2)
    msg = str(e.value)
    assert "kd.virtual_cpus(2) was called after TensorFlow initialised" in msg
    assert f"with {NUM_CPUS} CPU device(s)" in msg
    assert "KERASDIST_VIRTUAL_CPUS=2" in msg


@pytest.mark.parametrize("n", [0, -1, 2.0, True, "2"])
def test_virtual_cpus_rejects_bad_counts(n):
    with pytest.raises(ValueError, match=r"Invalid value for argument `n`"):
        kd.virtual_cpus(n)


def test_virtual_cpus_in_a_fresh_process_gives_n_devices():
    code = textwrap.dedent("""
        import kerasdist as kd, tensorflow as tf
        kd.virtual_cpus(3)
        print(len(tf.config.list_logical_devices("CPU")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "3"


def test_check_devices_names_missing_device():
    assert kd.devices.check_devices(["/cpu:1", "CPU:3"])[1].endswith("CPU:3")
    with pytest.raises(ValueError) as e:
        kd.devices.check_devices(["/cpu:0", "/gpu:7"])
    assert "Device '/gpu:7' does not exist on this host" in str(e.value)
    assert "cpu:3" in str(e.value)

"""examples/local_sgd.py runs and learns, synchronous and local, and its
tfds code path works on mock data (no download)."""

import os
import re
import subprocess
import sys

import pytest

from kerasdist.testing import kill_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "local_sgd.py")
MOCK_TFDS = """
import os, runpy, sys
import tensorflow_datasets as tfds
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
with tfds.testing.mock_data(num_examples=128):
    runpy.run_path(script, run_name="__main__")
"""


def _run(argv, timeout=400):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, grace=2.0)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s:\n{out[-4000:]}")
    finally:
        kill_group(proc, grace=1.0)
    assert proc.returncode == 0, out[-6000:]
    lines = [x for x in out.splitlines() if x.startswith("result:")]
    assert len(lines) == 1, out[-4000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_sgd_example_learns_with_8x_fewer_all_reduces():
    common = [sys.executable, SCRIPT, "--num_virtual_cpus=4",
              "--num_examples=2048", "--epochs=2"]
    sync = _run(common + ["--sync_every=0"])
    local = _run(common + ["--sync_every=8", "--outer=diloco",
                           "--pseudo_gradient_compression=int8"])
    counts = [int(re.search(r"(\d+) all-reduces", x).group(1))
              for x in (sync, local)]
    assert counts == [64, 8], (sync, local)
    for line in (sync, local):
        assert float(re.search(r"test accuracy ([0-9.]+)", line).group(1)) \
            > 0.8, line


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_sgd_example_tfds_code_path_with_mock_data():
    line = _run([sys.executable, "-c", MOCK_TFDS, SCRIPT, "--dataset=mnist",
                 "--num_virtual_cpus=2", "--epochs=1", "--steps_per_epoch=2",
                 "--sync_every=2"])
    assert "local SGD H=2" in line and "1 all-reduces" in line, line

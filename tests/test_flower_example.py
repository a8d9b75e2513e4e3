"""examples/federated.py runs Flower's simulation and the global model
learns round over round."""

import os
import re
import subprocess
import sys

import pytest

from kerasdist.testing import kill_group

pytest.importorskip("flwr")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "federated.py")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_federated_example_learns_round_over_round():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--num_clients=4", "--rounds=3",
         "--num_examples=2000", "--fl_strategy=diloco"],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        kill_group(proc, grace=2.0)
        out, _ = proc.communicate()
        pytest.fail(f"timed out:\n{out[-4000:]}")
    finally:
        kill_group(proc, grace=1.0)
    assert proc.returncode == 0, out[-6000:]
    line = [x for x in out.splitlines() if x.startswith("result:")]
    assert len(line) == 1, out[-4000:]
    curve = [float(v) for v in re.search(r"per round \[(.*)\]",
                                         line[0]).group(1).split(",")]
    assert len(curve) == 4  # before round 1, after rounds 1..3
    assert curve[-1] > curve[0] + 0.3, line[0]
    assert curve[-1] > 0.8, line[0]

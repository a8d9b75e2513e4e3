"""Sparse gradients are merged across replicas before the optimizer.

Issue 23.4: TensorFlow all-reduces an `IndexedSlices` gradient by
concatenating the replicas' slices, so a position embedding looked up with
`ops.arange` got each index once per replica, and Keras's Adam squared the
pieces before adding them: the first update was 0.014 / 0.009 / 0.011 on
2 / 4 / 8 replicas instead of one device's 0.100. The 2-replica and
2-worker cases run with the client patterns (`patterns.EXACT`); this file
checks 2, 4 and 8 replicas in a process with 8 virtual CPUs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = r"""
import json, sys
import kerasdist as kd
kd.virtual_cpus(8)
import numpy as np
sys.path.insert(0, sys.argv[1])
import patterns
out = {}
for n in (1, 2, 4, 8):
    strategy = (kd.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
                if n > 1 else None)
    result = patterns.position_embedding_adam(strategy, epochs=1)
    out[n] = {k: v.tolist() for k, v in result.items()}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.timeout(600)
def test_adam_on_position_embedding_equals_one_device_at_2_4_8():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, os.path.join(HERE, "clients")],
        capture_output=True, text=True, env=env, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines()
                if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    one = results["1"]
    for replicas in ("2", "4", "8"):
        for name, want in one.items():
            # Summation order differs with the replica count.
            np.testing.assert_allclose(
                results[replicas][name], want, rtol=1e-5, atol=1e-6,
                err_msg=f"{name} at {replicas} replicas")

"""kd.callbacks.LocalSGD with two real workers on 127.0.0.1 under
MultiWorkerMirroredStrategy (see local_sgd_worker.py)."""

import json
import os

import numpy as np
import pytest

from kerasdist.testing import run_workers

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "local_sgd_worker.py")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_local_sgd_syncs_counts_and_resumes_exactly(tmp_path):
    run_workers([WORKER, str(tmp_path)], 2, timeout=540)
    logs = [json.loads((tmp_path / f"worker{r}.json").read_text())
            for r in (0, 1)]
    weights = [dict(np.load(tmp_path / f"worker{r}.npz")) for r in (0, 1)]
    steps = 3 * 8
    # Weights agree right after each sync (every 4 steps), differ between.
    for step, (a, b) in enumerate(
        zip(logs[0]["sums"], logs[1]["sums"], strict=True), start=1
    ):
        if step % 4 == 0:
            assert a == b, step
        else:
            assert a != b, step
    # All-reduces, counted on the collective: 4x fewer than synchronous.
    assert logs[0]["sync_calls"] == steps
    assert logs[0]["local_calls"] == steps // 4 == logs[0]["syncs"]
    # Both workers end with the same weights; the run interrupted mid-round
    # (backup at step 9, round step 1) and resumed equals the reference.
    for key, value in weights[0].items():
        np.testing.assert_array_equal(value, weights[1][key])
    for i in range(sum(k.startswith("ref") for k in weights[0])):
        np.testing.assert_allclose(weights[0][f"res{i}"],
                                   weights[0][f"ref{i}"], rtol=1e-6,
                                   atol=1e-7)

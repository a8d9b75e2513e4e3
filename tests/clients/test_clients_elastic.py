"""Issue 25.1: under an elastic launcher the partial last batch is checked
at every allowed group size before the first step, as a permanent error.

15 examples with a global batch of 6 leave a last batch of 3: it splits
over 3 workers but not over 2, so a 3-worker job that loses a host would
fail after the shrink. It is refused at once, on 3 real workers under
`kerasdist-run --min_workers 2`, with exit 78 (not retried) and advice
that works at both sizes.
"""

import os

import processes
import pytest

from kerasdist.launch import protocol

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_partial_batch_refused_at_start_for_every_elastic_size(tmp_path):
    code, log = processes.launch(
        ["--num_workers", "3", "--min_workers", "2", "--max_restarts", "2",
         "--log_dir", str(tmp_path)],
        [os.path.join(HERE, "elastic_batch_worker.py")], 360)
    assert code == protocol.PERMANENT_EXIT_CODE, log[-6000:]
    assert "worker trained" not in log  # no worker reached its fit
    assert "UnevenBatchError" in log, log[-6000:]
    assert "at 2 worker(s) = 2 replicas" in log
    assert "(e.g. the first 12 examples)" in log

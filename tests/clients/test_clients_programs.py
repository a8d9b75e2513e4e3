"""The ten programs of issue 23 on 2 virtual CPUs and on 2 workers.

One device's results are computed once in this process; the 2 virtual
CPUs run here too, and the 2 workers in one `kerasdist-run` launch that
runs every program in turn (`programs_worker.py`). Each program's
tolerance is stated in `programs.PROGRAMS`.
"""

import json
import os

import numpy as np
import patterns
import processes
import programs
import pytest

import kerasdist as kd

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "programs_worker.py")
TIMEOUT = 900
NAMES = sorted(programs.PROGRAMS)


@pytest.fixture(scope="module")
def one_device():
    return {name: programs.run(name, None) for name in NAMES}


@pytest.fixture(scope="module")
def virtual():
    strategy = kd.MirroredStrategy(devices=["/cpu:0", "/cpu:1"])
    return {name: programs.run(name, strategy) for name in NAMES}


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("programs")
    code, log = processes.launch(
        ["--num_workers", "2", "--max_restarts", "0", "--log_dir",
         str(out / "logs")], [WORKER, str(out)], TIMEOUT)
    errors = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert code == 0, (errors, log[-8000:])
    return {name: [dict(np.load(out / f"{name}-worker{rank}.npz"))
                   for rank in (0, 1)] for name in NAMES}


def _last_loss(result):
    keys = [k for k in result if k.startswith("history_")
            and k.endswith("loss") and "val_" not in k]
    return {k: result[k][-1] for k in keys}


def _check(actual, expected, tolerance):
    if isinstance(tolerance, programs.Exact):
        patterns.assert_same(actual, expected, rtol=tolerance.rtol,
                             atol=tolerance.atol)
        return
    assert sorted(actual) == sorted(expected)
    losses, expected_losses = _last_loss(actual), _last_loss(expected)
    assert losses, sorted(actual)
    for key, value in losses.items():
        assert np.isfinite(value), key
        np.testing.assert_allclose(value, expected_losses[key],
                                   rtol=tolerance.loss_rtol, err_msg=key)


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("name", NAMES)
def test_program_on_2_virtual_cpus(name, one_device, virtual):
    _check(virtual[name], one_device[name], programs.PROGRAMS[name][1])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("name", NAMES)
def test_program_on_2_workers(name, one_device, virtual, workers):
    w0, w1 = workers[name]
    patterns.assert_same(w1, w0, rtol=0, atol=0)
    tolerance = programs.PROGRAMS[name][1]
    _check(w0, one_device[name], tolerance)
    if isinstance(tolerance, programs.Close):
        # The same global replica ids draw the same numbers: 2 workers
        # train as 2 virtual CPUs do.
        patterns.assert_same(w0, virtual[name], rtol=1e-3, atol=1e-4)

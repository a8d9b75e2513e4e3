"""Model parallelism across worker processes (kd.placement.join_cluster).

Real processes under `kerasdist-run`: the chief pipelines or places a model
over workers 1 and 2 (tests/placement_worker.py); the final weights equal
the unsplit model trained in this process, every model and optimizer
variable lives on its stage's worker and none on the chief, and the
servers exit 0 when the chief is done. Recovery: a stage worker or the
chief SIGKILLed mid-epoch, and BackupAndRestore resumes to the same
weights as the unfailed run.
"""

import json
import os
import subprocess
import sys

import numpy as np
import placement_worker
import pytest
import tensorflow as tf
from test_examples import run

import kerasdist as kd

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "placement_worker.py")
# One group run trains each scenario in a few seconds; TensorFlow's import
# and start-up on a loaded 2-core machine take most of the bound.
GROUP_TIMEOUT = 300


def launch(out, *args, max_restarts=0, env=None, num_workers=3,
           hosts=None):
    """Runs the worker script as `num_workers` workers under kerasdist-run.

    With `hosts` (`--hosts` of kerasdist-run, e.g. emulated hosts on
    127.0.0.x), the workers are spread over those hosts instead.

    Returns:
        (exit status, output); fails the test on timeout.
    """
    os.makedirs(out, exist_ok=True)
    where = (["--hosts", hosts] if hosts
             else ["--num_workers", str(num_workers)])
    argv = [
        sys.executable, "-m", "kerasdist.launch", *where,
        "--max_restarts", str(max_restarts), "--",
        sys.executable, WORKER, "--out", str(out), *args,
    ]
    return run(argv, GROUP_TIMEOUT, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    code, output = launch(out)
    assert code == 0, output[-6000:]
    return out, output


def result(out, scenario):
    with open(os.path.join(out, f"{scenario}.json")) as f:
        res = json.load(f)
    with np.load(os.path.join(out, f"{scenario}.npz")) as z:
        weights = [z[f"arr_{i}"] for i in range(len(z.files))]
    return res, weights


def assert_weights_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(
            g, w, rtol=1e-5, atol=1e-5, err_msg=f"weight {i}"
        )


@pytest.mark.parametrize("scenario", placement_worker.SCENARIOS)
def test_weights_equal_the_unsplit_model(trained, scenario):
    _, weights = result(trained[0], scenario)
    assert_weights_equal(weights, placement_worker.reference(scenario))


@pytest.mark.parametrize("scenario", placement_worker.SCENARIOS)
def test_model_and_optimizer_state_on_stage_workers(trained, scenario):
    res, _ = result(trained[0], scenario)
    placement_worker.assert_on_stage_workers(res["placement"])


def test_each_layer_on_the_planned_stage(trained):
    table = result(trained[0], "pipeline")[0]["placement"]["model"]
    assert {k: v[-1] for k, v in table.items()} == {
        "mlp/d0/kernel": "1", "mlp/d0/bias": "1",
        "mlp/d1/kernel": "1", "mlp/d1/bias": "1",
        "mlp/d2/kernel": "2", "mlp/d2/bias": "2",
        "mlp/d3/kernel": "2", "mlp/d3/bias": "2",
    }


def test_devices_named_in_tf_config_order(trained):
    res, _ = result(trained[0], "pipeline")
    assert res["devices"] == [
        f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in range(3)
    ]


def test_servers_exit_zero_when_the_chief_is_done(trained):
    # SUCCEEDED: every worker, servers included, exited 0 on its own.
    output = trained[1]
    assert "SUCCEEDED after 1 attempt(s)" in output, output[-4000:]
    assert "model-parallel server exits 1" not in output
    assert "Failed to remove function remotely" not in output


def test_second_call_is_refused(trained):
    with open(os.path.join(trained[0], "second_call.txt")) as f:
        message = f.read()
    assert "join_cluster() was called twice" in message, message


def test_cluster_of_one_is_refused(monkeypatch):
    for name in ("TF_CONFIG", "SLURM_PROCID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="at least 2 workers. Received: 1"):
        kd.placement.join_cluster()


def test_call_after_tensorflow_started_is_refused(monkeypatch):
    tf.constant(1.0)  # TensorFlow's runtime now runs in this process.
    monkeypatch.setenv("TF_CONFIG", json.dumps(kd.cluster.make_tf_config(
        ["127.0.0.1:1", "127.0.0.1:2"], 0)))
    with pytest.raises(RuntimeError, match="after TensorFlow initialised"):
        kd.placement.join_cluster()


def _alone(task_index, timeout):
    """Starts join_cluster() as one task of a 2-worker cluster, alone."""
    config = kd.cluster.make_tf_config(2, task_index)
    code = (
        "import kerasdist as kd\n"
        f"kd.placement.join_cluster(timeout={timeout})\n"
    )
    env = dict(os.environ, TF_CONFIG=json.dumps(config),
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture(scope="module")
def alone():
    """(exit status, stderr) of a chief and of a server, each alone.

    Started together (each imports TensorFlow, then waits 2 s).
    """
    procs = {"chief": _alone(0, timeout=2), "server": _alone(1, timeout=2)}
    results = {}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        results[name] = (proc.returncode, err)
    return results


def test_worker_that_never_answers_is_named(alone):
    code, err = alone["chief"]
    assert code == 1, err
    assert "TimeoutError" in err
    assert "worker 1 at 127.0.0.1:" in err
    assert "did not answer within timeout=2 s" in err


def test_server_without_chief_exits_non_zero(alone):
    code, err = alone["server"]
    assert code == 1, err
    assert "the chief did not connect within 2 s" in err


@pytest.mark.parametrize("victim", ["stage", "chief"])
def test_sigkill_mid_epoch_resumes_to_the_unfailed_weights(
    tmp_path, victim
):
    # The chief SIGKILLs worker 2 (a stage) or itself at step 5 of 8, after
    # the backup of step 4; the launcher restarts the group once.
    code, output = launch(
        tmp_path, "--scenarios", "pipeline", "--backup",
        str(tmp_path / "backup"), "--kill", victim, max_restarts=1,
    )
    assert code == 0, output[-6000:]
    killed = "worker-2" if victim == "stage" else "worker-0"
    assert f"{killed} died (SIGKILL)" in output, output[-4000:]
    res, weights = result(tmp_path, "pipeline")
    assert res["attempt"] == 1
    assert_weights_equal(weights, placement_worker.reference("pipeline"))
    assert set(res["placement"]["model"].values()) == {
        "/job:worker/task:1", "/job:worker/task:2"
    }

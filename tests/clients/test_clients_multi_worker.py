"""User code patterns on 2 real workers under `kerasdist-run`.

One worker start-up runs every pattern (`clients_worker.py`) while this
process computes one device's results; each test then checks one thing a
user would see: both workers end with the same
weights, equal to one device where the math allows, or a clear error
before the first step, and no worker crashes.
"""

import json
import os
import sys

import numpy as np
import patterns
import processes
import pytest

import kerasdist as kd
from kerasdist import cluster

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "clients_worker.py")
TIMEOUT = 1200


def _one_device(directory):
    """What the tests compare the workers with, computed in this process
    (every pattern seeds its own weights and draws)."""
    results = {name: fn(None) for name, fn in patterns.EXACT.items()}
    results.update({f"even_{case}": patterns.uneven(None, case)
                    for case in patterns.EVEN})
    results["jit"] = patterns.jit(None)
    results["hand_loss_unscaled"] = patterns.hand_loss(
        None, scale=False, learning_rate=0.2)
    results["file_callbacks"] = patterns.file_callbacks(None, directory)
    results["random_streams"] = patterns.random_streams(None)
    results["random_streams_virtual"] = patterns.random_streams(
        kd.MirroredStrategy(devices=["/cpu:0", "/cpu:1"]))
    return results


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The launch of every pattern on 2 workers, and one device's results,
    computed here while the workers start and train."""
    out = tmp_path_factory.mktemp("clients")
    background = processes.Background(
        ["--num_workers", "2", "--max_restarts", "0", "--log_dir",
         str(out / "logs")], [WORKER, str(out), "all"], TIMEOUT)
    try:
        one_device = _one_device(str(tmp_path_factory.mktemp("one_device")))
        code, log = background.result()
    finally:
        background.stop()
    assert code == 0, log[-8000:]

    def load(name, rank):
        return dict(np.load(out / f"{name}-worker{rank}.npz"))

    checks = [json.loads((out / f"checks-worker{r}.json").read_text())
              for r in (0, 1)]
    return {"dir": out, "load": load, "checks": checks, "log": log,
            "one_device": one_device}


def _both(run, name):
    w0, w1 = run["load"](name, 0), run["load"](name, 1)
    patterns.assert_same(w1, w0, rtol=0, atol=0)
    return w0


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("name", sorted(patterns.EXACT))
def test_pattern_matches_one_device(run, name):
    patterns.assert_same(_both(run, name), run["one_device"][name])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_bn_dropout_workers_agree(run):
    w0, w1 = run["load"]("bn_dropout", 0), run["load"]("bn_dropout", 1)
    # BatchNormalization's moving mean/variance (w4, w5) are updated from
    # each worker's own examples and are not all-reduced (Keras 3 creates
    # them with aggregation="none"): they differ between workers, as with
    # TensorFlow's strategy. Everything that is all-reduced agrees.
    for key in sorted(set(w0) - {"w4", "w5"}):
        np.testing.assert_array_equal(w1[key], w0[key], err_msg=key)
    losses = w0["history_loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert np.isfinite(w0["eval_loss"])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_strategy_is_handed_back_and_guide_resumes(run):
    for checks in run["checks"]:
        assert checks["same_strategy"] is True
    first = _both(run, "guide_first")
    second = _both(run, "guide_second")
    assert not first["restored"] and second["restored"]
    # The second run_training() starts where the first one ended.
    for i in range(2):
        np.testing.assert_array_equal(second[f"start{i}"], first[f"w{i}"])
    assert sorted(os.listdir(run["dir"] / "guide_ckpt")) == ["ckpt-1.keras"]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_other_cluster_in_same_process_raises(run):
    for checks in run["checks"]:
        error = checks["other_cluster"]
        assert error["type"] == "MultiWorkerStrategyConflictError"
        assert "already has a kd.MultiWorkerMirroredStrategy" in (
            error["message"])
        assert "'127.0.0.1:1', '127.0.0.1:2'" in error["message"]
        assert "Reuse the first strategy" in error["message"]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_unscaled_custom_step_warned_and_2x(run):
    for checks in run["checks"]:
        assert len(checks["unscaled_warnings"]) == 1
        assert "kd.scale_loss(loss)" in checks["unscaled_warnings"][0]
    patterns.assert_same(
        _both(run, "hand_loss_unscaled"),
        run["one_device"]["hand_loss_unscaled"])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_unbuilt_optimizers_refused(run):
    for checks in run["checks"]:
        assert checks["gan_unbuilt"]["type"] == "UnbuiltOptimizerError"
        assert "self.d_optimizer.build(" in checks["gan_unbuilt"]["message"]
        assert ("optimizer.build(model.trainable_variables) inside `with "
                "strategy.scope():`" in checks["unbuilt_loop"]["message"])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("case", sorted(patterns.UNEVEN))
def test_uneven_batches_refused_without_crash(run, case):
    n, batch, how = patterns.UNEVEN[case]
    for checks in run["checks"]:
        error = checks[f"uneven_{case}"]
        assert error is not None, case
        # Refused before the first step, datasets included (their sizes are
        # read once: issue 23.9), naming the training data and the fix.
        assert error["type"] == "UnevenBatchError"
        assert error["message"].startswith(
            "Invalid value for argument `batch_size`. Received: "
            f"batch_size={batch}")
        assert "2 replicas in sync (2 workers x 1 device(s))" in (
            error["message"])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("case", sorted(patterns.EVEN))
def test_even_batches_match_one_device(run, case):
    patterns.assert_same(_both(run, f"even_{case}"),
                         run["one_device"][f"even_{case}"])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_jit_compile_falls_back_with_warning(run):
    for checks in run["checks"]:
        assert len(checks["jit_warnings"]) == 1
        assert "kerasdist trains this model without XLA" in (
            checks["jit_warnings"][0])
    patterns.assert_same(_both(run, "jit"), run["one_device"]["jit"])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_keras_file_callbacks_work_unchanged(run):
    files = run["dir"] / "files"
    assert sorted(os.listdir(files)) == [
        "ckpt-1.keras", "ckpt-2.keras", "log.csv"]
    lines = (files / "log.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,") and len(lines) == 3
    patterns.assert_same(_both(run, "file_callbacks"),
                         run["one_device"]["file_callbacks"])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_keras_backup_and_restore_refused(run):
    for checks in run["checks"]:
        error = checks["keras_backup"]
        assert error["type"] == "KerasBackupAndRestoreError"
        assert "Replace it with kd.callbacks.BackupAndRestore(" in (
            error["message"])
    assert not os.path.exists(run["dir"] / "keras_backup")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_strategy_after_tf_op_says_what_to_move(tmp_path):
    env = processes.env()
    env["TF_CONFIG"] = json.dumps(cluster.make_tf_config(2, 0))
    code, log = processes.run_logged(
        [sys.executable, WORKER, str(tmp_path), "after_startup"], 150, env)
    assert code == 0, log[-4000:]
    error = json.loads((tmp_path / "after_startup.json").read_text())
    assert error["type"] == "CollectivesAfterStartupError"
    assert "Collective ops must be configured at program startup" in (
        error["message"])
    assert ("Move `strategy = kd.get_strategy(\"multi_worker\")`" in
            error["message"])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_unseeded_shuffle_warned_before_step_1(run):
    for checks in run["checks"]:
        assert len(checks["shuffle_warnings_seed_None"]) == 1
        message = checks["shuffle_warnings_seed_None"][0]
        assert "sharded by data over 2 workers" in message
        assert "dataset.shuffle(buffer_size, seed=1)" in message
        assert checks["shuffle_warnings_seed_1"] == []


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_backup_refuses_an_unseeded_shuffle_before_step_1(run):
    # Issue 23.7: each worker would shuffle its own way, so no resume can
    # read the same batches; refused before the first step, naming the fix.
    for checks in run["checks"]:
        error = checks["backup_shuffle_seed_None"]
        assert error["type"] == "BackupConfigError", error
        assert error["message"].startswith(
            "Invalid value for argument `x` of `fit`: the dataset shuffles "
            "without a seed and is sharded by data over 2 workers")
        assert "dataset.shuffle(buffer_size, seed=1)" in error["message"]
        assert checks["backup_shuffle_seed_1"] is None


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_each_worker_draws_its_own_random_numbers(run):
    # Issue 23.3: worker 1 is global replica 1; worker 0 draws what one
    # device draws, and what replica 1 of 2 virtual CPUs draws is what
    # worker 1 draws (the stream follows the global replica id).
    w0, w1 = run["load"]("random_streams", 0), run["load"]("random_streams", 1)
    assert not np.array_equal(w0["z0"], w1["z0"])
    assert not np.array_equal(w0["mask0"], w1["mask0"])
    one = run["one_device"]["random_streams"]
    np.testing.assert_array_equal(w0["z0"], one["z0"])
    np.testing.assert_array_equal(w0["mask0"], one["mask0"])
    virtual = run["one_device"]["random_streams_virtual"]
    np.testing.assert_array_equal(w1["z0"], virtual["z1"])
    np.testing.assert_array_equal(w1["mask0"], virtual["mask1"])
    # The all-reduced weights agree across workers and with 2 replicas.
    for key in ("w0", "w1"):
        np.testing.assert_array_equal(w1[key], w0[key])
        np.testing.assert_allclose(w0[key], virtual[key], rtol=1e-5,
                                   atol=1e-6)

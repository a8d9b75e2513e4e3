"""kd.callbacks.LocalSGD(dynamic_steps=True): a slow worker no longer holds
the others.

Two real workers under kerasdist-run, the second in its own cpu cgroup
with a CPU quota (see straggler_worker.py); and, in one process, the bad
input refused before step 1 and the backup refused mid-round.
"""

import io
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasdist as kd
from kerasdist.callbacks import _local_sgd_rounds
from kerasdist.testing import cgroups

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "straggler_worker.py")
STEPS = 160


def _launch(out, group):
    log = io.StringIO()
    # timeout: a worker silent for 4 minutes is hung (the run then fails).
    result = kd.launch.run(
        [sys.executable, WORKER, str(out), group.name, str(STEPS)],
        num_workers=2, max_restarts=0, timeout=240, stream=log)
    assert result.ok and result.attempts == 1, log.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_slowed_worker_runs_fewer_steps_and_the_average_weights_them(
        tmp_path):
    why = cgroups.cgroups_unavailable(("cpu",))
    if why:
        pytest.skip(f"no cpu cgroup here: {why}")
    # A twentieth of a core: clearly slower than the other worker even
    # when the machine is loaded by other jobs.
    with cgroups.cgroup(cpu_fraction=0.05) as group:
        _launch(tmp_path, group)
    fast, slow = (dict(np.load(tmp_path / f"worker{r}.npz")) for r in (0, 1))
    # The fastest worker ran every step of its epoch, the slowed one fewer,
    # in as many rounds; the first round is sync_every steps on both.
    assert fast["steps"].sum() == STEPS
    assert slow["steps"].sum() < STEPS * 0.8, slow["steps"]
    assert len(fast["steps"]) == len(slow["steps"])
    assert fast["steps"][0] == slow["steps"][0] == 8
    # Same weights on both workers after the last round.
    np.testing.assert_array_equal(fast["final"], slow["final"])
    np.testing.assert_array_equal(fast["synced"][-1], slow["synced"][-1])
    # Each sync is the sample-weighted average of the workers' local
    # weights: anchor + sum_i n_i (local_i - anchor) / sum_i n_i.
    anchor = fast["start"]
    ends = [np.cumsum(w["steps"]) - 1 for w in (fast, slow)]
    for r in range(len(fast["steps"])):
        n = [fast["steps"][r], slow["steps"][r]]
        locals_ = [fast["local"][ends[0][r]], slow["local"][ends[1][r]]]
        expected = anchor + sum(
            k * (w - anchor) for k, w in zip(n, locals_, strict=True)) / sum(n)
        np.testing.assert_allclose(fast["synced"][ends[0][r]], expected,
                                   rtol=1e-5, atol=1e-6, err_msg=f"round {r}")
        anchor = fast["synced"][ends[0][r]]
    # And it learns.
    assert fast["loss"][1] < fast["loss"][0] / 4, fast["loss"]


def _model(strategy, steps_per_execution=1):
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.05), "mse",
                      steps_per_execution=steps_per_execution)
    return model


def _dataset():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    return tf.data.Dataset.from_tensor_slices(
        (x, x.sum(axis=1, keepdims=True))).repeat().batch(8)


def test_dynamic_steps_must_be_a_bool():
    with pytest.raises(ValueError, match="dynamic_steps='yes'"):
        kd.callbacks.LocalSGD(4, dynamic_steps="yes")


@pytest.mark.parametrize("fit_kw, spe, match", [
    ({"epochs": 3, "steps_per_epoch": 8}, 1, "Received: epochs=3"),
    ({"epochs": 1, "steps_per_epoch": 8}, 2, "steps_per_execution=2"),
])
def test_bad_fit_settings_are_refused_before_step_one(fit_kw, spe, match):
    strategy = kd.MirroredStrategy(["/cpu:0"])
    model = _model(strategy, spe)
    before = model.get_weights()
    with pytest.raises(ValueError, match=match):
        model.fit(_dataset(), verbose=0, callbacks=[
            kd.callbacks.LocalSGD(4, dynamic_steps=True)], **fit_kw)
    assert int(model.optimizer.iterations.numpy()) == 0
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unknown_steps_are_refused_before_step_one():
    strategy = kd.MirroredStrategy(["/cpu:0"])
    model = _model(strategy)
    with pytest.raises(ValueError, match="steps_per_epoch=None"):
        # filter(): the number of batches is unknown.
        model.fit(_dataset().filter(lambda x, y: True), epochs=1,
                  verbose=0, callbacks=[
                      kd.callbacks.LocalSGD(4, dynamic_steps=True)])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_one_worker_trains_rounds_and_backs_up_only_at_epoch_end(tmp_path):
    strategy = kd.MirroredStrategy(["/cpu:0", "/cpu:1"])
    model = _model(strategy)
    sgd = kd.callbacks.LocalSGD(4, dynamic_steps=True)
    model.fit(_dataset(), epochs=1, steps_per_epoch=20, verbose=0,
              callbacks=[sgd, kd.callbacks.BackupAndRestore(
                  str(tmp_path / "epoch"), save_freq="epoch")])
    assert sum(sgd.local_steps) == 20
    assert sgd.local_steps[0] == 4
    # A step-based backup would read the workers' state mid-round.
    with pytest.raises(ValueError, match="save_freq='epoch'"):
        _model(strategy).fit(
            _dataset(), epochs=1, steps_per_epoch=20, verbose=0, callbacks=[
                kd.callbacks.LocalSGD(4, dynamic_steps=True),
                kd.callbacks.BackupAndRestore(str(tmp_path / "steps"),
                                              save_freq=2)])


def test_a_round_lasts_at_least_three_syncs():
    # Rows as all-gathered: [steps, seconds for sync_every steps, last,
    # recent sync seconds]. The budget is the fastest worker's 8 steps,
    # unless the sync (the smallest worker's time: the last to arrive
    # waits for nobody) is over a third of that.
    clock = _local_sgd_rounds.RoundClock(8)
    fast_sync = np.array([[8, 0.3, 0, 0.05], [4, 0.6, 0, 0.09]], "float32")
    assert not clock.agree(fast_sync, 0.05)
    assert clock.budget == pytest.approx(0.3)
    slow_sync = np.array([[8, 0.3, 0, 0.2], [4, 0.6, 1, 0.25]], "float32")
    assert clock.agree(slow_sync, 0.2)  # a worker's fit is on its last step
    assert clock.budget == pytest.approx(0.6)

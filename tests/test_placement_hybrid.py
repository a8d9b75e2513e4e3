"""Hybrid data × pipeline parallelism across worker processes.

One real group of 5 processes under `kerasdist-run`, on 3 emulated hosts
(127.0.0.1-3): the chief trains 2 pipeline replicas × 2 stages of a
4-layer MLP on workers 1-4 (replica r on host 127.0.0.(r+2))
(tests/placement_worker.py, scenario `hybrid`) under BackupAndRestore,
stops at step 5, and resumes in a new model from the backup of step 4.
The final weights equal the unsplit model trained in this process on the
same global batch; both replicas' copies are equal; every model variable
and optimizer slot lives on its replica's stage worker, none on the chief.
"""

import json
import os

import numpy as np
import placement_worker
import pytest
from test_placement_cluster import assert_weights_equal, launch

import kerasdist as kd

pytestmark = pytest.mark.slow

HOSTS = "127.0.0.1:1,127.0.0.2:2,127.0.0.3:2"
STAGES = [["/job:worker/task:1", "/job:worker/task:2"],
          ["/job:worker/task:3", "/job:worker/task:4"]]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid")
    # Emulated hosts: the chief on 127.0.0.1, replica r on 127.0.0.(r+2).
    code, output = launch(
        out, "--scenarios", "hybrid", "--backup", str(out / "backup"),
        hosts=HOSTS,
    )
    assert code == 0, output[-6000:]
    assert "SUCCEEDED after 1 attempt(s)" in output, output[-4000:]
    with open(os.path.join(out, "hybrid.json")) as f:
        res = json.load(f)
    weights = {}
    for name in ("hybrid", "hybrid_copy"):
        with np.load(os.path.join(out, f"{name}.npz")) as z:
            weights[name] = [z[f"arr_{i}"] for i in range(len(z.files))]
    return res, weights


def test_resumed_weights_equal_the_unsplit_model(hybrid):
    res, weights = hybrid
    # Stopped after 5 of 8 steps, resumed at step 4: 4 more steps.
    assert res["steps"] == [placement_worker.KILL_STEP, 4]
    assert_weights_equal(
        weights["hybrid"], placement_worker.reference("hybrid")
    )


def test_replicas_hold_equal_copies(hybrid):
    _, weights = hybrid
    assert_weights_equal(weights["hybrid_copy"], weights["hybrid"])


def test_each_replica_on_its_own_stage_workers(hybrid):
    res, _ = hybrid
    assert res["devices"] == [
        [f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in row]
        for row in ([1, 2], [3, 4])
    ]
    for table, workers in zip(res["placement"], STAGES, strict=True):
        by_layer = {k.split("/")[1]: v for k, v in table["model"].items()}
        assert by_layer == {"d0": workers[0], "d1": workers[0],
                            "d2": workers[1], "d3": workers[1]}, table
        for path, slots in table["slots"].items():
            assert len(slots) == 2, (path, slots)  # Adam's 2 moments
            assert set(slots) == {table["model"][path]}, (path, slots)
    # The step counter and learning rate: replica 0's first stage.
    assert set(res["optimizer"]) == {
        w for row in STAGES for w in row
    }, res["optimizer"]


def test_replicas_on_their_own_emulated_hosts(hybrid):
    res, _ = hybrid
    hosts = [address.rsplit(":", 1)[0] for address in res["addresses"]]
    assert hosts == ["127.0.0.1"] + ["127.0.0.2"] * 2 + ["127.0.0.3"] * 2


def test_time_plan_measures_the_link_between_workers(hybrid):
    # cost="time" over two workers' devices: the link is measured and the
    # table shows each stage's transfer time.
    res, _ = hybrid
    assert res["bandwidth"] > 0, res
    lines = res["timed_plan"].splitlines()
    assert "counted in the balance" in lines[0], lines
    assert lines[1].endswith("transfer/batch"), lines
    assert "worker:1/CPU:0" in lines[3] and "worker:2/CPU:0" in lines[4]


def test_evaluate_and_predict(hybrid):
    res, _ = hybrid
    assert np.isfinite(res["eval_loss"]) and res["eval_loss"] > 0
    assert np.isfinite(res["pred_sum"])


def test_batch_not_divisible_by_replicas_times_microbatches(hybrid):
    res, _ = hybrid
    assert "batch_size=6, which 2 replicas × num_microbatches=2 = 4" in (
        res["bad_batch"]
    ), res["bad_batch"]


@pytest.mark.parametrize(
    "devices, message",
    [
        ("/cpu:0", "not a list of lists"),
        ([["/cpu:0", "/cpu:1"], ["/cpu:2"]], r"ragged: rows of \[2, 1\]"),
        ([], "no device"),
        ([["/cpu:0"], ["/cpu:0"]], r"\['/cpu:0'\] named more than once"),
        (["/cpu:0", "/cpu:1"], "row '/cpu:0' is not a list"),
    ],
)
def test_bad_device_grid_is_refused_before_anything(devices, message):
    model, _, _ = placement_worker.build("hybrid")
    with pytest.raises(ValueError, match=message):
        kd.placement.HybridPipelineModel(model, devices)


def test_pipeline_model_points_a_device_grid_to_the_hybrid_model():
    model, _, _ = placement_worker.build("hybrid")
    with pytest.raises(ValueError, match="use kd.placement.HybridPipeline"):
        kd.placement.PipelineModel(model, [["/cpu:0"], ["/cpu:1"]])


def test_local_hybrid_trains_saves_and_loads(tmp_path):
    # The same 2 × 2 hybrid on this process's virtual CPUs, then its
    # weights file loaded into a new hybrid model started from zeros.
    grid = [["/cpu:0", "/cpu:1"], ["/cpu:2", "/cpu:3"]]
    model, opt, m = placement_worker.build("hybrid")
    hybrid = kd.placement.HybridPipelineModel(model, grid, m)
    hybrid.compile(optimizer=opt, loss="mse")
    x, y = placement_worker.data()
    hybrid.fit(x, y, batch_size=placement_worker.BATCH,
               epochs=placement_worker.EPOCHS, shuffle=False, verbose=0)
    assert_weights_equal(
        model.get_weights(), placement_worker.reference("hybrid")
    )
    path = str(tmp_path / "hybrid.weights.h5")
    hybrid.save_weights(path)
    fresh, opt, m = placement_worker.build("hybrid")
    fresh.set_weights([0 * w for w in fresh.get_weights()])
    loaded = kd.placement.HybridPipelineModel(fresh, grid, m)
    loaded.load_weights(path)
    assert_weights_equal(loaded.get_weights(), hybrid.get_weights())
    assert len(loaded.get_weights()) == 2 * len(model.get_weights())

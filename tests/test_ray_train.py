"""Keras 3 training under Ray Train on a real local multi-node Ray cluster
(`ray.cluster_utils.Cluster`: a head and three 1-CPU nodes on 127.0.0.1)."""

import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fault_worker import lineage, read_steps, retrained

# Keep Ray on the loopback address: by default it replaces 127.0.0.1 with
# the host's outward address when connecting (resolve_ip_for_localhost in
# ray/_private/services.py); read when Ray is first imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="Ray not installed: pip install "
                          "'kerasdist[ray]'")

from ray import train  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
EPOCHS = 3
STEPS_PER_EPOCH = 12

pytestmark = [pytest.mark.real_component, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster():
    """Head (no trainer slot) + 3 nodes with one trainer slot each."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False,
                        "node_ip_address": "127.0.0.1"},
    )
    try:
        nodes = [
            cluster.add_node(num_cpus=1, resources={"trainer": 1},
                             node_ip_address="127.0.0.1")
            for _ in range(3)
        ]
        cluster.wait_for_nodes()
        assert cluster.address.startswith("127.0.0.1:"), cluster.address
        ray.init(address=cluster.address)
        assert all(n["NodeManagerAddress"] == "127.0.0.1"
                   for n in ray.nodes())
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def scaling(num_workers=2):
    return train.ScalingConfig(
        num_workers=num_workers,
        resources_per_worker={"CPU": 1, "trainer": 1},
    )


def test_ray_docs_example_with_kerasdist_lines_trains_on_two_workers(
    ray_cluster, tmp_path
):
    from ray_worker import docs_example

    from kerasdist.integrations.ray import KerasTrainer

    trainer = KerasTrainer(
        docs_example,
        train_loop_config={"epochs": 2, "backup_dir": str(tmp_path / "b")},
        scaling_config=scaling(2),
        run_config=train.RunConfig(storage_path=str(tmp_path / "results"),
                                   name="docs"),
    )
    result = trainer.fit()
    assert result.error is None
    assert result.metrics["global_step"] == 10  # 2 epochs x 5 steps
    assert np.isfinite(result.metrics["loss"])
    # The chief's backup became Ray's checkpoint.
    with result.checkpoint.as_directory() as d:
        assert any(n.endswith(".npz") or n.startswith("ckpt")
                   for n in os.listdir(d)), os.listdir(d)


def reference_weights(out):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["PYTHONPATH"] = ROOT
    subprocess.run(
        [sys.executable, os.path.join(TESTS, "fault_worker.py"),
         "--out", str(out), "--backup_dir", str(out / "backup"),
         "--strategy", "one_device", "--epochs", str(EPOCHS)],
        env=env, check=True, timeout=600, capture_output=True,
    )
    with np.load(out / "final.npz") as f:
        return [f[k] for k in f.files]


def test_node_removed_mid_run_restarts_group_and_resumes_exactly(
    ray_cluster, tmp_path
):
    from ray_worker import fault_job

    from kerasdist.integrations.ray import KerasTrainer

    cluster, nodes = ray_cluster
    want = reference_weights(tmp_path / "reference")
    out = tmp_path / "out"
    trainer = KerasTrainer(
        fault_job,
        train_loop_config={
            "out": str(out), "backup_root": str(tmp_path / "backups"),
            "epochs": EPOCHS, "step_delay": 0.2,
        },
        scaling_config=scaling(2),
        run_config=train.RunConfig(
            storage_path=str(tmp_path / "results"), name="fault",
            failure_config=train.FailureConfig(max_failures=2),
        ),
    )
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.setdefault("result", trainer.fit()),
        daemon=True,
    )
    runner.start()
    # Remove the node of worker 1 once it is past the first backups.
    steps = out / "steps-0.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if steps.exists() and len(read_steps(steps)) >= STEPS_PER_EPOCH + 6:
            break
        time.sleep(0.5)
    else:
        pytest.fail("training did not reach the fault point")
    with open(out / "node-1-0.json") as f:
        victim_id = json.load(f)["node_id"]
    (victim,) = [n for n in nodes if n.node_id == victim_id]
    removed_at = time.time()
    cluster.remove_node(victim, allow_graceful=False)
    runner.join(timeout=900)
    assert not runner.is_alive(), "Ray did not finish after the restart"
    assert "result" in outcome, "Ray gave up (see the log above)"
    assert outcome["result"].error is None
    records = read_steps(steps)
    attempts = sorted({r["attempt"] for r in records})
    assert attempts == [0, 1], attempts
    before = [r for r in records if r["attempt"] == 0]
    resumed = [r for r in records if r["attempt"] == 1][0]
    # Resumed exactly at a backup (save_freq 4) Ray registered; at most
    # the steps since the last fully reported backup are trained again.
    done = (before[-1]["epoch"] * STEPS_PER_EPOCH + before[-1]["step"] + 1)
    resume_at = resumed["epoch"] * STEPS_PER_EPOCH + resumed["step"]
    assert resume_at % 4 == 0 and done - 8 <= resume_at <= done
    assert resume_at >= STEPS_PER_EPOCH  # not from scratch
    kept = lineage(records)
    assert [(r["epoch"], r["step"]) for r in kept] == [
        (e, s) for e in range(EPOCHS) for s in range(STEPS_PER_EPOCH)]
    with np.load(out / "final.npz") as f:
        got = [f[k] for k in f.files]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    restarted = (out / "node-0-1.json").stat().st_mtime - removed_at
    print(
        f"\nRay node loss: {retrained(records)} step(s) retrained; new "
        f"group started {restarted:.1f}s after the node was removed"
    )


def test_too_few_resources_is_a_clear_error_before_training(
    ray_cluster, tmp_path
):
    from ray_worker import docs_example

    from kerasdist.integrations.ray import KerasTrainer, RayResourcesError

    trainer = KerasTrainer(
        docs_example,
        train_loop_config={"epochs": 1, "backup_dir": str(tmp_path / "b")},
        scaling_config=scaling(5),
        run_config=train.RunConfig(storage_path=str(tmp_path / "results"),
                                   name="too_big"),
    )
    with pytest.raises(RayResourcesError) as err:
        trainer.fit()
    message = str(err.value)
    assert re.search(r"5 worker\(s\) need 5 (CPU|trainer)", message)
    assert "Lower num_workers" in message
    assert not (tmp_path / "b").exists()  # nothing trained, nothing written


def test_check_resources_counts_whole_workers_per_node():
    from kerasdist.integrations.ray import RayResourcesError, check_resources

    nodes = [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}]
    total = {"CPU": 2.5}
    check_resources(train.ScalingConfig(num_workers=2), total, nodes)
    # 2.5 CPUs in all, but only two nodes can hold a 1-CPU worker.
    with pytest.raises(RayResourcesError, match="room for 2 such worker"):
        check_resources(train.ScalingConfig(num_workers=3), total, nodes)
    # Elastic: the minimum must fit.
    check_resources(train.ScalingConfig(num_workers=(2, 8)), total, nodes)
    with pytest.raises(RayResourcesError, match="need 1 GPU"):
        check_resources(train.ScalingConfig(num_workers=1, use_gpu=True),
                        total, nodes)

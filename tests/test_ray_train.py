"""Keras 3 training under Ray Train on a real local multi-node Ray cluster
(`ray.cluster_utils.Cluster`: a head and three 1-CPU nodes on 127.0.0.1;
the elastic test adds its own nodes). Every Ray Train test of the project
is here, so that they share the one cluster (its start-up is slow)."""

import glob
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fault_worker import GLOBAL_BATCH, lineage, read_steps, retrained

# Keep Ray on the loopback address: by default it replaces 127.0.0.1 with
# the host's outward address when connecting (resolve_ip_for_localhost in
# ray/_private/services.py); read when Ray is first imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="Ray not installed: pip install "
                          "'kerasdist[ray]'")

from ray import train  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from kerasdist.testing import kill_group  # noqa: E402

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
        head_node_args={
            "num_cpus": 1, "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
            # A removed node is marked dead after ~5 s instead of ~15 s
            # (3 s x 5 missed health checks by default), so Ray rarely
            # schedules a restarted group onto it (which costs one more
            # restart: seen here with the defaults).
            "_system_config": {"health_check_period_ms": 1000,
                               "health_check_failure_threshold": 5},
        },
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


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.timeout(600)
def test_ray_reports_exactly_the_saves_on_update_boundaries(
    ray_cluster, tmp_path
):
    """The Ray Train `BackupAndRestore` reports exactly the saves that
    happened (its `on_backup_saved` hook). save_freq=3 with 2 accumulation
    steps: saves fall due at steps 3, 6, 9, ... and happen at the next
    optimizer update (4, 6, 10, ...). Ray gets one checkpoint per save, at
    its step, holding that save's file (reporting from
    optimizer.iterations would report steps 3 and 9 before any backup of
    them existed)."""
    from backup_hook_ray_worker import accumulating_job

    from kerasdist.integrations.ray import KerasTrainer

    out = tmp_path / "out"
    out.mkdir()
    result = KerasTrainer(
        accumulating_job,
        train_loop_config={"out": str(out), "save_freq": 3},
        scaling_config=scaling(2),
        run_config=train.RunConfig(storage_path=str(tmp_path / "results"),
                                   name="hook"),
    ).fit()
    assert result.error is None
    saves = _read_jsonl(out / "saves-0.jsonl")
    steps = [s["global_step"] for s in saves]
    assert steps == [4, 6, 10, 12, 16, 18, 22, 24, 24]
    assert [s["global_step"]
            for s in _read_jsonl(out / "saves-1.jsonl")] == steps
    reported = result.best_checkpoints
    assert [m["global_step"] for _, m in reported] == steps
    for (checkpoint, _), save in zip(reported, saves, strict=True):
        with checkpoint.as_directory() as d:
            assert save["file"] in os.listdir(d), (save, os.listdir(d))


@pytest.fixture
def start_reference():
    """Starts the unfailed one-device run of `fault_worker.py` in the
    background (it shares no resource with the Ray cluster) and returns a
    function that waits for it and returns its final weights; stopped
    after the test if it still runs."""
    started = []

    def start(out):
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        env["PYTHONPATH"] = ROOT
        out.mkdir(parents=True)
        with open(out / "reference.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, os.path.join(TESTS, "fault_worker.py"),
                 "--out", str(out), "--backup_dir", str(out / "backup"),
                 "--strategy", "one_device", "--epochs", str(EPOCHS)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        started.append(proc)

        def weights():
            try:
                code = proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                pytest.fail("the one-device reference run took over 600s")
            assert code == 0, (out / "reference.log").read_text()[-4000:]
            with np.load(out / "final.npz") as f:
                return [f[k] for k in f.files]

        return weights

    yield start
    for proc in started:
        kill_group(proc)


def test_node_removed_mid_run_restarts_group_and_resumes_exactly(
    ray_cluster, tmp_path, start_reference
):
    from ray_worker import fault_job

    from kerasdist.integrations.ray import KerasTrainer

    cluster, nodes = ray_cluster
    # The reference trains while Ray does.
    want = start_reference(tmp_path / "reference")
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
            failure_config=train.FailureConfig(max_failures=3),
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
    runs = attempt_runs(records)
    # Ray restarted the group after the loss: usually once; once more when
    # it first placed the new group on the node it had not yet found dead.
    assert len(runs) >= 2 and runs[0][0]["attempt"] == 0, [
        r[0]["attempt"] for r in runs]
    assert_resumed_at_backups(runs)
    kept = lineage(records)
    assert [(r["epoch"], r["step"]) for r in kept] == [
        (e, s) for e in range(EPOCHS) for s in range(STEPS_PER_EPOCH)]
    with np.load(out / "final.npz") as f:
        got = [f[k] for k in f.files]
    for a, b in zip(got, want(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    first_restart = runs[1][0]["attempt"]
    restarted = (
        out / f"node-0-{first_restart}.json").stat().st_mtime - removed_at
    print(
        f"\nRay node loss: {retrained(records)} step(s) retrained; new "
        f"group started {restarted:.1f}s after the node was removed"
    )


def attempt_runs(records):
    """The step records split by attempt, in order."""
    runs = []
    for r in records:
        if not runs or runs[-1][0]["attempt"] != r["attempt"]:
            runs.append([])
        runs[-1].append(r)
    return runs


def global_step(record):
    return record["epoch"] * STEPS_PER_EPOCH + record["step"]


def assert_resumed_at_backups(runs):
    """Each restart resumed exactly at a backup (save_freq 4) that Ray
    registered: not from scratch, and losing at most the steps since the
    last backup every worker reported (two backups may be in flight)."""
    for before, after in zip(runs[:-1], runs[1:], strict=True):
        done = global_step(before[-1]) + 1
        resume_at = global_step(after[0])
        assert resume_at % 4 == 0, (resume_at, done)
        assert done - 8 <= resume_at <= done, (resume_at, done)
        assert resume_at >= STEPS_PER_EPOCH  # not from scratch


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


# --- Elastic: ScalingConfig(num_workers=(1, 2)) -----------------------------

ELASTIC = "elastic"  # the resource only the elastic test's nodes have
LOSS_STEP = 22  # a node is removed here (backups at 16, 20: 2 steps lost)
GROW_STEP = 28  # a node is added here, once the group runs on 1 worker


def elastic_scaling(num_workers):
    return train.ScalingConfig(
        num_workers=num_workers,
        resources_per_worker={"CPU": 1, ELASTIC: 1},
        elastic_resize_monitor_interval_s=2,
    )


@pytest.fixture
def elastic_nodes(ray_cluster):
    """Two fresh 1-CPU nodes with the `elastic` resource; removed after."""
    cluster, _ = ray_cluster
    added = []

    def add_node():
        node = cluster.add_node(num_cpus=1, resources={ELASTIC: 1},
                                node_ip_address="127.0.0.1")
        added.append(node)
        return node

    try:
        add_node()
        add_node()
        cluster.wait_for_nodes()
        wait_until_ray_train_sees_elastic_workers(2)
        yield cluster, added, add_node
    finally:
        for node in added:
            if node in cluster.worker_nodes:
                cluster.remove_node(node, allow_graceful=False)


def _coordinator():
    """Ray Train's AutoscalingCoordinator actor, with its view read now.

    Ray Train's elastic policy sizes a group from this detached actor's
    view of the cluster (the module's first Ray Train run creates it), and
    the actor re-reads the nodes only every 20 s (`TICK_INTERVAL_S` in
    ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py):
    a run started within 20 s of adding nodes started on 1 worker (seen in
    CI: group sizes [1, 2, 1, 2]). One tick (its periodic re-read of the
    nodes and reallocation; no public way to ask for it) is run here. Unlike
    a restart, it keeps a running trainer's resource request.
    """
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (  # noqa: E501
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator._tick.remote())  # noqa: SLF001
    return coordinator


def wait_until_ray_train_sees_elastic_workers(count, timeout=60):
    """Waits until Ray Train's elastic policy would start `count` workers:
    a probe request asks the coordinator for `count` elastic workers until
    it grants them."""
    coordinator = _coordinator()
    probe = f"kerasdist-test-{os.getpid()}"
    want = [{"CPU": 1, ELASTIC: 1}] * count
    deadline = time.monotonic() + timeout
    granted = []
    try:
        while time.monotonic() < deadline:
            ray.get(coordinator.request_resources.remote(
                probe, [dict(w) for w in want], expire_after_s=timeout))
            granted = ray.get(
                coordinator.get_allocated_resources.remote(probe))
            if len(granted) >= count:
                return
            time.sleep(0.5)
            _coordinator()  # read the nodes again
    finally:
        ray.get(coordinator.cancel_request.remote(probe))
    nodes = [(n["NodeID"][:8], n["Alive"], n["Resources"])
             for n in ray.nodes()]
    pytest.fail(
        f"Ray's AutoscalingCoordinator granted {len(granted)} of {count} "
        f"elastic workers {timeout}s after the nodes joined: {granted}; "
        f"nodes: {nodes}"
    )


def refresh_ray_train_view(node_id, alive, timeout=60):
    """Makes Ray Train's elastic policy see a node change now: waits until
    Ray reports the node `node_id` alive (or dead), then has the
    coordinator re-read the nodes (`_coordinator`), so the trainer's next
    resize check (every 2 s) or restart sizes the group from the new view.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id]
        if states and states[-1] == alive:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"Ray did not report node {node_id[:8]} "
                    f"{'alive' if alive else 'dead'} within {timeout}s")
    _coordinator()


def wait_for_registered_step(run_dir, step, runner, timeout=120):
    """Waits until Ray Train has registered a checkpoint of `step` or later
    (its checkpoint manager writes the snapshot after registering one, and
    registers it only once every worker reported it)."""
    path = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    latest = None
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                state = json.load(f)
            latest = (state.get("latest_checkpoint_result") or {}).get(
                "metrics", {}).get("global_step")
        except (OSError, ValueError):
            pass  # not written yet, or being rewritten
        if latest is not None and latest >= step:
            return latest
        if not runner.is_alive():
            pytest.fail(f"training ended before Ray registered step {step}")
        time.sleep(0.5)
    pytest.fail(f"Ray registered no checkpoint of step {step} within "
                f"{timeout}s (latest: {latest}; {path})")


def wait_for_file(pattern, runner, timeout=420):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = glob.glob(pattern)
        if found:
            return found[0]
        if not runner.is_alive():
            pytest.fail(f"training ended before {pattern} appeared")
        time.sleep(0.5)
    pytest.fail(f"{pattern} did not appear within {timeout}s")


def fault_trainer(tmp_path, name, scaling, max_failures=0, **config):
    from ray_worker import fault_job

    from kerasdist.integrations.ray import KerasTrainer

    return KerasTrainer(
        fault_job,
        global_batch_size=GLOBAL_BATCH,
        train_loop_config={
            "out": str(tmp_path / name),
            "backup_root": str(tmp_path / name / "backups"),
            "epochs": EPOCHS, **config,
        },
        scaling_config=scaling,
        run_config=train.RunConfig(
            storage_path=str(tmp_path / "results"), name=name,
            failure_config=train.FailureConfig(max_failures=max_failures),
        ),
    )


def test_elastic_group_shrinks_and_grows_keeping_the_global_batch(
    elastic_nodes, tmp_path, monkeypatch
):
    """num_workers=(1, 2): a node lost mid-epoch -> Ray restarts the group
    on 1 worker; a node added -> Ray grows it back to 2. The dataset is
    batched by the global batch (16), so each replica trains 16 examples on
    1 worker and 8 on 2; every step trains the same examples as an unfailed
    2-worker run, and the final weights match it.

    The workers pause (`holds`) at the two steps where the test changes the
    cluster, so Ray's resize happens at a known point of training, not at
    whatever step a busy machine has reached.
    """
    # Ray may first try 2 workers on a stale view of the cluster; its
    # placement-group wait (default 60 s) then decides how soon it tries 1.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    cluster, nodes, add_node = elastic_nodes

    def fit_in_thread(trainer):
        outcome = {}
        thread = threading.Thread(
            target=lambda: outcome.setdefault("result", trainer.fit()),
            daemon=True,
        )
        thread.start()
        return thread, outcome

    # The reference, an unfailed 2-worker run with the same global batch,
    # trains on the module's `trainer` nodes while the elastic run waits
    # for Ray (they share no node).
    reference, reference_outcome = fit_in_thread(
        fault_trainer(tmp_path, "reference", scaling(2)))
    out = tmp_path / "elastic"
    runner, outcome = fit_in_thread(fault_trainer(
        tmp_path, "elastic", elastic_scaling((1, 2)), max_failures=4,
        holds=[[2, LOSS_STEP], [1, GROW_STEP]], hold_s=300,
    ))
    wait_for_file(str(out / f"hold-*-2-{LOSS_STEP}.json"), runner)
    # The backup every worker reported at step 20 is the one to resume from.
    wait_for_registered_step(tmp_path / "results" / "elastic", 20, runner)
    with open(out / "node-1-0.json") as f:
        victim_id = json.load(f)["node_id"]
    (victim,) = [n for n in nodes if n.node_id == victim_id]
    removed_at = time.time()
    cluster.remove_node(victim, allow_graceful=False)
    refresh_ray_train_view(victim_id, alive=False)
    shrunk = wait_for_file(str(out / f"hold-*-1-{GROW_STEP}.json"), runner)
    added_at = time.time()
    refresh_ray_train_view(add_node().node_id, alive=True)
    runner.join(timeout=600)
    assert not runner.is_alive(), "Ray did not finish after the resize"
    assert "result" in outcome, "Ray gave up (see the log above)"
    assert outcome["result"].error is None
    reference.join(timeout=300)
    assert "result" in reference_outcome, "the reference run failed"
    assert reference_outcome["result"].error is None
    want_steps = read_steps(tmp_path / "reference" / "steps-0.jsonl")
    assert {r["world"] for r in want_steps} == {2}
    with np.load(tmp_path / "reference" / "final.npz") as f:
        want = [f[k] for k in f.files]

    records = read_steps(out / "steps-0.jsonl")
    runs = attempt_runs(records)
    sizes = [run[0]["world"] for run in runs]
    collapsed = [n for i, n in enumerate(sizes) if i == 0 or sizes[i - 1] != n]
    assert collapsed == [2, 1, 2], sizes
    assert_resumed_at_backups(runs)
    assert global_step(runs[-1][0]) == GROW_STEP  # resized at the hold
    # The workers saw the elastic launcher's variables, with this size.
    for run in runs:
        with open(out / f"node-0-{run[0]['attempt']}.json") as f:
            env = json.load(f)["env"]
        assert env["KERASDIST_MIN_WORKERS"] == "1"
        assert env["KERASDIST_MAX_WORKERS"] == "2"
        assert env["KERASDIST_NUM_WORKERS"] == str(run[0]["world"])
    # Every step of every epoch trained once, on the same global batch as
    # the unfailed run: same (epoch, step) order, same ids (sum and sum of
    # squares over all replicas).
    kept = lineage(records)
    fingerprint = [(r["epoch"], r["step"], r["id_sum"], r["id_sq"])
                   for r in kept]
    assert fingerprint == [(r["epoch"], r["step"], r["id_sum"], r["id_sq"])
                           for r in want_steps]
    assert any(r["world"] == 1 for r in kept)
    with np.load(out / "final.npz") as f:
        got = [f[k] for k in f.files]
    # Tolerance: the 1-worker steps sum 16 per-example gradients in one
    # replica, the 2-worker steps all-reduce two means of 8; float32
    # rounding differs with that order (measured max difference printed).
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(got, want, strict=True))
    one = runs[sizes.index(1)][0]["attempt"]
    shrink_s = (out / f"node-0-{one}.json").stat().st_mtime - removed_at
    grow_s = (out / f"node-0-{runs[-1][0]['attempt']}.json").stat(
    ).st_mtime - added_at
    print(
        f"\nRay elastic: group sizes {sizes}; {retrained(records)} step(s) "
        f"retrained; 1-worker group started {shrink_s:.1f}s after the node "
        f"was removed, 2-worker group {grow_s:.1f}s after one was added "
        f"({os.path.basename(shrunk)}); max |weight difference| {diff:.2e}"
    )


def test_elastic_bad_configuration_is_a_clear_error_before_training(
    ray_cluster,
):
    from ray.air.config import ScalingConfig as ScalingConfigV1
    from ray_worker import docs_example

    from kerasdist.integrations.ray import KerasTrainer, RayScalingError

    run_config = train.RunConfig(
        failure_config=train.FailureConfig(max_failures=1))
    with pytest.raises(RayScalingError) as err:
        KerasTrainer(docs_example, global_batch_size=16,
                     scaling_config=scaling((1, 3)), run_config=run_config)
    message = str(err.value)
    assert "global_batch_size=16" in message
    assert "3 worker(s) = 3 replicas" in message
    assert "multiple of 6 (e.g. 12 or 18)" in message
    # Every size in (1, 4) divides 48; a fixed size is checked as well.
    KerasTrainer(docs_example, global_batch_size=48,
                 scaling_config=scaling((1, 4)), run_config=run_config)
    with pytest.raises(RayScalingError, match="2 worker"):
        KerasTrainer(docs_example, global_batch_size=9,
                     scaling_config=scaling(2))
    with pytest.raises(ValueError, match="global_batch_size=0"):
        KerasTrainer(docs_example, global_batch_size=0,
                     scaling_config=scaling(2))
    with pytest.warns(UserWarning, match="max_failures"):
        KerasTrainer(docs_example, scaling_config=scaling((1, 2)))
    # Under RAY_TRAIN_V2_ENABLED=0, ray.train.ScalingConfig is this V1
    # class (ray/train/__init__.py): it takes (1, 2) without a word, but
    # V1 has no elastic mode.
    with pytest.raises(RayScalingError) as err:
        KerasTrainer(docs_example,
                     scaling_config=ScalingConfigV1(num_workers=(1, 2)))
    message = str(err.value)
    assert "Invalid value for argument `scaling_config`" in message
    assert "RAY_TRAIN_V2_ENABLED=0" in message
    assert "Expected a fixed num_workers" in message


def test_check_global_batch_counts_replicas_of_every_size():
    from kerasdist.integrations.ray import RayScalingError, check_global_batch

    check_global_batch(train.ScalingConfig(num_workers=(1, 2)), 16)
    check_global_batch(train.ScalingConfig(num_workers=4), 16)
    # Two GPUs per worker: sizes 1..3 are 2, 4 and 6 replicas.
    gpus = train.ScalingConfig(num_workers=(1, 3), use_gpu=True,
                               resources_per_worker={"GPU": 2})
    check_global_batch(gpus, 24)
    with pytest.raises(RayScalingError) as err:
        check_global_batch(gpus, 16)
    assert "3 worker(s) = 6 replicas" in str(err.value)
    assert "multiple of 12 (e.g. 12 or 24)" in str(err.value)

"""Keras 3 training as real SLURM jobs (slurmctld + two slurmd, munged).

The job file is `deploy/slurm/train.sbatch`, unchanged; the training script
is tests/fault_worker.py (deterministic data, a log of which batch each step
trained) through tests/slurm_worker.py, and, for model parallelism,
tests/placement_worker.py.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import placement_worker
import pytest
import slurm_cluster
from fault_worker import lineage, read_steps, retrained
from test_placement_cluster import result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "deploy", "slurm", "train.sbatch")
WORKER = os.path.join(ROOT, "tests", "slurm_worker.py")
PLACEMENT_WORKER = os.path.join(ROOT, "tests", "placement_worker.py")
STEPS_PER_EPOCH = 12  # fault_worker: 192 examples, global batch 16
EPOCHS = 3

pytestmark = [pytest.mark.real_component, pytest.mark.slow]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd x2 for the session, stopped by PID."""
    why = slurm_cluster.missing()
    if why:
        pytest.skip(f"SLURM cannot run here: {why}")
    cluster = slurm_cluster.start(str(tmp_path_factory.mktemp("slurm")))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training, unfailed, on one device in one process."""
    out = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "PYTHONPATH": ROOT}
    for key in [k for k in env if k.startswith(("SLURM", "TF_CONFIG"))]:
        env.pop(key)
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "fault_worker.py"),
         "--out", str(out), "--backup_dir", str(out / "backup"),
         "--strategy", "one_device", "--epochs", str(EPOCHS)],
        env=env, check=True, timeout=600, capture_output=True,
    )
    with np.load(out / "final.npz") as f:
        return [f[k] for k in f.files]


def sbatch(slurm, tmp_path, command, max_restarts=3, sbatch_args=(),
           srun_wait=20):
    """Submits `deploy/slurm/train.sbatch COMMAND`; returns the job id."""
    res = slurm.run(
        "sbatch", "--parsable", f"--chdir={tmp_path}", *sbatch_args,
        f"--output={tmp_path}/job-%j.out", SBATCH, *command,
        extra_env={
            "PYTHONPATH": ROOT, "KERASDIST_MAX_RESTARTS": str(max_restarts),
            "KERASDIST_COLLECTIVE_TIMEOUT": "120",
            "KERASDIST_SRUN_WAIT": str(srun_wait),
        },
    )
    return res.stdout.strip().split(";")[0]


def submit(slurm, tmp_path, *worker_args, max_restarts=3, sbatch_args=()):
    out, backup = tmp_path / "out", tmp_path / "backup"
    job_id = sbatch(
        slurm, tmp_path,
        [sys.executable, WORKER, "--out", str(out), "--backup_dir",
         str(backup), "--epochs", str(EPOCHS), "--save_freq", "4",
         *worker_args],
        max_restarts=max_restarts, sbatch_args=sbatch_args,
    )
    return job_id, out


def job_log(tmp_path, job_id):
    try:
        with open(tmp_path / f"job-{job_id}.out") as f:
            return f.read()[-6000:]
    except OSError:
        return "(no job output)"


def final_weights(out):
    with np.load(out / "final.npz") as f:
        return [f[k] for k in f.files]


def assert_same_weights(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def every_step_once(records):
    kept = lineage(records)
    steps = [(r["epoch"], r["step"]) for r in kept]
    return steps == [
        (e, s) for e in range(EPOCHS) for s in range(STEPS_PER_EPOCH)
    ]


def test_two_task_srun_job_matches_single_device(slurm, reference,
                                                 tmp_path):
    start = time.monotonic()
    job_id, out = submit(slurm, tmp_path)
    state = slurm.wait_job(job_id, timeout=600)
    assert state["JobState"] == "COMPLETED", job_log(tmp_path, job_id)
    # Two tasks on two (emulated) nodes, SLURM's rank order.
    assert state["NodeList"] == "node[9-10]"
    records = read_steps(out / "steps-0.jsonl")
    assert every_step_once(records) and retrained(records) == 0
    assert_same_weights(final_weights(out), reference)
    print(f"\nSLURM 2-task job: {time.monotonic() - start:.1f}s")


# Both tasks of the first srun wait after epoch 1's step 2 (the 15th step,
# which the preemption tests wait for) until SIGTERM comes: on a quiet
# machine the whole job (36 steps) took 1.5 s and had finished before the
# test's signal arrived (seen in CI).
HOLD_FOR_SIGTERM = [f"--fault=0:{w}:1:2:HOLD_FOR_SIGTERM" for w in (0, 1)]


def wait_for_steps(path, count, job_id, slurm, timeout=400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(read_steps(path)) >= count:
                return
        except (OSError, ValueError):
            pass
        state = slurm.job_state(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), state
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {count} steps in {path}")


def test_preemption_saves_requeues_and_resumes_losing_nothing(
    slurm, reference, tmp_path
):
    job_id, out = submit(slurm, tmp_path, *HOLD_FOR_SIGTERM)
    steps = out / "steps-0.jsonl"
    wait_for_steps(steps, STEPS_PER_EPOCH + 3, job_id, slurm)
    signalled = time.monotonic()
    slurm.run("scancel", "--signal=TERM", job_id)
    resumed_after = None
    deadline = signalled + 900
    while resumed_after is None and time.monotonic() < deadline:
        if any(r["attempt"] >= 1000 for r in read_steps(steps)):
            resumed_after = time.monotonic() - signalled
        elif slurm.job_state(job_id)["JobState"] in ("FAILED", "CANCELLED"):
            break
        time.sleep(0.5)
    state = slurm.wait_job(job_id, timeout=900)
    log = job_log(tmp_path, job_id)
    assert state["JobState"] == "COMPLETED", log
    assert int(state.get("Restarts", "0")) == 1, state  # requeued once
    # The chief's line, written just before its `scontrol requeue` killed
    # srun, is in the job's output (the tasks write it through slurmstepd).
    assert "kerasdist: preempted (SIGTERM); saved at epoch" in log, log
    records = read_steps(steps)
    requeued = [r for r in records if r["attempt"] >= 1000]
    assert requeued, "no step ran after the requeue"
    first = requeued[0]
    before = [r for r in records if r["attempt"] < 1000]
    # Resumed exactly after the last step trained before the signal's save.
    assert (first["epoch"], first["step"]) == (
        before[-1]["epoch"], before[-1]["step"] + 1
    ) or (first["step"] == 0 and first["epoch"] == before[-1]["epoch"] + 1)
    assert retrained(records) == 0
    assert every_step_once(records)
    assert_same_weights(final_weights(out), reference)
    print(
        f"\nSLURM preemption: 0 steps retrained; first step after the "
        f"requeue {resumed_after:.1f}s after the signal (SLURM holds a "
        "requeued job cred_expire + 1 = 11 s here)"
    )


def test_preemption_without_requeue_reruns_srun_in_the_job(
    slurm, reference, tmp_path
):
    # Not requeueable: exit_for_restart() exits 75 and the job's loop reruns
    # srun on the same allocation.
    job_id, out = submit(slurm, tmp_path, *HOLD_FOR_SIGTERM,
                         sbatch_args=["--no-requeue"])
    steps = out / "steps-0.jsonl"
    wait_for_steps(steps, STEPS_PER_EPOCH + 3, job_id, slurm)
    slurm.run("scancel", "--signal=TERM", job_id)
    state = slurm.wait_job(job_id, timeout=900)
    log = job_log(tmp_path, job_id)
    assert state["JobState"] == "COMPLETED", log
    assert state["Restarts"] == "0" and "step exited 75, restart 1/3" in log
    records = read_steps(steps)
    assert {r["attempt"] for r in records} == {0, 1}
    assert retrained(records) == 0 and every_step_once(records)
    assert_same_weights(final_weights(out), reference)


def test_killed_task_is_rerun_by_the_job_loop_from_the_backup(
    slurm, reference, tmp_path
):
    # Worker 1 SIGKILLs itself after epoch 1, step 5 on the first srun.
    job_id, out = submit(slurm, tmp_path, "--fault", "0:1:1:5:SIGKILL")
    state = slurm.wait_job(job_id, timeout=900)
    log = job_log(tmp_path, job_id)
    assert state["JobState"] == "COMPLETED", log
    assert "restart 1/3" in log
    records = read_steps(out / "steps-0.jsonl")
    assert {r["attempt"] for r in records} == {0, 1}
    resumed = [r for r in records if r["attempt"] == 1][0]
    # save_freq 4: the last backup before step (1, 5) is after step (1, 3).
    assert (resumed["epoch"], resumed["step"]) == (1, 4)
    assert every_step_once(records)
    assert_same_weights(final_weights(out), reference)
    print(f"\nSLURM killed task: {retrained(records)} step(s) retrained")
    # The chief's goodput line, over both sruns (no launcher to print it):
    # the gap between them is restart time.
    spent = re.search(r"kerasdist: goodput [\d.]+% .* restart ([\d.]+)s", log)
    assert spent and float(spent[1]) > 0, log


def test_two_concurrent_jobs_on_the_same_nodes_both_finish(
    slurm, reference, tmp_path
):
    # Job ids 25 apart: the old default port base, 15000 + (id % 25) * 2000,
    # gave both jobs the same ports on node9 and node10 (one machine here,
    # so the second job's gRPC servers could not bind). The job file runs
    # srun --resv-ports (the test cluster has MpiParams=ports=...), so SLURM
    # reserves distinct ports for the two steps.
    ids = []
    for n in range(2):
        run = tmp_path / f"job{n}"
        run.mkdir()
        got, out = submit(slurm, run)
        ids.append((got, run, out))
        while n == 0 and int(slurm.run(
                "sbatch", "--parsable", "--hold", "--wrap", "true"
        ).stdout.split(";")[0]) < int(got) + 24:
            pass  # held fillers take the ids in between; cancelled below
    slurm.run("scancel", "--state=PENDING", "--name=wrap", check=False)
    assert int(ids[1][0]) - int(ids[0][0]) == 25, ids
    running = set()
    deadline = time.monotonic() + 600
    while len(running) < 2 and time.monotonic() < deadline:
        for got, _, _ in ids:
            if slurm.job_state(got)["JobState"] == "RUNNING":
                running.add(got)
        if all(slurm.job_state(g)["JobState"] in ("COMPLETED", "FAILED")
               for g, _, _ in ids):
            break
        time.sleep(0.5)
    assert len(running) == 2, "the two jobs never ran at the same time"
    for got, run, out in ids:
        state = slurm.wait_job(got, timeout=900)
        assert state["JobState"] == "COMPLETED", job_log(run, got)
        assert state["NodeList"] == "node[9-10]"
        # No port clash: no step failed and was rerun by the job's loop.
        assert "kerasdist: step exited" not in job_log(run, got), (
            job_log(run, got))
        assert every_step_once(read_steps(out / "steps-0.jsonl"))
        assert_same_weights(final_weights(out), reference)


@pytest.mark.timeout(720)
def test_pipeline_over_three_tasks_on_two_nodes(slurm, tmp_path):
    """Model parallelism under SLURM: `join_cluster()` in 3 srun tasks.

    Task 0 (the chief) pipelines tests/placement_worker.py's MLP over tasks
    1 and 2, which serve and exit 0 when it is done; two tasks share node9
    (distinct reserved ports), task 2 runs on node10.
    """
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    job_id = sbatch(
        slurm, tmp_path,
        [sys.executable, PLACEMENT_WORKER, "--out", str(out),
         "--scenarios", "pipeline"],
        max_restarts=0, srun_wait=60,
        sbatch_args=["--ntasks=3", "--ntasks-per-node=2"],
    )
    state = slurm.wait_job(job_id, timeout=600)
    job_time = time.monotonic() - start
    log = job_log(tmp_path, job_id)
    assert state["JobState"] == "COMPLETED", log
    assert state["NodeList"] == "node[9-10]"
    res, weights = result(out, "pipeline")
    assert_same_weights(weights, placement_worker.reference("pipeline"))
    # The cluster the chief joined is SLURM's: ranks in SLURM's block
    # order on the nodes' NodeAddr, each with its own port.
    assert res["source"] == "slurm", res
    hosts = [a.rsplit(":", 1)[0] for a in res["addresses"]]
    assert hosts == ["127.0.0.9", "127.0.0.9", "127.0.0.10"], res
    assert len(set(res["addresses"])) == 3, res
    placement_worker.assert_on_stage_workers(res["placement"])
    # Each stage worker served at its SLURM address and exited 0 on its
    # own when the chief was done (no rerun of srun).
    for rank in (1, 2):
        assert (f"kerasdist: worker {rank} serves model parallelism at "
                f"{res['addresses'][rank]}") in log, log
    assert log.count("model-parallel server exits 0: the chief finished") \
        == 2, log
    assert "kerasdist: step exited" not in log, log
    print(f"\nSLURM 3-task pipeline job: {job_time:.1f}s (test "
          f"{time.monotonic() - start:.1f}s)")


def test_sbatch_template_is_valid_bash():
    assert shutil.which("bash")
    subprocess.run(["bash", "-n", SBATCH], check=True)

"""kerasdist-run: restarts, hangs, signals, and real fault injection.

The launcher tests without TensorFlow use `python -c` workers and take a few
seconds. The fault-injection tests run `tests/fault_worker.py` as real
MultiWorkerMirroredStrategy workers on 127.0.0.1 under the launcher and
compare with an uninterrupted in-process run of the same deterministic job.
"""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import fault_worker as fw
import numpy as np
import pytest

import kerasdist as kd
from kerasdist.testing import kill_group

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fault_worker.py")
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# ----------------------------------------------------------------------
# Launcher behaviour (no TensorFlow in the workers).


def test_rejects_bad_arguments():
    with pytest.raises(kd.launch.LauncherError, match=r"num_workers=0"):
        kd.launch.run(["true"], num_workers=0)
    with pytest.raises(kd.launch.LauncherError, match=r"max_restarts=-1"):
        kd.launch.run(["true"], max_restarts=-1)
    with pytest.raises(kd.launch.LauncherError, match=r"timeout=0"):
        kd.launch.run(["true"], timeout=0)
    with pytest.raises(kd.launch.LauncherError, match=r"non-empty list"):
        kd.launch.run("python train.py")


def test_cli_without_command_says_how(capsys):
    with pytest.raises(SystemExit) as e:
        kd.launch.main(["--num_workers", "2"])
    assert e.value.code == 2
    assert "no worker command given" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_prefixes_output_writes_logs_and_sets_environment(tmp_path):
    out = io.StringIO()
    result = kd.launch.run(
        _python("""
            import json, os
            cfg = json.loads(os.environ["TF_CONFIG"])
            print("index", os.environ["KERASDIST_WORKER_INDEX"],
                  "of", os.environ["KERASDIST_NUM_WORKERS"],
                  "restart", os.environ["KERASDIST_RESTART_COUNT"],
                  "task", cfg["task"]["index"],
                  "peers", len(cfg["cluster"]["worker"]))
        """),
        num_workers=2,
        log_dir=tmp_path,
        stream=out,
    )
    text = out.getvalue()
    assert result.ok and result.attempts == 1, text
    assert "[worker-0] index 0 of 2 restart 0 task 0 peers 2" in text
    assert "[worker-1] index 1 of 2 restart 0 task 1 peers 2" in text
    log = (tmp_path / "worker-1.log").read_text()
    assert "index 1 of 2 restart 0 task 1 peers 2" in log
    assert "[worker-" not in log  # Log files hold the raw output.
    assert "summary: SUCCEEDED after 1 attempt(s)" in text


@pytest.mark.timeout(60)
def test_gives_up_after_max_restarts_and_names_last_failure(tmp_path):
    out = io.StringIO()
    result = kd.launch.run(
        _python("""
            import os, sys
            sys.exit(3 if os.environ["KERASDIST_WORKER_INDEX"] == "1" else 0)
        """),
        num_workers=2,
        max_restarts=1,
        stream=out,
    )
    text = out.getvalue()
    assert result.returncode == 3, text
    assert (result.attempts, result.restarts) == (2, 1)
    assert "worker-1 exited with status 3" in text
    assert "restart 1/1" in text
    assert "no restarts left (1 allowed); giving up" in text
    assert "summary: FAILED after 2 attempt(s)" in text
    assert "last failure: worker-1 exited with status 3 at" in text


@pytest.mark.timeout(60)
def test_signal_death_is_reported_and_restarted(tmp_path):
    out = io.StringIO()
    result = kd.launch.run(
        _python("""
            import os, signal
            if os.environ["KERASDIST_RESTART_COUNT"] == "0" and \\
                    os.environ["KERASDIST_WORKER_INDEX"] == "1":
                os.kill(os.getpid(), signal.SIGKILL)
        """),
        num_workers=2,
        max_restarts=3,
        stream=out,
    )
    text = out.getvalue()
    assert result.ok and result.restarts == 1, text
    assert "worker-1 died (SIGKILL) at" in text
    assert "restart 1/3" in text


@pytest.mark.timeout(60)
def test_hung_worker_is_detected_by_timeout(tmp_path):
    out = io.StringIO()
    result = kd.launch.run(
        _python("""
            import os, signal, time
            print("started", flush=True)
            if os.environ["KERASDIST_RESTART_COUNT"] == "0" and \\
                    os.environ["KERASDIST_WORKER_INDEX"] == "1":
                os.kill(os.getpid(), signal.SIGSTOP)
            for _ in range(3):
                time.sleep(0.3)
                print("working", flush=True)
        """),
        num_workers=2,
        max_restarts=2,
        timeout=2.0,
        stream=out,
    )
    text = out.getvalue()
    assert result.ok and result.restarts == 1, text
    assert result.failures[0].state == kd.launch.WorkerState.HUNG
    assert result.failures[0].worker == 1
    assert "worker-1 made no progress for 2s (hung)" in text


@pytest.mark.timeout(60)
def test_heartbeat_file_counts_as_progress(tmp_path):
    # A silent worker that touches its heartbeat is not hung.
    out = io.StringIO()
    result = kd.launch.run(
        _python("""
            import os, time
            for _ in range(8):
                time.sleep(0.4)
                os.utime(os.environ["KERASDIST_HEARTBEAT_FILE"])
        """),
        num_workers=1,
        max_restarts=0,
        timeout=1.5,
        stream=out,
    )
    assert result.ok, out.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigterm_to_launcher_is_forwarded_and_it_exits(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import signal, sys, time
        def stop(signum, frame):
            print("worker got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
    """))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kerasdist.launch", "--num_workers", "2",
         "--grace_period", "5", "--", sys.executable, str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, **QUIET},
    )
    try:
        ready = 0
        for line in proc.stdout:
            ready += line.strip().endswith("] ready")
            if ready == 2:
                break
        os.kill(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        kill_group(proc, grace=10)
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "[worker-0] worker got SIGTERM" in rest
    assert "[worker-1] worker got SIGTERM" in rest
    assert "summary: INTERRUPTED (SIGTERM) after 1 attempt(s)" in rest


# ----------------------------------------------------------------------
# Fault injection with real TensorFlow workers.


@pytest.fixture(scope="module")
def mirrored_reference(tmp_path_factory):
    """Uninterrupted run: MirroredStrategy over 2 replicas, same global
    batch, so the same input order as 2 MWMS workers."""
    strategy = kd.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    path = str(tmp_path_factory.mktemp("ref") / "steps.jsonl")
    with strategy.scope():
        model = fw.build_model()
    model.fit(fw.make_dataset(strategy), epochs=3, verbose=0,
              callbacks=[fw.step_log_callback(path, 2)])
    return model.get_weights(), fw.read_steps(path)


def _fingerprints(records):
    return [(r["epoch"], r["step"], r["id_sum"], r["id_sq"]) for r in records]


def _run_faulty(tmp_path, faults, num_workers=2, save_freq=4,
                backup_dir=None, check=True, **kwargs):
    out = io.StringIO()
    command = [sys.executable, WORKER, "--out", str(tmp_path / "out"),
               "--backup_dir", backup_dir or str(tmp_path / "backup"),
               "--save_freq", str(save_freq)]
    for f in faults:
        command += ["--fault", f]
    result = kd.launch.run(
        command, num_workers=num_workers, log_dir=tmp_path / "logs",
        env=QUIET, stream=out, **kwargs,
    )
    text = out.getvalue()
    if not check:
        return result, text
    assert result.ok, text
    steps = fw.read_steps(str(tmp_path / "out" / "steps-0.jsonl"))
    final = np.load(tmp_path / "out" / "final.npz")
    weights = [final[f"arr_{i}"] for i in range(len(final.files))]
    return result, text, steps, weights


def _assert_same_training(steps, weights, reference):
    ref_weights, ref_steps = reference
    # Each batch of each epoch applied exactly once, in the same order.
    assert _fingerprints(fw.lineage(steps)) == _fingerprints(ref_steps)
    for w, r in zip(weights, ref_weights, strict=True):
        np.testing.assert_allclose(w, r, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_mid_epoch_recovers_exactly(tmp_path, mirrored_reference):
    result, text, steps, weights = _run_faulty(
        tmp_path, ["0:1:1:5:SIGKILL"], max_restarts=2
    )
    assert result.restarts == 1, text
    assert "worker-1 died (SIGKILL)" in text
    _assert_same_training(steps, weights, mirrored_reference)
    # Killed after step 5 of epoch 2 (global step 18); the last backup was
    # at global step 16, so steps 16 and 17 ran twice: < save_freq.
    resumed = next(r for r in steps if r["attempt"] == 1)
    assert (resumed["epoch"], resumed["step"]) == (1, 4)
    assert fw.retrained(steps) == 2
    assert "history epochs: 2" in text  # fit's history starts at epoch 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_saves_at_next_boundary_and_loses_nothing(
    tmp_path, mirrored_reference
):
    result, text, steps, weights = _run_faulty(
        tmp_path, ["0:1:1:5:SIGTERM"], max_restarts=0
    )
    # A preemption restart is not a failure: max_restarts=0 still restarts.
    assert (result.restarts, result.preemptions) == (0, 1), text
    assert "asked for a restart (exit 75, preempted)" in text
    assert fw.retrained(steps) == 0
    last_before = [r for r in steps if r["attempt"] == 0][-1]
    resumed = next(r for r in steps if r["attempt"] == 1)
    assert (resumed["epoch"], resumed["step"]) == (
        last_before["epoch"], last_before["step"] + 1
    )
    _assert_same_training(steps, weights, mirrored_reference)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_during_save_resumes_from_previous_backup(tmp_path):
    import tensorflow as tf

    # Reference: one worker uses OneDeviceStrategy ("auto"), as here.
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    path = str(tmp_path / "ref.jsonl")
    with strategy.scope():
        model = fw.build_model()
    model.fit(fw.make_dataset(strategy), epochs=3, verbose=0,
              callbacks=[fw.step_log_callback(path)])
    reference = model.get_weights(), fw.read_steps(path)

    # SIGKILL inside the save at global step 20, after the data is written
    # to the temporary file and before it is renamed into place.
    result, text, steps, weights = _run_faulty(
        tmp_path, ["0:0:1:5:KILL_IN_SAVE"], num_workers=1, max_restarts=1
    )
    assert result.restarts == 1 and "died (SIGKILL)" in text, text
    resumed = next(r for r in steps if r["attempt"] == 1)
    assert (resumed["epoch"], resumed["step"]) == (1, 4)  # step 16 backup
    _assert_same_training(steps, weights, reference)
    leftovers = [n for n in os.listdir(tmp_path / "backup")
                 if n.startswith(".tmp-")]
    assert leftovers == []
    newest = max(n for n in os.listdir(tmp_path / "backup")
                 if n.startswith("ckpt-"))
    meta = json.loads(str(np.load(tmp_path / "backup" / newest)["__meta__"]))
    assert meta["global_step"] == 36


def test_restart_exit_code_is_documented_constant():
    assert kd.launch.RESTART_EXIT_CODE == 75
    assert kd.callbacks.backup_and_restore.protocol.RESTART_EXIT_CODE == 75


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_workers_that_see_different_backups_stop_with_clear_error(tmp_path):
    # Simulates a backup_dir that is not shared: worker 0 finds a backup,
    # worker 1 (another directory) finds none. Training must not start.
    model = fw.build_model()
    model.fit(fw.make_dataset(), epochs=1, verbose=0, callbacks=[
        kd.callbacks.BackupAndRestore(tmp_path / "backup0", save_freq=4)])
    result, text = _run_faulty(
        tmp_path, [], backup_dir=str(tmp_path / "backup{rank}"),
        max_restarts=0, check=False)
    assert not result.ok
    assert "the workers found different backups" in text, text
    assert "must be on a file system that every worker sees" in text
    assert not os.path.exists(tmp_path / "out" / "steps-0.jsonl")

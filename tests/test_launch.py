"""kerasdist-run: restarts, hangs, signals, and real fault injection.

The launcher tests without TensorFlow use `python -c` workers and take a few
seconds. The fault-injection tests run `tests/fault_worker.py` as real
MultiWorkerMirroredStrategy workers on 127.0.0.1 under the launcher and
compare with an uninterrupted in-process run of the same deterministic job.
"""

import dataclasses
import inspect
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import fault_worker as fw
import numpy as np
import pytest

import kerasdist as kd
from kerasdist.launch import supervisor
from kerasdist.testing import gone, wait_for

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


# Worker 1 SIGKILLs itself in the first attempt only.
_SIGKILL_ONCE = _python("""
    import os, signal
    if os.environ["KERASDIST_RESTART_COUNT"] == "0" and \\
            os.environ["KERASDIST_WORKER_INDEX"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.timeout(60)
def test_signal_death_is_reported_and_restarted(tmp_path):
    out = io.StringIO()
    result = kd.launch.run(
        _SIGKILL_ONCE,
        num_workers=2,
        max_restarts=3,
        stream=out,
    )
    text = out.getvalue()
    assert result.ok and result.restarts == 1, text
    assert "worker-1 died (SIGKILL) at" in text
    assert "restart 1/3" in text


@pytest.mark.timeout(60)
def test_events_jsonl_tells_a_sigkilled_worker_and_its_restart(tmp_path):
    """`--log_dir D` writes D/events.jsonl: the attempt, the worker's exit
    (rank, signal), the restart decision and the new attempt, in order."""
    out = io.StringIO()
    result = kd.launch.run(
        _SIGKILL_ONCE,
        num_workers=2, max_restarts=3, stream=out, log_dir=tmp_path,
    )
    assert result.ok, out.getvalue()
    got = kd.launch.read_events(tmp_path)
    assert [e["event"] for e in got] == [
        "attempt_started", "worker_exited", "restarting", "attempt_started",
        "goodput", "run_ended"], got
    started, exited, restarting, again, _, ended = got
    assert (started["attempt"], started["size"]) == (1, 2)
    assert (exited["attempt"], exited["rank"], exited["signal"],
            exited["exit_code"]) == (1, 1, "SIGKILL", -9), exited
    assert (restarting["kind"], restarting["used"], restarting["limit"]) == (
        "restart", 1, 3)
    assert (again["attempt"], again["size"]) == (2, 2)
    assert (ended["returncode"], ended["outcome"], ended["sizes"]) == (
        0, "SUCCEEDED", [2, 2])
    times = [e["time"] for e in got]
    assert times == sorted(times), got


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


# Silent for 4 s (start-up: imports, connecting), then a heartbeat every
# 0.3 s (as BackupAndRestore does once fit begins), then exit 0.
_SLOW_START = _python("""
    import os, time
    time.sleep(4)
    for _ in range(6):
        os.utime(os.environ["KERASDIST_HEARTBEAT_FILE"])
        time.sleep(0.3)
""")


@pytest.mark.timeout(60)
def test_start_timeout_spares_a_slow_start(tmp_path):
    """Issue 25 (6): `--timeout` is silence after the first heartbeat;
    start-up has its own limit, `--start_timeout`."""
    out = io.StringIO()
    result = kd.launch.run(_SLOW_START, num_workers=2, max_restarts=0,
                           timeout=1.5, start_timeout=60, stream=out,
                           log_dir=tmp_path)
    assert result.ok and result.attempts == 1, out.getvalue()
    # Without it, start-up counts as before: the same run is hung.
    out = io.StringIO()
    result = kd.launch.run(_SLOW_START, num_workers=1, max_restarts=0,
                           timeout=1.5, stream=out, log_dir=tmp_path)
    assert result.returncode == 124, out.getvalue()
    hung = [e for e in kd.launch.read_events(tmp_path)
            if e["event"] == "worker_hung"]
    assert [(e["rank"], e["at_start"]) for e in hung] == [(0, True)], hung


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
    launcher = supervisor.Process(
        [sys.executable, "-m", "kerasdist.launch", "--num_workers", "2",
         "--grace_period", "5", "--", sys.executable, str(script)],
        env={**os.environ, **QUIET}, capture=True,
    )
    try:
        wait_for(lambda: launcher.output().count("] ready") == 2, 60,
                  launcher)
        os.kill(launcher.pid, signal.SIGTERM)
        wait_for(lambda: not launcher.running(), 30, launcher)
    finally:
        supervisor.stop_all([launcher], grace=10)
    rest = launcher.output()
    assert launcher.returncode == 128 + signal.SIGTERM, rest
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


# ----------------------------------------------------------------------
# The process-group supervisor.


def _cli(*args, prefix=(), timeout=60):
    """Runs `python -m kerasdist.launch ARGS` to its end; (code, output).

    `prefix` goes before the interpreter, e.g. a command that drops
    privileges."""
    # This checkout's kerasdist, in the launcher and in its workers.
    path = os.pathsep.join(
        [os.path.dirname(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    launcher = supervisor.Process(
        [*prefix, sys.executable, "-m", "kerasdist.launch", *args],
        env={**os.environ, **QUIET, "PYTHONPATH": path}, capture=True,
    )
    try:
        wait_for(lambda: not launcher.running(), timeout, launcher)
    finally:
        supervisor.stop_all([launcher], grace=5)
    return launcher.returncode, launcher.output()


@pytest.mark.timeout(90)
def test_workers_die_when_the_launcher_is_sigkilled(tmp_path):
    launcher = supervisor.Process(
        [sys.executable, "-m", "kerasdist.launch", "--num_workers", "2",
         "--", *_python("""
            import os, time
            print("pid", os.getpid(), flush=True)
            time.sleep(120)
         """)],
        env={**os.environ, **QUIET}, capture=True,
    )
    pids = []
    try:
        wait_for(lambda: launcher.output().count("] pid ") == 2, 60,
                  launcher)
        pids = [int(line.split()[-1])
                for line in launcher.output().splitlines()
                if "] pid " in line]
        assert all(not gone(pid) for pid in pids)
        os.kill(launcher.pid, signal.SIGKILL)  # No chance to clean up.
        wait_for(lambda: all(gone(pid) for pid in pids), 20, launcher)
    finally:
        supervisor.stop_all([launcher], grace=0)
        for pid in pids:  # Only if the test failed: the workers we saw.
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == -signal.SIGKILL


def test_supervisor_never_signals_a_reaped_group():
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()  # Reaped: its pid and group id may be reused now.
    with pytest.raises(ValueError, match="already reaped"):
        supervisor.Leader(proc)
    kd.testing.kill_group(proc)  # Does nothing rather than guess.

    # A supervised process is seen to exit without being reaped, so its
    # group can still be signalled (stragglers killed), then reaped.
    p = supervisor.Process(_python("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c",
                                  "import time; time.sleep(60)"])
        print("child", child.pid, flush=True)
    """), capture=True)
    wait_for(lambda: not p.running(), 30, p)
    child = int(p.output().split()[-1])
    try:
        assert supervisor.process_state(p.pid) == "Z"  # Exited, not reaped.
        assert not gone(child)  # Left behind in the group.
        supervisor.stop_all([p], grace=1.0)
        assert p.returncode == 0
        assert supervisor.process_state(p.pid) is None  # Reaped.
        wait_for(lambda: gone(child), 10)  # The group's SIGKILL.
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)


def test_process_state_shows_a_stopped_process():
    p = supervisor.Process(_python("import time; time.sleep(60)"))
    try:
        p.signal(signal.SIGSTOP)
        wait_for(lambda: p.state() == "T", 10)
        p.signal(signal.SIGCONT)
        wait_for(lambda: p.state() in ("R", "S"), 10)
    finally:
        supervisor.stop_all([p], grace=0)
    assert p.returncode == -signal.SIGKILL


# ----------------------------------------------------------------------
# Options: declared once in WorkerSpec.


def test_docs_options_table_is_generated_from_worker_spec():
    path = os.path.join(os.path.dirname(HERE), "docs", "guide",
                        "fault_tolerance.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    table = kd.launch.options_table()
    assert table in text, (
        "docs/guide/fault_tolerance.md's options table differs from "
        f"WorkerSpec; paste this:\n{table}")
    fields = [f.name for f in dataclasses.fields(kd.launch.WorkerSpec)]
    for name in fields[1:]:  # Every option but `command`.
        assert f"`--{name} " in table
        assert f"--{name}" in kd.launch.cli._parser().format_help()  # noqa: SLF001
        assert name in inspect.signature(kd.launch.run).parameters


@pytest.mark.timeout(60)
def test_host_and_env_are_reachable_from_the_command_line():
    code, text = _cli(
        "--num_workers", "2", "--host", "127.0.0.2", "--env", "FOO=bar=1",
        "--env", "BAZ=", "--", *_python("""
            import json, os
            cfg = json.loads(os.environ["TF_CONFIG"])
            print("hosts", sorted({a.split(":")[0]
                                   for a in cfg["cluster"]["worker"]}),
                  "FOO", os.environ["FOO"], "BAZ", repr(os.environ["BAZ"]))
        """))
    assert code == 0, text
    assert "[worker-1] hosts ['127.0.0.2'] FOO bar=1 BAZ ''" in text


def test_options_accept_numpy_integers_and_reject_unknown_names():
    spec = kd.launch.WorkerSpec(["true"], num_workers=np.int64(2),
                                max_restarts=np.int32(0))
    assert (spec.num_workers, spec.max_restarts) == (2, 0)
    assert type(spec.num_workers) is int
    with pytest.raises(kd.launch.LauncherError, match=r"num_workers=True"):
        kd.launch.WorkerSpec(["true"], num_workers=True)
    with pytest.raises(kd.launch.LauncherError,
                       match=r"Unknown option\(s\) \['max_restart'\]"):
        kd.launch.run(["true"], max_restart=3)
    code, text = _cli("--env", "NOEQUALS", "--", "true")
    assert code == 2
    assert "Expected NAME=VALUE, e.g. --env OMP_NUM_THREADS=1" in text


# ----------------------------------------------------------------------
# Bad input: a clear error, no traceback, nothing started.


def _assert_clear_error(code, text, *needles):
    assert code == 2, text
    assert "Traceback" not in text, text
    assert "attempt 1" not in text, text  # Nothing was started.
    for needle in needles:
        assert needle in text, text


@pytest.mark.timeout(60)
def test_missing_command_is_a_clear_error(tmp_path):
    _assert_clear_error(
        *_cli("--", "/no/such/cmd"),
        "kerasdist-run: error: Invalid worker command: '/no/such/cmd' does "
        "not exist.", "kerasdist-run -- python train.py")
    _assert_clear_error(
        *_cli("--", "no-such-program-kd"),
        "'no-such-program-kd' was not found on PATH")


@pytest.mark.timeout(60)
def test_non_executable_command_is_a_clear_error(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    _assert_clear_error(
        *_cli("--", str(script)),
        f"Invalid worker command: '{script}' is not executable.",
        f"chmod +x {script}")


@pytest.mark.timeout(60)
def test_command_the_kernel_cannot_run_is_a_clear_error(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")  # Executable, but no #! line.
    script.chmod(0o755)
    code, text = _cli("--", str(script))
    assert code == 2, text
    assert "Traceback" not in text, text
    assert (f"Invalid worker command: '{script}' cannot be started (Exec "
            "format error)") in text


@pytest.mark.timeout(60)
def test_file_valued_log_dir_is_a_clear_error(tmp_path):
    a_file = tmp_path / "logs"
    a_file.write_text("")
    _assert_clear_error(
        *_cli("--log_dir", str(a_file), "--", "true"),
        f"Invalid value for option `--log_dir`. Received: '{a_file}', "
        "which is a file, not a directory.",
        "Pass a directory you can write to as --log_dir.")
    _assert_clear_error(
        *_cli("--log_dir", str(a_file / "sub"), "--", "true"),
        f"Received: '{a_file / 'sub'}', which cannot be written "
        "(Not a directory)")


def _as_unprivileged_user():
    """A command prefix that runs the launcher without root's override of
    file permissions, or None when that is not possible here."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    code, _ = _cli("--", "true", prefix=prefix)  # Can nobody run us?
    return prefix if code == 0 else None


@pytest.mark.real_component
@pytest.mark.timeout(120)
def test_unwritable_log_dir_is_a_clear_error():
    prefix = _as_unprivileged_user()
    if prefix is None:
        pytest.skip("root, and user nobody cannot read this checkout")
    parent = tempfile.mkdtemp(prefix="kd-log-dir-")
    try:
        os.chmod(parent, 0o755)
        locked = os.path.join(parent, "locked")
        os.mkdir(locked, 0o555)
        _assert_clear_error(
            *_cli("--log_dir", os.path.join(locked, "logs"), "--", "true",
                  prefix=prefix),
            f"Received: '{locked}/logs', which cannot be written "
            "(Permission denied)")
        _assert_clear_error(
            *_cli("--log_dir", locked, "--", "true", prefix=prefix),
            f"Received: '{locked}', which cannot be written (Permission "
            "denied)")
    finally:
        shutil.rmtree(parent)


@pytest.mark.real_component
@pytest.mark.timeout(120)
def test_log_dir_on_a_read_only_file_system_is_a_clear_error():
    # A read-only tmpfs in a mount namespace of the launcher's own.
    mount_point = tempfile.mkdtemp(prefix="kd-ro-")
    try:
        probe = subprocess.run(
            ["unshare", "-m", "sh", "-c",
             f"mount -t tmpfs -o ro tmpfs {mount_point}"],
            capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"cannot mount a read-only file system here: "
                        f"{probe.stderr.strip()}")
        code, text = _cli(
            "--log_dir", mount_point, "--", "true",
            prefix=("unshare", "-m", "sh", "-c",
                    f'mount -t tmpfs -o ro tmpfs {mount_point} && '
                    'exec "$@"', "sh"))
    finally:
        os.rmdir(mount_point)
    _assert_clear_error(
        code, text, f"Received: '{mount_point}', which cannot be written "
        "(Read-only file system)")


# ----------------------------------------------------------------------
# Permanent errors are not retried.


@pytest.mark.timeout(90)
def test_permanent_error_is_not_retried(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import os
        import kerasdist
        from kerasdist.errors import PermanentError

        class BadConfig(PermanentError, ValueError):
            pass

        if os.environ["KERASDIST_WORKER_INDEX"] == "1":
            raise BadConfig("Invalid value for argument `units`.")
        import time
        time.sleep(60)  # Worker 0 would wait for worker 1 forever.
    """))
    code, text = _cli("--num_workers", "2", "--max_restarts", "3", "--",
                      sys.executable, str(script))
    assert code == kd.launch.PERMANENT_EXIT_CODE == 78, text
    assert text.count("starting 2 worker(s)") == 1, text  # One attempt.
    # The worker's traceback is still printed, then it exits 78.
    assert "[worker-1] BadConfig: Invalid value for argument" in text
    assert ("worker-1 failed with a permanent error (exit 78) at" in text)
    assert "; not retried (a restart cannot fix it)" in text
    assert ("summary: FAILED (permanent error, not retried) after 1 "
            "attempt(s), 0 restart(s)") in text


@pytest.mark.timeout(60)
def test_ordinary_errors_are_still_retried(tmp_path):
    out = io.StringIO()
    result = kd.launch.run(
        _python("""
            import os
            import kerasdist
            if os.environ["KERASDIST_RESTART_COUNT"] == "0":
                raise ValueError("flaky")
        """),
        max_restarts=1, stream=out,
    )
    assert result.ok and result.restarts == 1, out.getvalue()
    assert "worker-0 exited with status 1" in out.getvalue()


# ----------------------------------------------------------------------
# Hang blame with real MultiWorkerMirroredStrategy workers.


MW_WORKER = os.path.join(HERE, "mw_worker.py")


def _run_hang(tmp_path, timeout):
    out = io.StringIO()
    result = kd.launch.run(
        [sys.executable, MW_WORKER, str(tmp_path), "hang"], num_workers=2,
        max_restarts=1, timeout=timeout, env=QUIET, stream=out,
        log_dir=tmp_path / "logs",
    )
    text = out.getvalue()
    assert result.ok and result.attempts == 2, text
    assert "[worker-1] stopping myself at step 3" in text
    return result, text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hang_blames_the_stopped_worker_not_the_one_waiting(tmp_path):
    # Worker 0 also stops progressing (blocked in the all-reduce with
    # worker 1); the launcher must name worker 1.
    result, text = _run_hang(tmp_path, timeout=8)
    failure = result.failures[0]
    assert (failure.worker, failure.state) == (1, kd.launch.WorkerState.HUNG)
    # Either the launcher's timeout or TF's heartbeat (ending worker 0)
    # comes first; both name the stopped worker.
    assert "[launcher]   attempt 1: worker-1 " in text
    assert "is stopped (process state T, e.g. SIGSTOP)" in text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hang_blames_the_stopped_worker_when_tf_ends_its_peer(tmp_path):
    # Without --timeout, TensorFlow's own heartbeat ends worker 0
    # ("tasks are unhealthy (stopped sending heartbeats)"); the stopped
    # worker 1 is still the one to blame.
    result, text = _run_hang(tmp_path, timeout=None)
    failure = result.failures[0]
    assert (failure.worker, failure.state) == (1, kd.launch.WorkerState.HUNG)
    assert ("worker-1 is stopped (process state T, e.g. SIGSTOP) and made "
            "no progress; worker-0 exited with status 1 waiting for it "
            "(hung)") in text


def test_permanent_error_outside_the_launcher_exits_as_usual(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k != kd.launch.ENV_RESTART_COUNT}
    p = supervisor.Process(_python("""
        import kerasdist
        from kerasdist.errors import PermanentError
        raise PermanentError("bad")
    """), env=env, capture=True)
    try:
        wait_for(lambda: not p.running(), 30, p)
    finally:
        supervisor.stop_all([p], grace=0)
    assert p.returncode == 1, p.output()
    assert "PermanentError: bad" in p.output()


@pytest.mark.timeout(60)
def test_preemptions_have_their_own_budget():
    out = io.StringIO()
    result = kd.launch.run(
        _python("import sys; sys.exit(75)"), max_restarts=0,
        max_preemptions=1, stream=out,
    )
    text = out.getvalue()
    assert (result.returncode, result.attempts) == (75, 2), text
    assert (result.restarts, result.preemptions) == (0, 1)
    assert "preemption 1/1 (not counted toward --max_restarts)" in text
    assert "no preemptions left (1 allowed); giving up" in text


@pytest.mark.timeout(90)
def test_run_workers_stops_the_peers_of_a_failed_worker():
    with pytest.raises(kd.testing.WorkersFailed) as e:
        kd.testing.run_workers(["-c", textwrap.dedent("""
            import json, os, sys, time
            index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
            print("worker", index, "up", flush=True)
            if index == 1:
                sys.exit(3)
            time.sleep(60)  # As if blocked in a collective with worker 1.
        """)], 2, timeout=80)
    message = str(e.value)
    # Failed (not timed out): worker 0 was stopped once worker 1 failed.
    assert message.startswith("multi-worker run failed:"), message
    assert "----- worker 1 (exit 3) -----\nworker 1 up" in message
    assert "----- worker 0 (exit -15) -----\nworker 0 up" in message


def test_a_signal_death_is_named_before_the_exits_it_caused(tmp_path):
    # Worker 1 is SIGKILLed and worker 0 exits 1 after it, as a peer whose
    # RPC failed does. When the launcher first looks after both ended (one
    # poll can see both), it names worker 1, the cause.
    from kerasdist.launch import hosts as hostlib
    from kerasdist.launch import protocol
    from kerasdist.launch.group import Group

    code = """
        import os, signal, sys
        if os.environ["KERASDIST_WORKER_INDEX"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(1)
    """
    spec = kd.launch.WorkerSpec(num_workers=2, command=_python(code))

    def environment(i, host, size):
        return {
            protocol.ENV_WORKER_INDEX: str(i),
            protocol.ENV_HEARTBEAT_FILE: str(tmp_path / f"worker-{i}.beat"),
        }

    group = Group(spec, 1, spec.host_list(), lambda h: hostlib.LocalStarter(),
                  str(tmp_path), lambda text: None, environment)
    group.start()
    try:
        wait_for(lambda: all(w.process.returncode is not None
                             for w in group.workers), 60)
        failure = group.check()
    finally:
        group.stop(0.0)
    assert failure is not None
    assert (failure.worker, failure.exit_code) == (1, -signal.SIGKILL), (
        failure)
    assert failure.reason == "died (SIGKILL)", failure

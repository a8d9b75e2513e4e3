"""SshStarter against a real OpenSSH server on 127.0.0.21 and 127.0.0.22.

One Debian `sshd` (tests/sshd_server.py) listens on both addresses with its
own host key and a fresh client key; workers are `tests/ssh_worker.py` run
through `SshStarter`, exactly as the launcher runs them. What is checked is
what a user sees: the variables and directory the worker gets, the exit
status, the signal the worker receives, that no remote worker is left
behind (by the PIDs the workers wrote), reachability reasons, a real
2-worker MultiWorkerMirroredStrategy fit over ssh with equal weights, and
a model pipelined over two remote stage workers by `kerasdist-run`.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import placement_worker
import pytest
import sshd_server
from test_examples import run
from test_placement_cluster import GROUP_TIMEOUT, assert_weights_equal, result

import kerasdist as kd
from kerasdist.launch import supervisor
from kerasdist.launch.hosts import Host
from kerasdist.launch.ssh import SshStarter
from kerasdist.testing import gone, kill_group, wait_for
from kerasdist.testing import hosts as hosts_lib

pytestmark = pytest.mark.real_component

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "ssh_worker.py")
PLACEMENT_WORKER = os.path.join(HERE, "placement_worker.py")
HOST_A = Host("127.0.0.21", 1)
HOST_B = Host("127.0.0.22", 1)
# The remote login environment does not have the test's variables; pass
# what the worker needs like `kerasdist-run --env` would.
BASE_ENV = {"PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = sshd_server.missing()
    if reason:
        pytest.skip(reason)
    srv = sshd_server.start(
        [HOST_A.address, HOST_B.address], str(tmp_path_factory.mktemp("sshd"))
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def starter(server, tmp_path):
    return SshStarter(server.ssh_command, cwd=str(tmp_path))


@pytest.fixture
def started():
    """Every process a test starts; stopped (and reaped) even on failure."""
    processes = []
    yield processes
    supervisor.stop_all(processes, grace=0)


def _worker(*args):
    return [sys.executable, WORKER, *map(str, args)]


def _pids(path):
    with open(path) as f:
        return [int(p) for p in f.read().split()]


def _start_ready(starter, started, host, mode, tmp_path):
    """Starts `worker.py MODE PIDFILE` on `host`, waits for its "ready";
    returns (process, remote pids)."""
    pidfile = str(tmp_path / "pids")
    p = starter.start(host, _worker(mode, pidfile), BASE_ENV, capture=True)
    started.append(p)
    wait_for(lambda: "ready" in p.output(), 60, p)
    return p, _pids(pidfile)


def test_env_cwd_and_arguments_arrive(starter, started, tmp_path,
                                      monkeypatch):
    monkeypatch.setenv("KD_LOCAL_ONLY", "must stay on the launcher")
    tricky = "it's \"quoted\" $HOME `id` ;\\ \nsecond line"
    env = {**BASE_ENV, "TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}',
           "KERASDIST_WORKER_INDEX": "0", "KD_TRICKY": tricky}
    args = ["a b", "c'd", "$HOME", "*", ""]
    p = starter.start(HOST_A, _worker("probe", *args), env, capture=True)
    started.append(p)
    wait_for(lambda: not p.running(), 60, p)
    assert p.returncode == 0, p.output()
    assert "\r" not in p.output()
    seen = json.loads(p.output())
    assert seen["cwd"] == str(tmp_path)
    assert seen["args"] == args
    assert seen["env"] == {
        "TF_CONFIG": env["TF_CONFIG"], "KERASDIST_WORKER_INDEX": "0",
        "KD_TRICKY": tricky,
    }
    # Started in its own session, with SIGINT not ignored.
    assert seen["own_session"] and seen["sigint_default"]


def test_exit_status_is_the_remote_workers(starter, started):
    codes = ["0", "75", "78", "255", "kill"]
    processes = [
        starter.start(HOST_A, _worker("exit", c), BASE_ENV, capture=True)
        for c in codes
    ]
    started.extend(processes)
    for p in processes:
        wait_for(lambda p=p: not p.running(), 60, p)
    assert [p.returncode for p in processes] == [
        0, 75, 78, 255, 128 + signal.SIGKILL
    ]
    # The worker's own 255 is not an ssh failure.
    assert [p.ssh_failure for p in processes] == [None] * 5


def test_ssh_failure_is_told_apart(server, tmp_path, started):
    closed = sshd_server.port_free_on_all([HOST_A.address])
    refused = SshStarter(
        server.ssh_command.replace(f"-p {server.port}", f"-p {closed}"),
        cwd=str(tmp_path),
    )
    lines = []
    p = refused.start(HOST_A, ["true"], BASE_ENV, sink=lines.append,
                      prefix="[worker-0] ")
    started.append(p)
    wait_for(lambda: not p.running(), 60, p)
    assert p.returncode == 255
    assert "Connection refused" in p.ssh_failure
    assert p.ssh_failure.startswith("ssh to 127.0.0.21 ended with status 255")
    assert f"[worker-0] kerasdist-ssh: {p.ssh_failure}\n" in lines


def test_missing_directory_is_a_permanent_error(server, started):
    starter = SshStarter(server.ssh_command, cwd="/nonexistent/kerasdist")
    p = starter.start(HOST_A, ["true"], BASE_ENV, capture=True)
    started.append(p)
    wait_for(lambda: not p.running(), 60, p)
    assert p.returncode == kd.launch.PERMANENT_EXIT_CODE
    assert p.ssh_failure is None
    assert "cannot enter the launcher's working directory " \
        "/nonexistent/kerasdist" in p.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1,
                                 signal.SIGINT], ids=lambda s: s.name)
def test_signal_reaches_the_remote_worker(starter, started, tmp_path, sig):
    p, (pid,) = _start_ready(starter, started, HOST_A, "signals",
                              tmp_path)
    p.signal(sig)
    wait_for(lambda: not p.running(), 30, p)
    assert p.returncode == kd.launch.RESTART_EXIT_CODE, p.output()
    assert p.output() == f"ready\ngot {sig.name}\n"
    assert gone(pid)


def test_stop_and_continue_reach_the_worker_and_show_in_state(
        starter, started, tmp_path):
    p, (pid,) = _start_ready(starter, started, HOST_A, "signals",
                              tmp_path)
    wait_for(lambda: p.state() in ("S", "R"), 10, p)
    p.signal(signal.SIGSTOP)
    wait_for(lambda: p.state() == "T", 10, p)
    assert supervisor.process_state(pid) == "T"  # The remote worker itself.
    p.signal(signal.SIGCONT)
    wait_for(lambda: p.state() in ("S", "R"), 10, p)
    p.signal(signal.SIGTERM)
    wait_for(lambda: not p.running(), 30, p)
    assert p.returncode == kd.launch.RESTART_EXIT_CODE, p.output()
    assert p.state() is None


def test_stop_all_leaves_no_remote_process(starter, tmp_path):
    pidfiles = [str(tmp_path / f"pids{i}") for i in range(2)]
    processes = [
        starter.start(HOST_A, _worker("stubborn", f), BASE_ENV, capture=True)
        for f in pidfiles
    ]
    try:
        for p in processes:
            wait_for(lambda p=p: "ready" in p.output(), 60, p)
        remote = [pid for f in pidfiles for pid in _pids(f)]
        assert all(not gone(pid) for pid in remote)
        # SIGTERM is ignored, so stop_all escalates to SIGKILL.
        supervisor.stop_all(processes, grace=1.0)
    finally:
        supervisor.stop_all(processes, grace=0)
    assert [p.returncode for p in processes] == [128 + signal.SIGKILL] * 2
    assert [p.ssh_failure for p in processes] == [None, None]
    # reap() waited for the wrapper, which waited for the worker; its
    # child in the same group got the same SIGKILL.
    wait_for(lambda: all(gone(pid) for pid in remote), 10)


@pytest.mark.parametrize("end", ["local_ssh_killed", "host_sshd_ended"])
def test_lost_ssh_connection_stops_the_remote_worker(server, starter,
                                                      tmp_path, started, end):
    sessions_before = set(sshd_server.children(server.process.pid))
    p, remote = _start_ready(starter, started, HOST_A, "stubborn", tmp_path)
    if end == "local_ssh_killed":
        # As with a SIGKILLed launcher: the host's sshd closes the
        # wrapper's input, and the wrapper kills the worker's group.
        os.kill(p.pid, signal.SIGKILL)
    else:
        # The host's sshd session process ends (sshd restarted): the
        # wrapper's input closes too.
        (session,) = set(sshd_server.children(server.process.pid)) - (
            sessions_before)
        os.kill(session, signal.SIGTERM)
    wait_for(lambda: all(gone(pid) for pid in remote), 20, p)
    wait_for(lambda: not p.running(), 20, p)
    assert p.ssh_failure is not None
    assert p.ssh_failure in p.output()
    assert "Killed" not in p.output()  # No shell noise in the output.


def test_network_cut_still_leaves_no_remote_process(server, tmp_path,
                                                     started):
    reason = hosts_lib.nftables_unavailable()
    if reason:
        pytest.skip(reason)
    starter = SshStarter(server.ssh_command, cwd=str(tmp_path),
                         kill_timeout=2.0, alive_timeout=3.0)
    p, remote = _start_ready(starter, started, HOST_B, "stubborn", tmp_path)
    assert not any(gone(pid) for pid in remote)
    with hosts_lib.partition(HOST_B.address):
        # The KILL line cannot get through: after kill_timeout the local
        # ssh is killed. The test sshd has no ClientAliveInterval, so the
        # session stays open on the host; the wrapper's keepalive check
        # (3 s without word from the launcher) kills the worker.
        supervisor.stop_all([p], grace=0)
        assert p.returncode == -signal.SIGKILL
        assert "killed by signal 9" in p.ssh_failure
        wait_for(lambda: all(gone(pid) for pid in remote), 30, p)


def test_network_cut_ends_the_session_on_the_launchers_side(server, tmp_path,
                                                          started):
    # What lets an elastic launcher notice a cut ssh host without
    # --timeout: ssh's ServerAlive check ends the local session (here after
    # 2 x 1 s instead of kerasdist's default 6 x 5 s), so the worker counts
    # as failed, and the host's wrapper kills the worker on its side.
    reason = hosts_lib.nftables_unavailable()
    if reason:
        pytest.skip(reason)
    starter = SshStarter(
        server.ssh_command
        + " -o ServerAliveInterval=1 -o ServerAliveCountMax=2",
        cwd=str(tmp_path), alive_timeout=3.0,
    )
    p, remote = _start_ready(starter, started, HOST_B, "stubborn", tmp_path)
    with hosts_lib.partition(HOST_B.address):
        wait_for(lambda: not p.running(), 60, p)
        assert p.returncode == 255, p.output()
        assert "before the worker reported its exit" in p.ssh_failure
        # The test's ssh runs with LogLevel=ERROR, which hides ssh's own
        # "Timeout, server ... not responding": kerasdist says what it means.
        assert "the connection was lost" in p.ssh_failure, p.ssh_failure
        wait_for(lambda: all(gone(pid) for pid in remote), 30, p)


def test_heartbeat_is_relayed_and_keepalive_spares_a_live_worker(
        starter, started, tmp_path):
    starter = SshStarter(starter.ssh_argv, cwd=starter.cwd,
                         alive_timeout=2.0)
    local = tmp_path / "worker-0.heartbeat"
    local.touch()
    os.utime(local, (0, 0))
    env = {**BASE_ENV, kd.launch.ENV_HEARTBEAT_FILE: str(local)}
    p = starter.start(HOST_A, _worker("beat"), env, capture=True)
    started.append(p)
    wait_for(lambda: not p.running(), 60, p)
    # The worker ran twice as long as alive_timeout: the keepalive kept it.
    assert p.returncode == 0, p.output()
    remote = p.output().strip()
    assert remote != str(local)
    assert local.stat().st_mtime > time.time() - 60  # relayed touches
    assert not os.path.exists(remote)  # the wrapper cleaned up


def test_heartbeat_json_is_relayed_as_written(starter, started, tmp_path):
    """Issue 19: one heartbeat format. The worker's JSON object (its
    goodput facts, "finished") reaches the launcher's file unchanged."""
    local = tmp_path / "worker-0.heartbeat"
    local.write_text("")
    env = {**BASE_ENV, kd.launch.ENV_HEARTBEAT_FILE: str(local)}
    facts = {"attempt": 0, "step_seconds": 1.5, "finished": True}
    code = (
        "import json, os, time\n"
        "with open(os.environ['KERASDIST_HEARTBEAT_FILE'], 'w') as f:\n"
        f"    f.write(json.dumps({facts!r}) + '\\n')\n"
    )  # and exits at once: the wrapper relays the file once more at exit
    p = starter.start(HOST_A, [sys.executable, "-c", code], env,
                      capture=True)
    started.append(p)
    wait_for(lambda: not p.running(), 60, p)
    assert p.reap() == 0, p.output()  # reap: every relayed line was read
    assert json.loads(local.read_text()) == facts
    assert kd.launch.protocol.heartbeat_says_finished(local.read_text())


def test_reachable(server, starter, tmp_path):
    # Generous: a loaded machine may take seconds to fork sshd's session.
    assert starter.reachable(HOST_A, timeout=30) is None
    assert starter.reachable(HOST_B, timeout=30) is None
    # A host where nothing listens on the port.
    why = starter.reachable(Host("127.0.0.24", 1), timeout=10)
    assert "Connection refused" in why and "127.0.0.24" in why
    # A key the server does not know.
    sshd_server.keygen(str(tmp_path / "other_key"))
    stranger = SshStarter(
        server.ssh_command.replace(server.client_key,
                                   str(tmp_path / "other_key")))
    assert "Permission denied" in stranger.reachable(HOST_A, timeout=30)


def test_stopped_server_is_unreachable(server, tmp_path):
    other = sshd_server.start(["127.0.0.23"], str(tmp_path / "sshd"),
                              client_key=server.client_key)
    try:
        starter = SshStarter(other.ssh_command)
        host = Host("127.0.0.23", 1)
        assert starter.reachable(host, timeout=30) is None
    finally:
        other.stop()
    why = starter.reachable(host, timeout=10)
    assert "Connection refused" in why and "127.0.0.23" in why


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"ssh_command=''"):
        SshStarter("")
    with pytest.raises(ValueError, match=r"kill_timeout=0"):
        SshStarter(kill_timeout=0)
    with pytest.raises(ValueError, match=r"alive_timeout=-1"):
        SshStarter(alive_timeout=-1)
    with pytest.raises(ValueError, match=r"'BAD-NAME'"):
        SshStarter().start(HOST_A, ["true"], {"BAD-NAME": "1"})
    with pytest.raises(ValueError, match=r"command=\[\]"):
        SshStarter().start(HOST_A, [], {})


def test_two_worker_training_over_ssh(starter, started, tmp_path):
    hosts = [HOST_A, HOST_B]
    # Ports are picked on each host itself, over ssh.
    ports = [starter.free_ports(h, 1)[0] for h in hosts]
    addresses = [
        f"{h.address}:{port}" for h, port in zip(hosts, ports, strict=True)
    ]
    processes = []
    for i, host in enumerate(hosts):
        env = {**BASE_ENV, "TF_CONFIG": json.dumps(
            kd.cluster.make_tf_config(addresses, i))}
        processes.append(starter.start(
            host, _worker("train", tmp_path), env, capture=True,
            prefix=f"[worker-{i}] "))
    started.extend(processes)
    for p in processes:
        wait_for(lambda p=p: not p.running(), 240, p)
    assert [p.returncode for p in processes] == [0, 0], "\n".join(
        p.output() for p in processes)
    w0, w1 = (np.load(tmp_path / f"weights-{i}.npz") for i in range(2))
    assert int(w0["replicas"]) == int(w1["replicas"]) == 2
    for i in range(4):
        np.testing.assert_array_equal(w0[f"trained{i}"], w1[f"trained{i}"])
        assert not np.array_equal(w0[f"trained{i}"], w0[f"initial{i}"])
    assert w0["loss"][-1] < w0["loss"][0]


def _launch(tmp_path, name, hosts_args, log):
    out = tmp_path / name
    return subprocess.Popen(
        [sys.executable, "-m", "kerasdist.launch", *hosts_args,
         "--max_restarts", "0", "--grace_period", "60", "--",
         sys.executable, os.path.join(HERE, "elastic_hosts_worker.py"),
         "--out", str(out), "--backup_dir", str(out / "backup"),
         "--pid_dir", str(out / "pids"), "--step_delay", "0.2"],
        stdout=log, stderr=subprocess.STDOUT, cwd=HERE,
        start_new_session=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
             "PYTHONPATH": os.pathsep.join((HERE, REPO))},
    )


def test_kerasdist_run_over_ssh_saves_on_sigterm_and_resumes(server,
                                                             tmp_path):
    """`kerasdist-run --starter ssh`: SIGTERM to the launcher reaches the
    workers over ssh, they save at the next step and exit 75; a second run
    resumes there, and the result is the unfailed local run's."""
    import fault_worker

    ssh = ["--hosts", f"{HOST_A.address},{HOST_B.address}", "--starter",
           "ssh", "--ssh_command", server.ssh_command,
           "--env", f"PYTHONPATH={HERE}{os.pathsep}{REPO}",
           "--env", "TF_CPP_MIN_LOG_LEVEL=3"]
    logs = tmp_path / "launcher.log"
    with open(logs, "w") as log:
        first = _launch(tmp_path, "ssh", ssh, log)
        try:
            steps = tmp_path / "ssh" / "steps-0.jsonl"
            wait_for(lambda: steps.exists() and len(
                fault_worker.read_steps(steps)) >= 6, 240)
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=120)
        finally:
            kill_group(first)
        assert first.returncode == 128 + signal.SIGTERM, logs.read_text()
        second = _launch(tmp_path, "ssh", ssh, log)
        reference = _launch(
            tmp_path, "local", ["--hosts", "127.0.0.2,127.0.0.3"], log)
        try:
            for p in (second, reference):
                p.wait(timeout=300)
        finally:
            kill_group(second)
            kill_group(reference)
    text = logs.read_text()
    assert second.returncode == 0 and reference.returncode == 0, text[-6000:]
    assert "[worker-1@127.0.0.22] worker 1 done" in text
    assert "kerasdist: preempted (SIGTERM); saved at epoch" in text
    # The workers' goodput facts reach the launcher over ssh (the wrapper
    # relays the heartbeat's JSON): every summary, ssh runs included, has
    # a measured goodput line.
    assert text.count("[launcher] goodput ") == 3, text[-6000:]
    assert "goodput not measured" not in text, text[-6000:]
    records = fault_worker.read_steps(tmp_path / "ssh" / "steps-0.jsonl")
    assert {r["attempt"] for r in records} == {0}  # A new run each time.
    assert fault_worker.retrained(records) == 0  # SIGTERM loses nothing.
    expected = fault_worker.fingerprints(fault_worker.read_steps(
        tmp_path / "local" / "steps-0.jsonl"))
    assert fault_worker.fingerprints(records) == expected
    got = np.load(tmp_path / "ssh" / "final.npz")
    want = np.load(tmp_path / "local" / "final.npz")
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(420)
def test_pipeline_over_ssh_chief_on_one_host_stages_on_the_other(
    server, tmp_path
):
    """`kerasdist-run --starter ssh` with model parallelism: the chief on
    127.0.0.21 pipelines tests/placement_worker.py's MLP over workers 1 and
    2 on 127.0.0.22, which serve and exit 0 when the chief is done."""
    hosts = f"{HOST_A.address}:1,{HOST_B.address}:2"
    code, output = run(
        [sys.executable, "-m", "kerasdist.launch", "--hosts", hosts,
         "--starter", "ssh", "--ssh_command", server.ssh_command,
         "--env", f"PYTHONPATH={HERE}{os.pathsep}{REPO}",
         "--env", "TF_CPP_MIN_LOG_LEVEL=3", "--max_restarts", "0", "--",
         sys.executable, PLACEMENT_WORKER, "--out", str(tmp_path),
         "--scenarios", "pipeline"],
        GROUP_TIMEOUT,
    )
    assert code == 0, output[-6000:]
    assert "SUCCEEDED after 1 attempt(s)" in output, output[-6000:]
    res, weights = result(tmp_path, "pipeline")
    assert_weights_equal(weights, placement_worker.reference("pipeline"))
    placement_worker.assert_on_stage_workers(res["placement"])
    hosts_seen = [a.rsplit(":", 1)[0] for a in res["addresses"]]
    assert hosts_seen == [HOST_A.address, HOST_B.address, HOST_B.address]
    # What the user sees: each stage worker's lines, prefixed with its
    # host, say where it served and that it ended with the chief.
    for rank in (1, 2):
        prefix = f"[worker-{rank}@{HOST_B.address}] "
        lines = [ln for ln in output.splitlines() if ln.startswith(prefix)]
        assert any(
            f"kerasdist: worker {rank} serves model parallelism at "
            f"{res['addresses'][rank]}" in ln for ln in lines
        ), output[-6000:]
        assert any(
            "model-parallel server exits 0: the chief finished" in ln
            for ln in lines
        ), output[-6000:]


def test_wrapper_script_speaks_this_modules_protocol():
    """ssh_wrapper.sh (a package file, checked by shellcheck) prints the
    status lines SshProcess reads and exits with the permanent-error code
    when the working directory is missing."""
    from kerasdist.launch import protocol, ssh

    script = ssh.wrapper_script()
    assert not any(line.startswith("#") for line in script.splitlines())
    for word in (ssh._STATUS, ssh._BEAT, ssh._STATE,  # noqa: SLF001
                 f"exit {protocol.PERMANENT_EXIT_CODE}\n"):
        assert word in script, f"ssh_wrapper.sh lost {word!r}"

"""A real Flower deployment on 127.0.0.1: `flower-superlink`, two
`flower-supernode` processes (each with its own data partition) and
`flwr run` of an app built with kerasdist.integrations.flower. Every process
is started in its own process group and stopped by it; loopback ports only.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from kerasdist.testing import kill_group

pytest.importorskip("flwr")

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "flower_deploy_app")
BIN = os.path.dirname(sys.executable)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, n=3000):
    with open(path) as f:
        return f.read()[-n:]


def _wait_listening(port, proc, log, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}:\n"
                        f"{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"nothing listening on 127.0.0.1:{port} after {timeout}s:\n"
                f"{_tail(log)}")


@pytest.mark.real_component
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_superlink_and_two_supernodes_train_and_improve(tmp_path):
    if shutil.which("flower-superlink", path=BIN) is None:
        pytest.skip("flower-superlink is not installed next to Python")
    port = _free_port()
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    out = tmp_path / "metrics.json"
    repo = os.path.dirname(HERE)
    env = dict(
        os.environ,
        PATH=os.pathsep.join([BIN, os.environ.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(
            [HERE, repo, os.environ.get("PYTHONPATH", "")]),
        FLWR_HOME=str(home), KD_FLOWER_OUT=str(out),
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.pop("TF_CONFIG", None)
    procs = []

    def start(name, argv):
        log = str(tmp_path / f"{name}.log")
        proc = subprocess.Popen(
            argv, env=env, cwd=str(tmp_path), stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc, log

    try:
        link, link_log = start("superlink", [
            os.path.join(BIN, "flower-superlink"), "--insecure",
            "--host", "127.0.0.1", "--port", str(port)])
        _wait_listening(port, link, link_log, timeout=120)
        for i in (0, 1):
            node_port = _free_port()
            node, node_log = start(f"supernode{i}", [
                os.path.join(BIN, "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{port}",
                "--node-config", f"partition-id={i} num-partitions=2",
                "--host", "127.0.0.1", "--port", str(node_port)])
            _wait_listening(node_port, node, node_log, timeout=120)
        run = subprocess.run(
            [os.path.join(BIN, "flwr"), "run", APP, "local", "--stream"],
            env=env, cwd=str(tmp_path), capture_output=True, text=True,
            timeout=420, start_new_session=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(1)
        assert out.exists(), (
            "the ServerApp wrote no metrics:\n" + run.stdout[-3000:]
            + _tail(link_log))
    finally:
        for proc in procs:
            kill_group(proc, grace=5.0)
    metrics = json.loads(out.read_text())
    losses = [metrics[str(r)]["loss"] for r in (0, 1, 2)]
    assert losses[0] > losses[1] > losses[2], metrics
    assert metrics["2"]["accuracy"] > 0.8, metrics

"""The Flower deployment of docs/guide/communication.md, run as written.

The app's files (`pyproject.toml`, `fed_app.py`), `$FLWR_HOME/config.toml`
and the commands are taken from the page (the blocks marked
`<!-- flower-app: NAME -->`): a real `flower-superlink`, two
`flower-supernode` processes (each with its own data partition) and `flwr
run` of the app, on 127.0.0.1. Only the ports are changed, to free ones.
Every process runs in its own process group and is stopped by it.
"""

import ast
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from kerasdist.testing import kill_group

pytest.importorskip("flwr")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAGE = os.path.join(ROOT, "docs", "guide", "communication.md")
BIN = os.path.dirname(sys.executable)
MARK = re.compile(r"<!-- flower-app: (.+?) -->")


def docs_blocks(path=PAGE):
    """{name: text} of the fenced blocks marked `<!-- flower-app: name -->`.

    The marker may be followed by other `<!-- ... -->` lines (such as
    tests/test_docs_code.py's `<!-- docs: compile-only -->`) before the
    fence.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks = {}
    for i, line in enumerate(lines):
        mark = MARK.fullmatch(line.strip())
        if not mark:
            continue
        j = i + 1
        while lines[j].strip().startswith("<!--"):
            j += 1
        assert lines[j].startswith("```"), f"{path}:{j + 1}: no fence"
        end = lines.index("```", j + 1)
        blocks[mark.group(1)] = "\n".join(lines[j + 1:end]) + "\n"
    return blocks


def commands(text):
    """The shell block's commands, continuation lines joined, split."""
    joined = text.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


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
            pytest.fail(f"exited with {proc.returncode}:\n{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"nothing listening on 127.0.0.1:{port} after {timeout}s:\n"
                f"{_tail(log)}")


def test_docs_give_a_complete_app_and_the_commands():
    blocks = docs_blocks()
    assert set(blocks) == {"pyproject.toml", "fed_app.py",
                           "$FLWR_HOME/config.toml", "commands"}
    try:
        import tomllib
    except ImportError:  # Python 3.10: Flower depends on tomli
        import tomli as tomllib
    from flwr.common.config import validate_fields_in_config
    ok, errors, warnings = validate_fields_in_config(
        tomllib.loads(blocks["pyproject.toml"]))
    assert ok and not errors and not warnings, (errors, warnings)
    programs = [argv[0] for argv in commands(blocks["commands"])]
    assert programs == ["flower-superlink", "flower-supernode",
                        "flower-supernode", "flwr"]


def _rounds(stream):
    """Server-side (loss, accuracy) per round, from `flwr run --stream`."""
    found = re.findall(
        r"Global evaluation[^\n]*\n[^\n]*MetricRecord: (\{[^}]*\})", stream)
    metrics = [ast.literal_eval(text) for text in found]
    return [(m["loss"], m["accuracy"]) for m in metrics]


@pytest.mark.real_component
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_docs_deployment_runs_and_improves(tmp_path):
    if shutil.which("flower-superlink", path=BIN) is None:
        pytest.skip("flower-superlink is not installed next to Python")
    blocks = docs_blocks()
    app = tmp_path / "app"
    app.mkdir()
    for name in ("pyproject.toml", "fed_app.py"):
        (app / name).write_text(blocks[name])
    home = tmp_path / "flwr_home"
    home.mkdir()
    ports = {"9091": _free_port(), "9100": _free_port(),
             "9101": _free_port()}

    def free(text):
        for doc_port, port in ports.items():
            text = text.replace(f":{doc_port}", f":{port}").replace(
                f"--port {doc_port}", f"--port {port}")
        return text

    (home / "config.toml").write_text(free(blocks["$FLWR_HOME/config.toml"]))
    argvs = commands(free(blocks["commands"]))
    env = dict(
        os.environ,
        PATH=os.pathsep.join([BIN, os.environ.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        FLWR_HOME=str(home),
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
        link, link_log = start("superlink", argvs[0])
        _wait_listening(ports["9091"], link, link_log, timeout=120)
        # Both supernodes start at once (each connects to the superlink
        # on its own), then each is awaited.
        nodes = [(start(f"supernode{i}", argv),
                  int(argv[argv.index("--port") + 1]))
                 for i, argv in enumerate(argvs[1:3])]
        for (node, node_log), port in nodes:
            _wait_listening(port, node, node_log, timeout=120)
        run_argv = [str(app) if a == "path/to/app" else a
                    for a in argvs[3]]
        run = subprocess.run(
            run_argv, env=env, cwd=str(tmp_path), capture_output=True,
            text=True, timeout=420, start_new_session=True)
    finally:
        for proc in procs:
            kill_group(proc, grace=5.0)
    stream = run.stdout + run.stderr
    assert run.returncode == 0, stream[-3000:] + _tail(link_log)
    rounds = _rounds(stream)
    assert len(rounds) == 3, stream[-3000:]
    losses = [loss for loss, _ in rounds]
    assert losses[0] > losses[1] > losses[2], rounds
    assert rounds[-1][1] > 0.8, rounds
    # Each log line once (absl's root handler no longer repeats Flower's).
    assert stream.count("[ROUND 2/3]") == 1, stream[-3000:]

"""`kerasdist-run` across hosts: the host list, bad input, start-up checks.

The training scenarios (hosts lost, cut off, back) are in
test_elastic_hosts.py; these are the quick checks a user meets first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import kerasdist as kd
from kerasdist.launch import hosts as hostlib
from kerasdist.testing import hosts as testbed
from kerasdist.testing import kill_group


def _cli(*args, cwd=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "kerasdist.launch", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )


def _touch_command(path):
    return [sys.executable, "-c", f"open({str(path)!r}, 'w').close()"]


def test_workers_spread_over_hosts_with_their_slots(tmp_path):
    script = (
        "import json, os; c = json.loads(os.environ['TF_CONFIG']); "
        "print('W', c['task']['index'], os.environ['KERASDIST_HOST'], "
        "os.environ['KERASDIST_NUM_WORKERS'], "
        "os.environ.get('KERASDIST_MIN_WORKERS'), "
        "os.environ.get('KERASDIST_MAX_WORKERS'), "
        "os.environ.get('KERASDIST_WORKER_SIZES'), *c['cluster']['worker'])"
    )
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two hosts\n127.0.0.2 slots=2\n127.0.0.3  # one\n")
    proc = _cli("--hostfile", str(hostfile), "--num_workers", "1",
                "--min_workers", "1", "--", sys.executable, "-c", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = sorted(line.split("] ", 1)[1].split()
                  for line in proc.stdout.splitlines() if "] W " in line)
    # Sizes the hosts' slots (2 + 1) add up to, from --min_workers 1.
    assert [r[1:8] for r in rows] == [
        ["0", "127.0.0.2", "3", "1", "3", "1,2,3", rows[0][7]],
        ["1", "127.0.0.2", "3", "1", "3", "1,2,3", rows[0][7]],
        ["2", "127.0.0.3", "3", "1", "3", "1,2,3", rows[0][7]],
    ]
    cluster = rows[0][7:]
    assert [a.rsplit(":", 1)[0] for a in cluster] == [
        "127.0.0.2", "127.0.0.2", "127.0.0.3"]
    assert len({a.rsplit(":", 1)[1] for a in cluster}) == 3
    assert "[worker-2@127.0.0.3]" in proc.stdout


def test_one_host_default_is_unchanged():
    spec = kd.launch.WorkerSpec(["true"], num_workers=2)
    assert not spec.multi_host and not spec.elastic
    assert spec.host_list() == [hostlib.Host("127.0.0.1", 2)]


@pytest.mark.parametrize("args, message", [
    (["--hosts", "127.0.0.2,127.0.0.2"],
     "Host '127.0.0.2' appears twice in hosts='127.0.0.2,127.0.0.2' "
     "(entries 1 and 2). List each host once and give its worker count "
     "as 127.0.0.2:SLOTS."),
    (["--hosts", "127.0.0.2,node_7!"],
     "Invalid host 'node_7!' in hosts='127.0.0.2,node_7!': 'node_7!' is "
     "neither an IP address nor a host name."),
    (["--hosts", "127.0.0.2:zero"],
     "slots 'zero' is not a positive integer"),
    (["--hosts", "127.0.0.2,,127.0.0.3"], "empty entry"),
    (["--hosts", "127.0.0.2:2,127.0.0.3", "--min_workers", "4"],
     "Invalid value for argument `min_workers`. Received: min_workers=4, "
     "more than the 3 worker(s) of all hosts together. Expected "
     "1 <= min_workers <= 3"),
    (["--hosts", "127.0.0.2", "--min_workers", "0"],
     "min_workers"),
    (["--num_workers", "2", "--min_workers", "3"],
     "Received: min_workers=3, more than the 2 worker(s)"),
    (["--hosts", "127.0.0.2", "--hostfile", "hosts.txt"],
     "Both `hosts` and `hostfile` were given"),
    (["--hostfile", "no-such-file"],
     "Invalid value for argument `hostfile`. Received: "
     "hostfile='no-such-file', which cannot be read"),
    (["--hosts", "127.0.0.2", "--starter", "rsh"],
     "Invalid value for argument `starter`. Received: starter='rsh'. "
     "Expected one of ('auto', 'local', 'ssh')."),
    (["--hosts", "127.0.0.2", "--host_wait", "-1"],
     "Invalid value for argument `host_wait`"),
])
def test_bad_host_options_fail_before_anything_starts(tmp_path, args,
                                                      message):
    marker = tmp_path / "started"
    proc = _cli(*args, "--", *_touch_command(marker), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not marker.exists()


def test_hostfile_line_is_named(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.2\n127.0.0.3 slots=x\n")
    with pytest.raises(kd.launch.LauncherError, match=(
        rf"Invalid host '127.0.0.3 slots=x' in hostfile '{hostfile}' "
        "line 2: slots 'x' is not a positive integer")):
        kd.launch.run(["true"], hostfile=str(hostfile))


@pytest.mark.real_component
def test_unreachable_host_at_start_is_refused(tmp_path):
    why = testbed.nftables_unavailable()
    if why:
        pytest.skip(f"cutting a host off needs nftables: {why}")
    marker = tmp_path / "started"
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "ckpt-1.keras").write_bytes(b"saved")
    with testbed.partition("127.0.0.5"):
        proc = _cli("--hosts", "127.0.0.2,127.0.0.5", "--",
                    *_touch_command(marker), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        "Host(s) unreachable at start: 127.0.0.5 (no answer within 1s). "
        "Nothing was started."
    ) in proc.stderr
    assert "remove it from --hosts/--hostfile" in proc.stderr
    assert not marker.exists()
    assert (backup / "ckpt-1.keras").read_bytes() == b"saved"


def test_parse_hosts_keeps_order_and_slots():
    assert hostlib.parse_hosts(["127.0.0.3:2", "node-1.example"], 4) == [
        hostlib.Host("127.0.0.3", 2), hostlib.Host("node-1.example", 4)]
    assert hostlib.is_local_address("127.0.0.9")
    assert os.environ.get("KERASDIST_HOST") is None


_SLEEPER = (
    "import os, time; "
    "time.sleep(0.5 if os.environ['KERASDIST_NUM_WORKERS'] == '1' else 120)"
)


@pytest.mark.real_component
@pytest.mark.parametrize("elastic, wait", [(False, 1), (True, 1), (True, 0)])
def test_host_that_stays_cut_off(tmp_path, elastic, wait):
    """Cut off mid-run: no progress for --timeout, the host does not answer
    for --host_wait; an elastic run goes on with the other host (at once
    with --host_wait 0), a fixed one gives up with the reason."""
    why = testbed.nftables_unavailable()
    if why:
        pytest.skip(f"cutting a host off needs nftables: {why}")
    args = ["--hosts", "127.0.0.6,127.0.0.7", "--timeout", "2",
            "--host_wait", str(wait), "--max_restarts", "2"]
    if elastic:
        args += ["--min_workers", "1"]
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kerasdist.launch", *args, "--",
             sys.executable, "-c", _SLEEPER],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "attempt 1: starting" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (
                log.read_text())
            time.sleep(0.05)
        with testbed.partition("127.0.0.7"):
            proc.wait(timeout=120)
    finally:
        kill_group(proc)
    out = log.read_text()
    if wait:
        assert "host 127.0.0.7 is unreachable (no answer within 1s); " \
            "waiting up to 1s for it" in out, out
    else:
        assert "host 127.0.0.7 is unreachable (no answer within 1s)\n" \
            in out, out
        assert "waiting up to" not in out
    if elastic:
        assert proc.returncode == 0, out
        assert "going on without 127.0.0.7: 1 worker(s) on 1 host(s) " \
            "(--min_workers 1)" in out
        assert "workers per attempt: 2 -> 1" in out
    else:
        assert proc.returncode == 124, out  # The hang's status.
        assert (
            "127.0.0.7 still unreachable after 1s; the hosts left have 1 "
            "worker slot(s), fewer than the 2 needed (not elastic: pass "
            "--min_workers to go on with fewer); giving up"
        ) in out


class _Launcher:
    """`kerasdist-run --log_dir LOGS ...` in the background; waits on its
    events (`LOGS/events.jsonl`), never on its console text or on time."""

    def __init__(self, tmp_path, *args):
        self.logs = tmp_path / "logs"
        self.out = tmp_path / "launcher.log"
        with open(self.out, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kerasdist.launch", "--log_dir",
                 str(self.logs), *args],
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def events(self):
        return kd.launch.read_events(self.logs)

    def wait_event(self, name, timeout=120.0, **fields):
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events():
                if e["event"] == name and all(
                        e.get(k) == v for k, v in fields.items()):
                    return e
            assert self.proc.poll() is None, (
                f"the launcher ended (status {self.proc.returncode}) "
                f"before event {name!r} {fields}:\n{self.out.read_text()}")
            assert time.monotonic() < deadline, (
                f"no event {name!r} {fields} within {timeout:g}s:\n"
                f"{self.out.read_text()}")
            time.sleep(0.05)

    def wait(self, timeout=120.0):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not end within {timeout:g}s:\n"
                        f"{self.out.read_text()}")
        return self.proc.returncode, self.out.read_text()

    def stop(self):
        kill_group(self.proc)


@pytest.fixture
def launcher(tmp_path):
    started = []

    def start(*args):
        started.append(_Launcher(tmp_path, *args))
        return started[-1]

    yield start
    for one in started:
        one.stop()


@pytest.fixture
def nftables():
    """Skips (a failure under CI=true) where hosts cannot be cut off."""
    why = testbed.nftables_unavailable()
    if why:
        pytest.skip(f"cutting a host off needs nftables: {why}")


_SILENT = "import time; time.sleep(120)"


@pytest.mark.real_component
@pytest.mark.parametrize("elastic, sig", [
    (False, signal.SIGTERM), (True, signal.SIGTERM), (True, signal.SIGINT)])
def test_signal_during_host_wait_starts_nothing(launcher, nftables, elastic,
                                               sig):
    """Issue 25 (3, 4): SIGTERM/SIGINT while the launcher waits for a lost
    host ends the run at once with 128 + signal: no new group, no "going on
    without", no "giving up", one INTERRUPTED summary."""
    args = ["--hosts", "127.0.0.8,127.0.0.9", "--timeout", "2",
            "--host_wait", "60", "--max_restarts", "2"]
    if elastic:
        args += ["--min_workers", "1"]
    run = launcher(*args, "--", sys.executable, "-c", _SILENT)
    run.wait_event("attempt_started", attempt=1)
    with testbed.partition("127.0.0.9"):
        run.wait_event("host_unreachable", host="127.0.0.9")
        run.proc.send_signal(sig)
        code, out = run.wait(timeout=60)
    assert code == 128 + sig, out
    names = [e["event"] for e in run.events()]
    assert names.count("attempt_started") == 1, names
    assert not {"shrunk", "gave_up", "grew"} & set(names), names
    assert names[-1] == "run_ended", names
    ended = run.events()[-1]
    assert (ended["returncode"], ended["outcome"]) == (
        128 + sig, f"INTERRUPTED ({signal.Signals(sig).name})"), ended
    assert "going on without" not in out and "giving up" not in out, out
    assert out.count("summary:") == 1, out


_STOPS_ON_SECOND_HOST = """
import os, signal, time
if os.environ["KERASDIST_HOST"] == "127.0.0.11":
    os.kill(os.getpid(), signal.SIGSTOP)  # Never gets going.
beat = os.environ["KERASDIST_HEARTBEAT_FILE"]
alone = os.environ["KERASDIST_NUM_WORKERS"] == "1"
for _ in range(8 if alone else 100_000):  # With a stuck peer: forever.
    time.sleep(0.25)
    os.utime(beat)
"""


def test_host_whose_workers_never_start_is_excluded(launcher):
    """Issue 25 (2): a host that answers probes but whose workers stop at
    start-up in two attempts in a row is dropped like a lost host (elastic),
    instead of spending every restart on it."""
    run = launcher("--hosts", "127.0.0.10,127.0.0.11", "--min_workers", "1",
                   "--timeout", "3", "--max_restarts", "4", "--",
                   sys.executable, "-c", _STOPS_ON_SECOND_HOST)
    code, out = run.wait(timeout=120)
    assert code == 0, out
    got = run.events()
    hung = [e for e in got if e["event"] == "worker_hung"]
    assert [(e["host"], e["at_start"]) for e in hung] == [
        ("127.0.0.11", True)] * 2, got
    excluded = [e for e in got if e["event"] == "host_excluded"]
    assert [e["host"] for e in excluded] == ["127.0.0.11"], got
    shrunk = [e for e in got if e["event"] == "shrunk"]
    assert [(e["old_size"], e["new_size"], e["lost"]) for e in shrunk] == [
        (2, 1, ["127.0.0.11"])], got
    assert got[-1]["sizes"] == [2, 2, 1], got[-1]
    assert "host 127.0.0.11: its workers hung or died at start-up in 2 " \
        "attempts in a row; going on without it" in out


@pytest.mark.real_component
def test_elastic_start_without_an_unreachable_host(launcher, nftables,
                                                   tmp_path):
    """Issue 25 (5): with --min_workers, a host down at launch is not
    fatal: the run starts on the hosts that answer."""
    marker = tmp_path / "trained"
    with testbed.partition("127.0.0.13"):
        run = launcher("--hosts", "127.0.0.12,127.0.0.13", "--min_workers",
                       "1", "--", *_touch_command(marker))
        code, out = run.wait(timeout=60)
    assert code == 0, out
    assert marker.exists()
    names = [e["event"] for e in run.events()]
    assert names[:3] == ["host_unreachable", "shrunk", "attempt_started"], (
        names)
    shrunk = run.events()[1]
    assert (shrunk["lost"], shrunk["old_size"], shrunk["new_size"]) == (
        ["127.0.0.13"], 2, 1)
    assert run.events()[2]["size"] == 1


_FINISHES_THEN_WORKS_ON = """
import os, sys, time
# What protocol.report_training_finished() does when fit returns.
with open(os.environ["KERASDIST_HEARTBEAT_FILE"], "w") as f:
    f.write('{"finished": true}\\n')
open(os.path.join(sys.argv[1], "reported"), "w").close()
time.sleep(8)  # Post-fit work (export, evaluation) a grow would cut short.
open(os.path.join(sys.argv[1], "post-fit-done"), "w").close()
"""


@pytest.mark.real_component
def test_no_grow_once_training_finished(launcher, nftables, tmp_path):
    """Issue 25 (4): once a worker said training is done, a host that
    comes back does not resize the group (its post-fit code runs once, to
    the end)."""
    reported = tmp_path / "reported"
    with testbed.partition("127.0.0.15"):
        run = launcher("--hosts", "127.0.0.14,127.0.0.15", "--min_workers",
                       "1", "--timeout", "60", "--", sys.executable, "-c",
                       _FINISHES_THEN_WORKS_ON, str(tmp_path))
        deadline = time.monotonic() + 60
        while not reported.exists():  # The worker's own report.
            assert run.proc.poll() is None and time.monotonic() < deadline, (
                f"the worker did not report within 60s:\n"
                f"{run.out.read_text()}")
            time.sleep(0.05)
    # 127.0.0.15 answers again from here on, for the worker's last 8 s.
    code, out = run.wait(timeout=60)
    assert code == 0, out
    assert (tmp_path / "post-fit-done").exists(), out
    names = [e["event"] for e in run.events()]
    assert names.count("attempt_started") == 1, names
    assert "hosts_returned" not in names and "grew" not in names, names
    assert run.events()[-1]["sizes"] == [1], names

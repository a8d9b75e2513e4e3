"""Emulated hosts: loopback addresses, nftables partitions, stalls."""

import contextlib
import socket
import subprocess
import sys
import time

import pytest

from kerasdist.testing import hosts as hosts_lib


def _server(address):
    server = socket.socket()
    server.bind((address, 0))
    server.listen()
    return server


def _can_connect(source, server, timeout=1.0):
    client = socket.socket()
    client.settimeout(timeout)
    client.bind((source, 0))
    try:
        client.connect(server.getsockname())
        return True
    except OSError:  # timeout (dropped) or refused
        return False
    finally:
        client.close()


def _tables():
    return subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=30
    ).stdout


@pytest.fixture
def nft():
    reason = hosts_lib.nftables_unavailable()
    if reason:
        pytest.skip(reason)
    before = _tables()
    yield
    assert _tables() == before, "a partition left an nftables table behind"


def test_hosts_are_loopback_addresses():
    h = hosts_lib.emulated_hosts(3)
    assert [x.address for x in h] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert [x.name for x in h] == ["host-0", "host-1", "host-2"]
    server = _server(h[1].address)
    with contextlib.closing(server):
        assert _can_connect(h[0].address, server)


@pytest.mark.parametrize("address", ["10.0.0.1", "192.168.1.2", "::1", "x"])
def test_non_loopback_address_is_refused(address):
    with pytest.raises(ValueError, match=r"Expected an IPv4 address in "
                       r"127\.0\.0\.0/8"):
        hosts_lib.EmulatedHost("h", address)


def test_too_many_hosts_is_refused():
    with pytest.raises(ValueError, match="argument `n`. Received: n=0"):
        hosts_lib.emulated_hosts(0)
    with pytest.raises(ValueError, match="first \\+ n - 1 <= 254"):
        hosts_lib.emulated_hosts(300)


@pytest.mark.real_component
def test_partition_cuts_one_host_off_and_is_removed(nft):
    h0, h1, h2 = hosts_lib.emulated_hosts(3)
    to_h1, to_h2 = _server(h1.address), _server(h2.address)
    with contextlib.closing(to_h1), contextlib.closing(to_h2):
        with hosts_lib.partition(h1) as table:
            assert table in _tables()
            assert not _can_connect(h0.address, to_h1)
            assert _can_connect(h0.address, to_h2)  # others unaffected
        assert table not in _tables()
        assert _can_connect(h0.address, to_h1)


@pytest.mark.real_component
def test_partition_is_removed_on_failure(nft):
    h0, h1 = hosts_lib.emulated_hosts(2)
    with pytest.raises(RuntimeError, match="test body failed"):
        with hosts_lib.partition(h1):
            raise RuntimeError("test body failed")
    server = _server(h1.address)
    with contextlib.closing(server):
        assert _can_connect(h0.address, server)


@pytest.mark.real_component
def test_table_of_a_killed_test_process_is_cleaned_up(nft):
    # A process that made a partition and was SIGKILLed leaves its table;
    # the next partition deletes it.
    code = (
        "import os, signal\n"
        "from kerasdist.testing import hosts\n"
        "cm = hosts.partition('127.0.0.9'); print(cm.__enter__(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        timeout=120,
    )
    orphan = child.stdout.strip()
    assert orphan.startswith("kdtest_") and orphan in _tables()
    with hosts_lib.partition("127.0.0.10"):
        assert orphan not in _tables()


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        start_new_session=True,
    )
    yield proc
    with contextlib.suppress(ProcessLookupError):
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_stall_stops_then_continues(sleeper):
    with hosts_lib.stall([sleeper.pid]):
        assert _state(sleeper.pid) == "T"
    assert _state(sleeper.pid) != "T"


def test_duty_cycle_alternates(sleeper):
    seen = set()
    with hosts_lib.stall([sleeper.pid], stopped_fraction=0.5, period=0.2):
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(_state(sleeper.pid) == "T")
            time.sleep(0.03)
    assert seen == {True, False}
    assert _state(sleeper.pid) != "T"


@pytest.mark.parametrize("kwargs, name", [
    ({"stopped_fraction": 0}, "stopped_fraction"),
    ({"stopped_fraction": 1.5}, "stopped_fraction"),
    ({"period": 0}, "period"),
])
def test_stall_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"argument `{name}`"):
        with hosts_lib.stall([], **kwargs):
            pass

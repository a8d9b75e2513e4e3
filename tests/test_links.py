"""kerasdist.testing.links: hosts in namespaces behind tbf-capped links."""

import json
import os
import subprocess
import sys

import pytest

from kerasdist.testing import links

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "link_worker.py")
PORT = 7100
# 40 Mbit/s is 5 MB/s: 10 MB take ~2 s, long against tbf's burst and TCP's
# start, short for the test.
RATE = "40mbit"
NBYTES = 10 * 2**20


@pytest.fixture
def root():
    reason = links.links_unavailable()
    if reason:
        pytest.skip(reason)


def _ours() -> list[str]:
    return [n for n in links._namespaces()  # noqa: SLF001
            if n.startswith(f"kdlink{os.getpid()}_")]


def _receive(sink_host, source_hosts) -> dict:
    """Bytes/s the sink receives while each source sends NBYTES."""
    sink = subprocess.Popen(
        sink_host.command([sys.executable, WORKER, "sink", str(PORT),
                           str(len(source_hosts))]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "READY", sink.stderr.read()
        sources = [
            subprocess.Popen(h.command([
                sys.executable, WORKER, "source", sink_host.address,
                str(PORT), str(NBYTES)]), stderr=subprocess.PIPE, text=True)
            for h in source_hosts
        ]
        for s in sources:
            _, err = s.communicate(timeout=120)
            assert s.returncode == 0, err
        out, err = sink.communicate(timeout=120)
        assert sink.returncode == 0, err
    finally:
        sink.kill()
        sink.wait()
    return json.loads(out.splitlines()[-1])


@pytest.mark.real_component
@pytest.mark.parametrize("senders", [1, 2])
def test_link_carries_its_cap(root, senders):
    # One sender: its link's upload cap. Two senders into one host: the
    # receiver's download cap (each sender alone could send at the cap).
    with links.slow_links(senders + 1, RATE) as hosts:
        got = _receive(hosts[0], hosts[1:])
    assert got["bytes"] >= senders * NBYTES
    rate = 8 * got["bytes"] / got["seconds"]
    cap = links.parse_rate(RATE)
    assert abs(rate / cap - 1) <= 0.2, (
        f"measured {rate / 1e6:.1f} Mbit/s through a {RATE} link")


@pytest.mark.real_component
def test_namespaces_are_removed_even_on_failure(root):
    with pytest.raises(RuntimeError, match="test body failed"):
        with links.slow_links(2, "1gbit") as hosts:
            assert sorted(_ours()) == sorted(
                [h.namespace for h in hosts] + [
                    hosts[0].namespace.rsplit("_", 1)[0] + "_hub"])
            raise RuntimeError("test body failed")
    assert _ours() == []


@pytest.mark.real_component
def test_namespaces_of_a_killed_process_are_cleaned_up(root):
    # A process killed inside its `with` block leaves its namespaces; the
    # next bed made (by anyone) deletes them.
    code = (
        "import os, signal\n"
        "from kerasdist.testing import links\n"
        "cm = links.slow_links(1)\n"
        "cm.__enter__()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    assert child.wait(timeout=120) == -9
    prefix = f"kdlink{child.pid}_"
    assert [n for n in links._namespaces()  # noqa: SLF001
            if n.startswith(prefix)]
    with links.slow_links(1):
        pass
    assert not [n for n in links._namespaces()  # noqa: SLF001
                if n.startswith(prefix)]


@pytest.mark.parametrize("rate", ["fast", "10 Mbit/s", 100, True, "1tbit"])
def test_bad_rate_is_refused(rate):
    with pytest.raises(ValueError, match=r"Received: rate="):
        links.parse_rate(rate)


def test_rates_in_tc_notation():
    assert links.parse_rate("1gbit") == 10**9
    assert links.parse_rate("2.5mbit") == 2_500_000
    assert links.parse_rate(64000) == 64000

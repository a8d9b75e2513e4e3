"""Slow links: emulated hosts in network namespaces, joined by capped veths.

`slow_links(n, rate="100mbit")` makes `n` emulated hosts, each a network
namespace of its own with one interface (`eth0`, an address in
10.213.0.0/24 that exists only inside that namespace), wired like machines
on one switch: every host's veth pair ends in a hub namespace (also made
here) on a bridge. A token-bucket filter (`tc qdisc ... tbf`) caps both
directions of every host's link, on the host's `eth0` (what it sends) and
on its port of the bridge (what it receives), so a host cannot send or
receive faster than `rate` whatever its peers do: a NIC of that speed.
`netem` (delay, loss) is not used: this kernel has no `sch_netem`.

Processes run on a host through `host.command([...])` (`ip netns exec`).
Nothing touches the machine's own network namespace: no address, route,
interface or rule is added there, so tests cannot reach or disturb
anything outside.

Clean-up invariant: every namespace this module makes is named
`kdlink<pid>_<bed>_<role>`, with the pid of the process that made it. When
the `with` block ends (also on an exception) the processes still inside the
bed's namespaces are killed by pid and the namespaces are deleted, which
destroys their interfaces, bridge and qdiscs; so are those of a bed still
open at interpreter exit, and those left by a process that was killed
(found by name, their pid no longer alive) the next time a bed is made.

Needs root and the `ip` and `tc` commands (Debian package iproute2);
`links_unavailable()` says why not, for a test to skip with (outside CI).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence

__all__ = [
    "LinkedHost",
    "links_unavailable",
    "parse_rate",
    "slow_links",
]

_PREFIX = "kdlink"
_NAME_RE = re.compile(rf"^({_PREFIX}(\d+)_\d+_\w+)\b")
_SUBNET = "10.213.0"
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_live: set[str] = set()
_lock = threading.Lock()
_counter = 0


@dataclasses.dataclass(frozen=True)
class LinkedHost:
    """One emulated host behind a capped link.

    Args:
        name: str. How logs and summaries name the host, e.g. `"host-0"`.
        namespace: str. Its network namespace.
        address: str. Its IPv4 address, reachable from the other hosts of
            the same bed only.
        rate_bps: int. Its link's cap in bits per second, each direction.

    Example:

    >>> h = LinkedHost("host-0", "kdlink1_0_h0", "10.213.0.1", 10**8)
    >>> h.command(["hostname"])[:4]
    ['ip', 'netns', 'exec', 'kdlink1_0_h0']
    """

    name: str
    namespace: str
    address: str
    rate_bps: int

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace (`ip netns exec`).

        Args:
            argv: the program and its arguments.

        Returns:
            list of str, for `subprocess.Popen`.

        Example:

        ```python
        subprocess.run(host.command(["ip", "addr"]), check=True)
        ```
        """
        return ["ip", "netns", "exec", self.namespace, *argv]


def parse_rate(rate: str | int) -> int:
    """A link rate in bits per second, from tc's notation or an int.

    Args:
        rate: str or int. E.g. `"100mbit"`, `"1gbit"`, `"500kbit"`, or
            bits per second.

    Returns:
        int, bits per second.

    Raises:
        ValueError: on anything else, or a rate below 8 kbit/s.

    Example:

    >>> parse_rate("100mbit")
    100000000
    """
    bps = None
    if isinstance(rate, int) and not isinstance(rate, bool):
        bps = rate
    elif isinstance(rate, str):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?bit)", rate.lower())
        if match:
            bps = int(float(match.group(1)) * _UNITS[match.group(2)])
    if bps is None or bps < 8000:
        raise ValueError(
            "Invalid value for argument `rate`. Received: "
            f"rate={rate!r}. Expected bits per second >= 8000, as an int "
            "or as tc writes it (e.g. '100mbit', '1gbit')."
        )
    return bps


def links_unavailable() -> str | None:
    """Why slow links cannot be made here, or None if they can.

    Returns:
        str or None. A reason naming what is missing (root, `ip`, `tc`).

    Example:

    >>> reason = links_unavailable()
    >>> reason is None or isinstance(reason, str)
    True
    """
    if os.geteuid() != 0:
        return "slow links need root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command is missing (Debian package iproute2)"
    return None


def _run(*argv: str) -> None:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` failed: {result.stderr.strip()}")


def _namespaces() -> list[str]:
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    return [m.group(1) for line in listing.splitlines()
            if (m := _NAME_RE.match(line.strip()))]


def _delete(namespace: str) -> None:
    """Kills what still runs in `namespace` (by pid), then deletes it."""
    pids = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True,
        timeout=60,
    ).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True,
                   timeout=60)
    with _lock:
        _live.discard(namespace)


def _delete_all_live() -> None:
    for namespace in sorted(_live):
        _delete(namespace)


def _delete_orphans() -> None:
    """Deletes namespaces made by processes that no longer exist."""
    for namespace in _namespaces():
        pid = int(_NAME_RE.match(namespace).group(2))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            _delete(namespace)


atexit.register(_delete_all_live)


def _tbf(namespace: str, device: str, bps: int) -> None:
    # The bucket holds at least a few full-size frames (and 1 ms of
    # traffic), or tbf drops what it should only delay.
    burst = max(bps // 8 // 1000, 16 * 1514)
    _run("tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf",
         "rate", f"{bps}bit", "burst", str(burst), "latency", "100ms")


def _add_namespace(name: str) -> None:
    with _lock:
        _live.add(name)
    _run("ip", "netns", "add", name)
    _run("ip", "-n", name, "link", "set", "lo", "up")


def _wire(hub: str, namespace: str, index: int, bps: int) -> None:
    port = f"port{index}"
    _run("ip", "link", "add", "eth0", "netns", namespace, "type", "veth",
         "peer", "name", port, "netns", hub)
    _run("ip", "-n", hub, "link", "set", port, "master", "br0")
    _run("ip", "-n", hub, "link", "set", port, "up")
    _run("ip", "-n", namespace, "addr", "add", f"{_SUBNET}.{index + 1}/24",
         "dev", "eth0")
    _run("ip", "-n", namespace, "link", "set", "eth0", "up")
    _tbf(namespace, "eth0", bps)
    _tbf(hub, port, bps)


@contextlib.contextmanager
def slow_links(n: int, rate: str | int = "100mbit") -> Iterator[
        list[LinkedHost]]:
    """`n` emulated hosts on one switch, each behind a link of `rate`.

    Args:
        n: int. How many hosts, 1 to 250.
        rate: str or int. Each host's link speed, both directions, e.g.
            `"100mbit"`, `"1gbit"` or bits per second. Defaults to
            `"100mbit"`.

    Yields:
        list of `LinkedHost`, `host-0` at 10.213.0.1, `host-1` at
        10.213.0.2, ...; all gone (processes killed, namespaces deleted)
        when the block ends.

    Raises:
        ValueError: on a bad `n` or `rate`.
        RuntimeError: if a namespace, link or qdisc cannot be made (after
            removing what was made).

    Example:

    ```python
    from kerasdist.testing import links

    with links.slow_links(4, "100mbit") as hosts:
        proc = subprocess.Popen(hosts[0].command(["python", "server.py"]))
    ```
    """
    from kerasdist._validate import check_int

    global _counter
    check_int("n", n)
    if n > 250:
        raise ValueError(
            f"Invalid value for argument `n`. Received: n={n}. Expected at "
            "most 250 hosts (one /24 subnet)."
        )
    bps = parse_rate(rate)
    _delete_orphans()
    with _lock:
        bed = f"{_PREFIX}{os.getpid()}_{_counter}"
        _counter += 1
    hub = f"{bed}_hub"
    made = [hub]
    try:
        _add_namespace(hub)
        _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", hub, "link", "set", "br0", "up")
        hosts = []
        for i in range(n):
            namespace = f"{bed}_h{i}"
            made.append(namespace)
            _add_namespace(namespace)
            _wire(hub, namespace, i, bps)
            hosts.append(LinkedHost(f"host-{i}", namespace,
                                    f"{_SUBNET}.{i + 1}", bps))
        yield hosts
    finally:
        for namespace in reversed(made):
            _delete(namespace)

"""Emulated hosts on one machine: loopback addresses, partitions, stalls.

A test bed for multi-host training without more machines. Each emulated
host is one loopback address (127.0.0.2, 127.0.0.3, ...: on Linux the whole
127.0.0.0/8 reaches `lo`, so a process can bind any of them with no set-up).
What a test can do to a host:

- **partition** it: `partition(host)` drops every packet to or from its
  address with an nftables table of its own, deleted when the `with` block
  ends, even on an exception (and at interpreter exit, and the next time a
  partition starts if the process that made it was killed);
- **stall** it: `stall(pgids, stopped_fraction, period)` sends SIGSTOP and
  SIGCONT to its process groups in a duty cycle, and SIGCONT when the block
  ends;
- **lose** it: SIGKILL its process groups (`kerasdist.testing` supervises
  them by process group; nothing here signals a process by name).

What a partition cuts: every packet addressed to the host, and every packet
sent from its address, so peers cannot reach it and connections peers opened
to it go silent both ways. A connection the host's own processes open
without binding a source address leaves from 127.0.0.1 (the kernel's
source for loopback routes) and is not cut; TensorFlow's collectives need
both directions of every ring link, so a cut host still stalls its group,
which is what the recovery tests need. For a cut that also covers such
connections, give the host a network namespace of its own.

Only addresses inside 127.0.0.0/8 are accepted: a test never sends traffic
off this machine. Partitions need root and Debian's `nftables` package;
`nftables_unavailable()` says why not, for a test to skip with (outside CI).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

from kerasdist.launch import supervisor

__all__ = [
    "EmulatedHost",
    "emulated_hosts",
    "nftables_unavailable",
    "partition",
    "stall",
]

_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_TABLE_PREFIX = "kdtest_"
_TABLE_RE = re.compile(rf"^table inet ({_TABLE_PREFIX}(\d+)_\d+)$")
_live_tables: set[str] = set()
_lock = threading.Lock()
_counter = 0


@dataclasses.dataclass(frozen=True)
class EmulatedHost:
    """One emulated host: a name and a loopback address of its own.

    Args:
        name: str. How logs and summaries name the host, e.g. `"host-1"`.
        address: str. An IPv4 address inside 127.0.0.0/8.

    Raises:
        ValueError: if `address` is not an IPv4 loopback address.

    Example:

    >>> EmulatedHost("host-1", "127.0.0.3").address
    '127.0.0.3'
    """

    name: str
    address: str

    def __post_init__(self):
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            ip = None
        if ip is None or ip not in _LOOPBACK:
            raise ValueError(
                "Invalid value for argument `address`. Received: "
                f"address={self.address!r}. Expected an IPv4 address in "
                "127.0.0.0/8 (emulated hosts stay on this machine)."
            )


def emulated_hosts(n: int, first: int = 2) -> list[EmulatedHost]:
    """`n` emulated hosts on consecutive loopback addresses.

    Args:
        n: int. How many hosts, at least 1.
        first: int. Last octet of the first address, so host `i` is
            `127.0.0.{first + i}`. Defaults to 2 (127.0.0.1 stays the
            launcher's).

    Returns:
        list of `EmulatedHost`, named `host-0`, `host-1`, ...

    Raises:
        ValueError: if `n` < 1 or the addresses would leave 127.0.0.0/24.

    Example:

    >>> [h.address for h in emulated_hosts(2)]
    ['127.0.0.2', '127.0.0.3']
    """
    from kerasdist._validate import check_int

    check_int("n", n)
    check_int("first", first)
    if first + n - 1 > 254:
        raise ValueError(
            f"Invalid value for argument `n`. Received: n={n} with "
            f"first={first}. Expected first + n - 1 <= 254."
        )
    return [
        EmulatedHost(f"host-{i}", f"127.0.0.{first + i}") for i in range(n)
    ]


def nftables_unavailable() -> str | None:
    """Why partitions cannot be made here, or None if they can.

    Returns:
        str or None. A reason naming what is missing (root, the `nft`
        command, or the kernel's nf_tables).

    Example:

    >>> reason = nftables_unavailable()
    >>> reason is None or isinstance(reason, str)
    True
    """
    if os.geteuid() != 0:
        return "partitions need root (nftables rules)"
    if shutil.which("nft") is None:
        return "the `nft` command is missing (Debian package nftables)"
    probe = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return f"`nft list tables` failed: {probe.stderr.strip()}"
    return None


def _nft(script: str) -> None:
    result = subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True,
        timeout=30,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"nft failed ({result.stderr.strip()}) on:\n{script}"
        )


def _delete_table(name: str) -> None:
    subprocess.run(
        ["nft", "delete", "table", "inet", name], capture_output=True,
        timeout=30,
    )
    with _lock:
        _live_tables.discard(name)


def _delete_all_live_tables() -> None:
    for name in list(_live_tables):
        _delete_table(name)


def _delete_orphaned_tables() -> None:
    """Deletes tables made by test processes that no longer exist."""
    listing = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=30
    ).stdout
    for line in listing.splitlines():
        match = _TABLE_RE.match(line.strip())
        if match is None:
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            _delete_table(match.group(1))


atexit.register(_delete_all_live_tables)


def _addresses(hosts: Iterable[EmulatedHost | str]) -> list[str]:
    addresses = []
    for host in hosts:
        if not isinstance(host, EmulatedHost):
            host = EmulatedHost(str(host), str(host))  # validates
        addresses.append(host.address)
    if not addresses:
        raise ValueError(
            "partition() needs at least one host or address to cut off."
        )
    return addresses


@contextlib.contextmanager
def partition(*hosts: EmulatedHost | str) -> Iterator[str]:
    """Cuts the given hosts off the network while the block runs.

    Every packet to or from each host's address is dropped (both the
    `output` and the `input` hooks), so connections to it time out as if
    its cable were pulled, while its processes keep running. The rules live
    in an nftables table of their own (`inet kdtest_<pid>_<n>`), deleted
    when the block ends, even on an exception.

    Args:
        *hosts: `EmulatedHost` or loopback address strings.

    Yields:
        str. The nftables table's name (for logs).

    Raises:
        ValueError: if an address is not in 127.0.0.0/8.
        RuntimeError: if nft refuses the rules.

    Example:

    ```python
    with partition(hosts[2]):
        ...  # host 2 is unreachable here
    ```
    """
    global _counter
    addresses = _addresses(hosts)
    _delete_orphaned_tables()
    with _lock:
        _counter += 1
        name = f"{_TABLE_PREFIX}{os.getpid()}_{_counter}"
        _live_tables.add(name)
    rules = "".join(
        f"    ip daddr {a} drop\n    ip saddr {a} drop\n" for a in addresses
    )
    script = (
        f"table inet {name} {{\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f"{rules}"
        "  }\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"{rules}"
        "  }\n"
        "}\n"
    )
    try:
        _nft(script)
        yield name
    finally:
        _delete_table(name)


@contextlib.contextmanager
def stall(
    pgids: Sequence[int],
    stopped_fraction: float = 1.0,
    period: float = 1.0,
) -> Iterator[None]:
    """Stops the given process groups, fully or in a duty cycle.

    With `stopped_fraction=1.0` the groups get SIGSTOP once and stay stopped
    for the whole block (a hung host); below 1.0 a thread alternates SIGSTOP
    for `stopped_fraction * period` seconds and SIGCONT for the rest (a slow
    host). SIGCONT is always sent when the block ends. A full stall returns
    once every process of the groups is stopped, and leaving the block
    returns once they run again (each wait bounded by 5 seconds), so a
    check right after sees the new state.

    Args:
        pgids: sequence of int. Process-group ids (as `kerasdist.testing`
            starts each worker in a session of its own).
        stopped_fraction: float in (0, 1]. Defaults to 1.0.
        period: float. Seconds per stop/continue cycle. Defaults to 1.0.

    Raises:
        ValueError: if `stopped_fraction` is outside (0, 1] or `period` <= 0.

    Example:

    ```python
    with stall([worker.pgid], stopped_fraction=0.5, period=0.4):
        time.sleep(5)  # the worker runs at about half speed
    ```
    """
    if not 0 < stopped_fraction <= 1:
        raise ValueError(
            "Invalid value for argument `stopped_fraction`. Received: "
            f"stopped_fraction={stopped_fraction!r}. Expected a number in "
            "(0, 1]."
        )
    if not period > 0:
        raise ValueError(
            "Invalid value for argument `period`. Received: "
            f"period={period!r}. Expected a positive number of seconds."
        )
    pgids = list(pgids)

    def send(sig: int) -> None:
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)

    def settle(stopped: bool) -> None:
        # kill() returns before the kernel has stopped (or woken) the
        # target, so /proc may still say "R" for a moment: wait, bounded,
        # until every process of the groups shows the new state.
        deadline = time.monotonic() + _SETTLE_SECONDS
        while time.monotonic() < deadline:
            states = _group_states(pgids)
            if all((s in supervisor.STOPPED_STATES) == stopped
                   for s in states):
                return
            time.sleep(0.005)

    done = threading.Event()
    cycler = None
    if stopped_fraction >= 1:
        send(signal.SIGSTOP)
        settle(stopped=True)
    else:

        def cycle():
            while not done.is_set():
                send(signal.SIGSTOP)
                if done.wait(stopped_fraction * period):
                    break
                send(signal.SIGCONT)
                done.wait((1 - stopped_fraction) * period)

        cycler = threading.Thread(target=cycle, daemon=True)
        cycler.start()
    try:
        yield
    finally:
        done.set()
        if cycler is not None:
            cycler.join()
        send(signal.SIGCONT)
        settle(stopped=False)


_SETTLE_SECONDS = 5.0


def _group_states(pgids: Sequence[int]) -> list[str]:
    """The /proc state letters of every live process in the given groups."""
    wanted = set(pgids)
    # A zombie (Z, X) cannot be stopped or continued: not counted.
    return [p.state for p in supervisor.processes()
            if p.pgid in wanted and p.state not in ("Z", "X")]

"""Hosts of a multi-host worker group, and how workers are started on them.

`kerasdist-run --hosts 10.0.0.2:2,10.0.0.3:2 ...` (or `--hostfile F`)
spreads the workers over machines: each entry is an address and how many
workers (slots) it runs. Starting a process on a host is one small piece,
a `Starter`:

- `LocalStarter`: the host is an address of this machine (a loopback
  address such as 127.0.0.3 on a test bed, or one of its own interfaces);
  workers are local processes whose `TF_CONFIG` names that address.
- `SshStarter` (`kerasdist.launch.ssh`): any other machine, over ssh, as
  horovodrun and the DeepSpeed launcher do.

A starter also tells whether a host can take workers right now
(`reachable`): the launcher asks before each attempt, and an elastic run
(`--min_workers`) goes on without a host that stays unreachable.

Hostfile format (OpenMPI/DeepSpeed style), one host per line, `#` starts a
comment:

```text
10.0.0.2 slots=2
10.0.0.3:2
10.0.0.4          # slots default to --num_workers
```
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from kerasdist.launch import supervisor

__all__ = [
    "Host",
    "LocalStarter",
    "Starter",
    "is_local_address",
    "parse_hosts",
    "read_hostfile",
]

# A DNS name (RFC 1123 labels) or an IPv4 address; IPv6 in brackets.
_NAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


@dataclasses.dataclass(frozen=True)
class Host:
    """One machine of the group: an address and its worker slots.

    Args:
        address: str. IP address or DNS name the workers' `TF_CONFIG` uses.
        slots: int. Workers to run there (at most; fewer never happens:
            a host runs all its slots or none).

    Example:

    >>> Host("127.0.0.3", 2).slots
    2
    """

    address: str
    slots: int

    def __str__(self) -> str:
        return self.address


def _bad_entry(entry: str, where: str, why: str) -> ValueError:
    return ValueError(
        f"Invalid host {entry!r} in {where}: {why}. Expected ADDRESS or "
        "ADDRESS:SLOTS, e.g. 10.0.0.2:2 (on a hostfile line also "
        "'10.0.0.2 slots=2')."
    )


def _parse_entry(entry: str, where: str, default_slots: int) -> Host:
    text = entry.strip()
    address, slots = text, default_slots
    match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\S+)", text)
    if match:
        address, count = match.groups()
    elif text.count(":") == 1:
        address, count = text.split(":")
    else:
        count = None
    if count is not None:
        if not count.isdigit() or int(count) < 1:
            raise _bad_entry(entry, where, f"slots {count!r} is not a "
                             "positive integer")
        slots = int(count)
    address = address.strip()
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        ip = None
    if ip is None and (not _NAME_RE.match(address) or address.replace(
        ".", ""
    ).isdigit()):
        raise _bad_entry(entry, where, f"{address!r} is neither an IP "
                         "address nor a host name")
    return Host(str(ip) if ip is not None else address.lower(), slots)


def _check_unique(hosts: list[Host], where: str) -> list[Host]:
    seen: dict[str, int] = {}
    for i, h in enumerate(hosts):
        if h.address in seen:
            raise ValueError(
                f"Host {h.address!r} appears twice in {where} (entries "
                f"{seen[h.address] + 1} and {i + 1}). List each host once "
                f"and give its worker count as {h.address}:SLOTS."
            )
        seen[h.address] = i
    if not hosts:
        raise ValueError(
            f"No hosts in {where}. Expected at least one ADDRESS[:SLOTS]."
        )
    return hosts


def parse_hosts(text: str | Sequence[str], default_slots: int = 1
                ) -> list[Host]:
    """Parses `--hosts`: `"ADDR[:SLOTS],ADDR[:SLOTS],..."` or a list.

    Args:
        text: str or list of str. The host entries.
        default_slots: int. Slots of an entry without `:SLOTS`.

    Returns:
        list of `Host`, in the given order (worker 0, the chief, runs on
        the first host that is up).

    Raises:
        ValueError: naming an unparsable entry or a duplicate host.

    Example:

    >>> parse_hosts("127.0.0.2:2,127.0.0.3")
    [Host(address='127.0.0.2', slots=2), Host(address='127.0.0.3', slots=1)]
    """
    entries = text.split(",") if isinstance(text, str) else list(text)
    where = f"hosts={text!r}"
    for e in entries:
        if not isinstance(e, str) or not e.strip():
            raise _bad_entry(str(e), where, "empty entry")
    return _check_unique(
        [_parse_entry(e, where, default_slots) for e in entries], where
    )


def read_hostfile(path: str, default_slots: int = 1) -> list[Host]:
    """Reads a hostfile (see the module docstring for the format).

    Args:
        path: str. The file.
        default_slots: int. Slots of a line without them.

    Returns:
        list of `Host`, in file order.

    Raises:
        ValueError: if the file cannot be read, or naming the line that
            cannot be parsed or repeats a host.

    Example:

    ```python
    hosts = read_hostfile("/etc/kerasdist/hosts")
    ```
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(
            f"Invalid value for argument `hostfile`. Received: "
            f"hostfile={path!r}, which cannot be read ({e.strerror or e}). "
            "Expected a readable file with one host per line."
        ) from None
    hosts = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            hosts.append(_parse_entry(
                entry, f"hostfile {path!r} line {number}", default_slots
            ))
    return _check_unique(hosts, f"hostfile {path!r}")


def is_local_address(address: str) -> bool:
    """True when `address` belongs to this machine (it can be bound here).

    Every 127.0.0.0/8 address is local on Linux (the whole range reaches
    `lo`), so emulated hosts are local.

    Example:

    >>> is_local_address("127.0.0.5")
    True
    """
    try:
        infos = socket.getaddrinfo(address, None, socket.AF_INET,
                                   socket.SOCK_STREAM)
    except OSError:
        return False
    for *_, sockaddr in infos:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
        finally:
            s.close()
    return False


class Starter:
    """How the launcher starts worker processes on a host.

    Subclasses implement `reachable` and `start`, and override
    `pick_ports` and `failure_reason` when their hosts are other machines.
    The launcher calls `reachable` for every host before each attempt (and
    for missing hosts while an elastic run is smaller than it may be),
    `pick_ports` once per attempt, then `start` once per worker, and
    `failure_reason` for a worker that ended the attempt.

    Example:

    ```python
    class MyStarter(Starter):
        name = "mine"

        def reachable(self, host, timeout):
            return None  # Always up.

        def start(self, host, command, env, **process):
            return supervisor.Process(command, env={**os.environ, **env},
                                      **process)
    ```
    """

    name = "starter"
    # Seconds a host has to answer `reachable` when the launcher asks.
    probe_timeout = 3.0

    def reachable(self, host: Host, timeout: float) -> str | None:
        """None when workers can be started on `host`, else why not.

        Args:
            host: `Host`.
            timeout: float. Seconds to wait for an answer.

        Returns:
            None, or a reason in words, e.g. `"no answer within 2s"`.
        """
        raise NotImplementedError

    def start(self, host: Host, command: Sequence[str],
              env: Mapping[str, str], **process: Any) -> supervisor.Process:
        """Starts one worker on `host`.

        Args:
            host: `Host`.
            command: list of str. The worker command.
            env: mapping. The variables the launcher sets for this worker
                (TF_CONFIG, KERASDIST_*, `--env`); the starter adds them to
                the host's own environment.
            **process: passed to `supervisor.Process` (`log_path`,
                `log_header`, `sink`, `prefix`).

        Returns:
            a `supervisor.Process` (or subclass) whose process group the
            launcher signals and reaps; its exit status is the worker's.

        Raises:
            OSError: if the command cannot be started.
        """
        raise NotImplementedError

    def pick_ports(self, hosts: Sequence[Host]) -> list[int]:
        """One free TCP port per slot of `hosts`, in order, all distinct.

        For the workers' `TF_CONFIG` addresses. This default picks them on
        this machine, free on every local address (TensorFlow listens on
        all of them); a starter for other machines picks them there.

        Args:
            hosts: list of `Host` started by this starter.

        Returns:
            list of int, `sum(h.slots for h in hosts)` long.

        Raises:
            OSError: naming the host when its ports cannot be picked.
        """
        from kerasdist import cluster

        return cluster.free_ports(sum(h.slots for h in hosts), host="")

    def failure_reason(self, process: supervisor.Process) -> str | None:
        """Why the way of starting `process` (not the worker) failed.

        Args:
            process: a process this starter started, after it exited.

        Returns:
            None when its exit status is the worker's own, else a sentence
            (e.g. ssh's connection was lost).
        """
        del process
        return None


class LocalStarter(Starter):
    """Workers of a host that is this machine (e.g. 127.0.0.3 on a test bed).

    `reachable` checks that the host's address answers: it listens on the
    address and connects to itself, bound to it, so traffic to or from the
    address must pass (an nftables rule that cuts the host off, as
    `kerasdist.testing.partition` adds, makes it unreachable, like a
    powered-off machine).

    Example:

    >>> LocalStarter().reachable(Host("127.0.0.1", 1), timeout=2.0) is None
    True
    """

    name = "local"
    # An address of this machine answers in microseconds, or never (its
    # traffic is dropped): no need to wait long.
    probe_timeout = 1.0

    def reachable(self, host: Host, timeout: float) -> str | None:
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            return f"no socket ({e.strerror or e})"
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            try:
                listener.bind((host.address, 0))
            except OSError as e:
                return (
                    f"{host.address} is not an address of this machine "
                    f"({e.strerror or e}); start workers there with "
                    "starter='ssh'"
                )
            listener.listen(1)
            client.settimeout(timeout)
            client.bind((host.address, 0))
            try:
                client.connect(listener.getsockname())
            except OSError as e:
                return (
                    f"no answer within {timeout:g}s" if isinstance(
                        e, socket.timeout
                    ) else f"connection failed ({e.strerror or e})"
                )
            return None
        finally:
            client.close()
            listener.close()

    def start(self, host: Host, command: Sequence[str],
              env: Mapping[str, str], **process: Any) -> supervisor.Process:
        del host
        return supervisor.Process(
            command, env={**os.environ, **env}, **process
        )

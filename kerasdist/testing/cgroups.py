"""Resource limits for test processes: cgroup v1 memory and cpu controllers.

A test bed emulates a smaller machine, or a slower one, for one worker:
`cgroup(memory_bytes=..., cpu_fraction=...)` makes a control group with a
hard memory limit (`memory.limit_in_bytes`: the kernel kills a process of
the group that goes past it, as an out-of-memory machine would) and/or a
CPU quota (`cpu.cfs_quota_us` of `cpu.cfs_period_us`: `cpu_fraction=0.5`
is a core at half speed). The quota is granted per period (the kernel's
default: 100 ms): a group that used it waits for the next period, so a
small quota runs in bursts with stalls of up to a period between them.
That is fine for throughput, but a collective that needs the process
several times waits up to a period each time, where a slower processor
would only take longer per step: `cpu_period_us=10_000` (10 ms) makes
the pace finer-grained. Processes join it from their first instruction
through `group.wrap(argv)` (a shell prefix that writes its own pid to the
group, then `exec`s the command, so everything it starts is inside too),
or later through `group.add(pid)` (only what they allocate from then on
is charged on kernels that no longer move charges: prefer `wrap`).

Afterwards `group.peak_memory_bytes()` is the group's high-water mark and
`group.oom_kills()` how many processes the limit killed, which is how a
test tells "killed past its memory limit" from any other SIGKILL.

Clean-up invariant: every group this module makes is named
`kdcg<pid>_<n>` after the process that made it. When the `with` block ends
(also on an exception) the processes still in the group are killed by pid
and the group is removed; so are those of a group still open at
interpreter exit, and those left by a process that was killed (found by
name, their maker's pid no longer alive) the next time a group is made.

Needs root and the cgroup v1 hierarchies mounted at /sys/fs/cgroup/memory
and /sys/fs/cgroup/cpu; `cgroups_unavailable()` says why not, for a test
to skip with (outside CI).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Iterator, Sequence

__all__ = [
    "Cgroup",
    "cgroup",
    "cgroups_unavailable",
]

ROOT = "/sys/fs/cgroup"
_PREFIX = "kdcg"
_NAME_RE = re.compile(rf"^{_PREFIX}(\d+)_\d+$")
_live: set[str] = set()
_lock = threading.Lock()
_counter = 0


class Cgroup:
    """One control group in the memory and/or cpu hierarchy.

    Args:
        name: str. Its directory name in each hierarchy it uses.
        controllers: Sequence[str]. `"memory"`, `"cpu"` or both.

    Example:

    >>> g = Cgroup("kdcg1_0", ["memory"])
    >>> g.wrap(["python", "-c", "pass"])[:2]
    ['sh', '-c']
    """

    def __init__(self, name: str, controllers: Sequence[str]):
        self.name = name
        self.controllers = tuple(controllers)

    def path(self, controller: str, file: str = "") -> str:
        """The group's directory (or one of its files) in `controller`."""
        return os.path.join(ROOT, controller, self.name, file)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed so the process joins this group before it runs.

        Args:
            argv: Sequence[str]. The command.

        Returns:
            A command that writes its own pid to the group's `cgroup.procs`
            in every controller, then `exec`s `argv` (same pid).
        """
        joins = " && ".join(
            f"echo $$ > {shlex.quote(self.path(c, 'cgroup.procs'))}"
            for c in self.controllers
        )
        return ["sh", "-c", f'{joins} && exec "$@"', "sh", *argv]

    def add(self, pid: int) -> None:
        """Moves the running process `pid` (not its threads' peers) in."""
        for c in self.controllers:
            _write(self.path(c, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        """The processes in the group now (any controller it uses)."""
        found: set[int] = set()
        for c in self.controllers:
            with contextlib.suppress(FileNotFoundError):
                with open(self.path(c, "cgroup.procs")) as f:
                    found.update(int(x) for x in f.read().split())
        return sorted(found)

    def peak_memory_bytes(self) -> int:
        """The group's memory high-water mark (`memory.max_usage_in_bytes`)."""
        return int(_read(self.path("memory", "memory.max_usage_in_bytes")))

    def oom_kills(self) -> int:
        """How many processes the memory limit killed (0 if none)."""
        text = _read(self.path("memory", "memory.oom_control"))
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        # Kernels before 4.13 have no counter; a hit limit is the best sign.
        return int(_read(self.path("memory", "memory.failcnt")) != "0")


def cgroups_unavailable(controllers: Sequence[str] = ("memory", "cpu")
                        ) -> str | None:
    """Why cgroups cannot be made here, or None if they can.

    Args:
        controllers: Sequence[str]. The hierarchies a test needs.

    Returns:
        A reason for a test to skip with, or None.
    """
    if os.geteuid() != 0:
        return "cgroups need root"
    for c in controllers:
        if not os.path.isfile(os.path.join(ROOT, c, "cgroup.procs")):
            return (f"no cgroup v1 {c!r} hierarchy at "
                    f"{os.path.join(ROOT, c)}")
    return None


@contextlib.contextmanager
def cgroup(memory_bytes: int | None = None,
           cpu_fraction: float | None = None,
           cpu_period_us: int | None = None) -> Iterator[Cgroup]:
    """A control group with a memory limit and/or a CPU quota.

    Args:
        memory_bytes: int | None. Hard limit on the group's memory (RAM and
            page cache); a process past it is killed by the kernel.
        cpu_fraction: float | None. CPU time per wall second, in cores
            (0.5: half of one core; 2.0: two cores).
        cpu_period_us: int | None. The period the quota is granted in,
            in microseconds (1,000 to 1,000,000; None: the kernel's, 100
            ms). Shorter periods pace more evenly; the quota, period ×
            fraction, must be at least 1,000 µs.

    Yields:
        The `Cgroup`. On exit, its remaining processes are killed by pid
        and it is removed.

    Raises:
        ValueError: no limit given, a limit that is not positive, or a
            period out of range or too short for the fraction.
        RuntimeError: cgroups are unavailable here (with the reason).

    Example:

    >>> with cgroup(memory_bytes=2 << 30) as g:
    ...     subprocess.run(g.wrap(["python", "train.py"]))
    ...     print(g.peak_memory_bytes(), g.oom_kills())
    """
    controllers = _controllers(memory_bytes, cpu_fraction)
    _check_period(cpu_fraction, cpu_period_us)
    why = cgroups_unavailable(controllers)
    if why:
        raise RuntimeError(f"Cannot make a cgroup: {why}.")
    _remove_stale()
    global _counter
    with _lock:
        name = f"{_PREFIX}{os.getpid()}_{_counter}"
        _counter += 1
        _live.add(name)
    group = Cgroup(name, controllers)
    try:
        for c in controllers:
            os.mkdir(group.path(c))
        if memory_bytes is not None:
            # Kernels since 6.8 refuse this (deprecated with cgroup v1):
            # there, `add()` charges only what the process allocates after.
            with contextlib.suppress(OSError):
                _write(group.path("memory",
                                  "memory.move_charge_at_immigrate"), "3")
            _write(group.path("memory", "memory.limit_in_bytes"),
                   str(int(memory_bytes)))
        if cpu_fraction is not None:
            if cpu_period_us is not None:
                _write(group.path("cpu", "cpu.cfs_period_us"),
                       str(int(cpu_period_us)))
            period = int(_read(group.path("cpu", "cpu.cfs_period_us")))
            _write(group.path("cpu", "cpu.cfs_quota_us"),
                   str(max(_MIN_QUOTA_US, round(period * cpu_fraction))))
        yield group
    finally:
        _remove(name, controllers)
        with _lock:
            _live.discard(name)


# The kernel refuses a cpu.cfs_quota_us below 1 ms, and a period outside
# 1 ms .. 1 s.
_MIN_QUOTA_US, _PERIOD_RANGE_US = 1000, (1000, 1_000_000)


def _check_period(cpu_fraction, cpu_period_us) -> None:
    if cpu_period_us is None:
        return
    low, high = _PERIOD_RANGE_US
    if (isinstance(cpu_period_us, bool) or not isinstance(cpu_period_us, int)
            or not low <= cpu_period_us <= high):
        raise ValueError(
            f"Received: cpu_period_us={cpu_period_us!r}. Expected an int "
            f"from {low} to {high} (microseconds), or None for the "
            "kernel's period.")
    if cpu_fraction is None:
        raise ValueError(
            f"Received: cpu_period_us={cpu_period_us!r} without "
            "cpu_fraction. The period only paces a CPU quota: give "
            "cpu_fraction too.")
    if cpu_period_us * cpu_fraction < _MIN_QUOTA_US:
        raise ValueError(
            f"Received: cpu_fraction={cpu_fraction!r} with "
            f"cpu_period_us={cpu_period_us}: the quota would be "
            f"{cpu_period_us * cpu_fraction:g} µs, below the kernel's "
            f"{_MIN_QUOTA_US} µs. Use cpu_period_us >= "
            f"{-(-_MIN_QUOTA_US // cpu_fraction):.0f}.")


def _controllers(memory_bytes, cpu_fraction) -> tuple[str, ...]:
    for label, value in (("memory_bytes", memory_bytes),
                         ("cpu_fraction", cpu_fraction)):
        if value is not None and (isinstance(value, bool) or value <= 0):
            raise ValueError(
                f"Received: {label}={value!r}. Expected a positive number "
                "(or None for no limit).")
    controllers = tuple(c for c, v in (("memory", memory_bytes),
                                       ("cpu", cpu_fraction)) if v is not None)
    if not controllers:
        raise ValueError(
            "Received: memory_bytes=None, cpu_fraction=None. Expected at "
            "least one limit.")
    return controllers


def _remove(name: str, controllers: Sequence[str],
            timeout: float = 10.0) -> None:
    """Kills the group's processes by pid, then removes it everywhere."""
    group = Cgroup(name, controllers)
    deadline = time.monotonic() + timeout
    while True:
        pids = group.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        removed = True
        for c in controllers:
            try:
                os.rmdir(group.path(c))
            except FileNotFoundError:
                pass
            except OSError:  # busy: a process has not left yet
                removed = False
        if removed:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"cgroup {name} still has processes {group.pids()} after "
                f"{timeout:.0f}s of SIGKILL; remove it with "
                f"rmdir {ROOT}/*/{name} once they are gone.")
        time.sleep(0.05)


def _remove_stale() -> None:
    """Removes groups left by a process of this module that was killed."""
    for c in ("memory", "cpu"):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(os.path.join(ROOT, c)):
                m = _NAME_RE.match(entry)
                if m and not _alive(int(m.group(1))):
                    _remove(entry, (c,))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@atexit.register
def _remove_live() -> None:
    for name in list(_live):
        with contextlib.suppress(OSError, RuntimeError):
            _remove(name, ("memory", "cpu"))

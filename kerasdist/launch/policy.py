"""The launcher's decisions, as pure functions of what happened.

The agent's loop asks two questions and applies the answer (as Ray Train
v2's controller asks its failure and scaling policies):

- `after_attempt`: an attempt ended (success, a failure, hosts that came
  back, or the launcher was interrupted): finish, restart, grow, stop or
  give up? Two budgets are spent as torch's elastic agent does: a
  preemption (exit 75, state saved) does not count toward
  `--max_restarts`; a permanent error (exit 78) is never retried.
- `placement`: which hosts the next group runs on, given which are
  unreachable and whether `--host_wait` is over: all of them (`Start`),
  the ones left (`Resize`, elastic only, at least `--min_workers`),
  `Wait`, or `GiveUp`.

Every decision is a frozen dataclass: easy to log, to test and to show.
Nothing here starts a process, reads a clock or sleeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from kerasdist.launch import hosts as hostlib
from kerasdist.launch.results import Failure, WorkerState, exit_status

__all__ = [
    "Budget",
    "Finish",
    "GiveUp",
    "Grow",
    "HostsBack",
    "Interrupted",
    "Resize",
    "Restart",
    "Start",
    "Stop",
    "Succeeded",
    "Wait",
    "after_attempt",
    "blame",
    "failing_at_start",
    "group_sizes",
    "may_grow",
    "placement",
]

RESTART = "restart"
PREEMPTION = "preemption"
# The exit status when a grow finds too few hosts (no worker failed).
NO_HOSTS_EXIT_CODE = 1
# Attempts in a row whose workers on one host hung or died at start-up
# before an elastic run goes on without that host.
START_FAILURES = 2


# -- what happened ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Succeeded:
    """Every worker of the attempt exited with status 0."""


@dataclasses.dataclass(frozen=True)
class HostsBack:
    """Missing hosts answered twice in a row (elastic): grow."""

    hosts: tuple[hostlib.Host, ...]


@dataclasses.dataclass(frozen=True)
class Interrupted:
    """The launcher got SIGINT or SIGTERM."""

    signum: int


Outcome = Succeeded | Failure | HostsBack | Interrupted


# -- decisions -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Finish:
    """The run succeeded: exit 0."""


@dataclasses.dataclass(frozen=True)
class Stop:
    """The launcher was interrupted: start nothing more, exit 128 + signal."""

    signum: int

    @property
    def returncode(self) -> int:
        return 128 + self.signum


@dataclasses.dataclass(frozen=True)
class GiveUp:
    """End the run with `returncode`; `reason` says why, in words."""

    reason: str
    returncode: int


@dataclasses.dataclass(frozen=True)
class Restart:
    """Restart the group after `failure`, spending budget `kind`."""

    failure: Failure
    kind: str
    used: int
    limit: int


@dataclasses.dataclass(frozen=True)
class Grow:
    """Stop the group and start it again with the `hosts` back."""

    hosts: tuple[hostlib.Host, ...]


@dataclasses.dataclass(frozen=True)
class Start:
    """Start the next group on every host."""

    hosts: tuple[hostlib.Host, ...]


@dataclasses.dataclass(frozen=True)
class Resize:
    """Start the next group on `hosts`, without the `lost` ones."""

    hosts: tuple[hostlib.Host, ...]
    lost: tuple[hostlib.Host, ...]
    min_workers: int

    @property
    def size(self) -> int:
        return sum(h.slots for h in self.hosts)


@dataclasses.dataclass(frozen=True)
class Wait:
    """Some hosts do not answer and `host_wait` is not over: probe again."""

    down: tuple[hostlib.Host, ...]


Decision = Finish | Stop | GiveUp | Restart | Grow | Start | Resize | Wait


@dataclasses.dataclass(frozen=True)
class Budget:
    """Restarts allowed and spent, per kind (`"restart"`, `"preemption"`).

    Example:

    >>> Budget(max_restarts=1, max_preemptions=0).spend("restart").left(
    ...     "restart")
    0
    """

    max_restarts: int
    max_preemptions: int
    restarts: int = 0
    preemptions: int = 0

    def limit(self, kind: str) -> int:
        return self.max_restarts if kind == RESTART else self.max_preemptions

    def used(self, kind: str) -> int:
        return self.restarts if kind == RESTART else self.preemptions

    def left(self, kind: str) -> int:
        return self.limit(kind) - self.used(kind)

    def spend(self, kind: str) -> Budget:
        field = "restarts" if kind == RESTART else "preemptions"
        return dataclasses.replace(self, **{field: self.used(kind) + 1})


def after_attempt(outcome: Outcome, budget: Budget
                  ) -> tuple[Decision, Budget]:
    """What to do when an attempt ended, and the budget after it.

    Args:
        outcome: `Succeeded`, `Failure`, `HostsBack` or `Interrupted`.
        budget: `Budget` before this decision.

    Returns:
        (decision, budget): `Finish`, `Stop`, `Grow`, `Restart` or `GiveUp`.
    """
    if isinstance(outcome, Interrupted):
        return Stop(outcome.signum), budget
    if isinstance(outcome, Succeeded):
        return Finish(), budget
    if isinstance(outcome, HostsBack):
        return Grow(outcome.hosts), budget
    failure = outcome
    if failure.state == WorkerState.PERMANENT:
        return GiveUp(
            f"{failure.describe()}; not retried (a restart cannot fix it)",
            exit_status(failure),
        ), budget
    kind = PREEMPTION if failure.state == WorkerState.PREEMPTED else RESTART
    if budget.left(kind) <= 0:
        return GiveUp(
            f"{failure.describe()}; no {kind}s left "
            f"({budget.limit(kind)} allowed); giving up",
            exit_status(failure),
        ), budget
    budget = budget.spend(kind)
    return Restart(failure, kind, budget.used(kind), budget.limit(kind)), (
        budget
    )


def placement(hosts: Sequence[hostlib.Host],
              down: Mapping[hostlib.Host, str], *, min_workers: int,
              elastic: bool, waited: float | None, host_wait: float,
              failure: Failure | None = None) -> Decision:
    """Which hosts the next group runs on.

    Args:
        hosts: list of `Host`. Every host of the run, in order.
        down: {host: reason}. The hosts that do not answer now.
        min_workers: int. Fewest workers the group may have.
        elastic: bool. Whether the group may have fewer than all.
        waited: float or None. Seconds since the failure; None: the wait
            is over (e.g. at start).
        host_wait: float. Seconds to wait for unreachable hosts.
        failure: `Failure` or None. What ended the last attempt; its exit
            status is the run's if too few hosts are left.

    Returns:
        `Start`, `Resize`, `Wait` or `GiveUp`.
    """
    if not down:
        return Start(tuple(hosts))
    if waited is not None and waited < host_wait:
        return Wait(tuple(down))
    up = tuple(h for h in hosts if h not in down)
    slots = sum(h.slots for h in up)
    if up and slots >= min_workers:
        return Resize(up, tuple(down), min_workers)
    gone = ", ".join(str(h) for h in down)
    return GiveUp(
        f"{gone} still unreachable after {host_wait:g}s; the hosts left "
        f"have {slots} worker slot(s), fewer than the {min_workers} needed"
        + ("" if elastic else
           " (not elastic: pass --min_workers to go on with fewer)")
        + "; giving up",
        exit_status(failure) if failure is not None else NO_HOSTS_EXIT_CODE,
    )


def group_sizes(slots: Sequence[int], min_workers: int) -> list[int]:
    """The group sizes an elastic run can have: a group runs all the slots
    of the hosts it has, so its size is a sum of some hosts' slots.

    Args:
        slots: list of int. Every host's slots.
        min_workers: int. Fewest workers a group may have.

    Returns:
        list of int. The sizes from `min_workers` to `sum(slots)` that some
        set of hosts adds up to, in increasing order.

    Example:

    >>> group_sizes([2] * 8, 14)
    [14, 16]
    >>> group_sizes([4, 2, 1], 3)
    [3, 4, 5, 6, 7]
    """
    sums = {0}
    for n in slots:
        sums |= {s + n for s in sums}
    return sorted(s for s in sums if s >= max(min_workers, 1))


def may_grow(missing: Sequence[hostlib.Host], finished: bool) -> bool:
    """Whether an elastic group should look for its missing hosts.

    Args:
        missing: list of `Host`. Hosts of the run not in this group.
        finished: bool. A worker finished training (or exited 0): the
            group is finishing, and a resize would cut it short.

    Returns:
        bool.
    """
    return bool(missing) and not finished


def failing_at_start(failures: Sequence[Failure], hosts: Sequence[
        hostlib.Host], *, min_workers: int,
        in_a_row: int = START_FAILURES) -> hostlib.Host | None:
    """A host to exclude: its workers hung or died at start-up in the last
    `in_a_row` attempts in a row, and the others hold `min_workers`.

    A host that answers probes but whose workers never get going (stopped,
    a broken disk, a missing library) is treated like a lost host by an
    elastic run, instead of spending every restart on it.

    Args:
        failures: list of `Failure`, in order.
        hosts: list of `Host`. The hosts the run may still use.
        min_workers: int. Fewest workers the group may have.
        in_a_row: int. Consecutive attempts needed. Defaults to 2.

    Returns:
        The `Host` to exclude, or None.
    """
    last = list(failures[-in_a_row:])
    if len(last) < in_a_row or not last[-1].host:
        return None
    for before, after in zip(last, last[1:], strict=False):
        if after.attempt != before.attempt + 1:
            return None
    if any(not f.at_start or f.host != last[-1].host
           or f.state not in (WorkerState.FAILED, WorkerState.HUNG)
           for f in last):
        return None
    host = next((h for h in hosts if h.address == last[-1].host), None)
    if host is None:
        return None
    if sum(h.slots for h in hosts if h != host) < min_workers:
        return None
    return host


def blame(failure: Failure, hosts_of: Mapping[int, str | None],
          down: Mapping[hostlib.Host, str]) -> Failure:
    """The hang's culprit, knowing which hosts do not answer.

    When every worker is blocked in a collective with a cut-off host, the
    silent-longest worker can be any of them. A worker on a host that does
    not answer is the cause: blame it, not a bystander.

    Args:
        failure: `Failure` that ended the attempt.
        hosts_of: {worker index: host address}, of this attempt.
        down: {host: reason}. Hosts that did not answer the probe started
            at the failure.

    Returns:
        `failure`, or a copy naming a worker on a host that is down.
    """
    if failure.state != WorkerState.HUNG:
        return failure
    unanswered = {h.address: why for h, why in down.items()}
    if not unanswered or failure.host in unanswered:
        return failure
    for index, address in sorted(hosts_of.items()):
        if address in unanswered:
            return dataclasses.replace(
                failure, worker=index, host=address,
                reason=f"{failure.reason.split(';')[0]}; its host does not "
                f"answer ({unanswered[address]})",
            )
    return failure

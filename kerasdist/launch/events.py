"""What happened during a run, as typed events every consumer reads.

The agent publishes one event per thing that happened (an attempt
started, a worker exited, a host did not answer, the group shrank, ...)
to an `EventBus`. Subscribers: `Console` (the `[launcher]` lines),
`JsonLines` (`--log_dir D` → `D/events.jsonl`, one JSON object per line,
its `"event"` field naming it) and whatever a test or benchmark adds.
docs/guide/fault_tolerance.md lists every event and field.

Concurrency: `publish` may be called from any thread; one lock keeps
subscribers' calls in order and lines whole.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import threading
import time
from collections.abc import Callable
from typing import IO, Any, ClassVar

from kerasdist.launch import goodput, results

__all__ = [
    "AttemptStarted",
    "Console",
    "Event",
    "EventBus",
    "GaveUp",
    "GoodputMeasured",
    "HostExcluded",
    "HostUnreachable",
    "HostsReturned",
    "Interrupted",
    "JsonLines",
    "Restarting",
    "RunEnded",
    "Shrunk",
    "Grew",
    "WorkerExited",
    "WorkerHung",
    "WorkerNotStarted",
    "read",
]

EVENTS_FILE = "events.jsonl"


def _now() -> float:
    return time.time()


@dataclasses.dataclass(frozen=True)
class Event:
    """Base of every event: `time` is seconds since the epoch."""

    name: ClassVar[str] = "event"
    time: float = dataclasses.field(default_factory=_now, kw_only=True)

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object: `{"event": name, "time": ..., ...}`."""
        record: dict[str, Any] = {"event": self.name}
        for f in dataclasses.fields(self):
            record[f.name] = _plain(getattr(self, f.name))
        return record

    def console(self) -> str | None:
        """The `[launcher]` line (without prefix), or None for none."""
        return None


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name))
                for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class AttemptStarted(Event):
    """A group of `size` workers is being started on `hosts`."""

    name: ClassVar[str] = "attempt_started"
    attempt: int
    size: int
    hosts: list[str]
    command: list[str]
    multi_host: bool = False

    def console(self) -> str:
        where = (
            f" on {len(self.hosts)} host(s) ({', '.join(self.hosts)})"
            if self.multi_host else ""
        )
        return (
            f"attempt {self.attempt}: starting {self.size} worker(s)"
            f"{where}: {' '.join(self.command)}"
        )


@dataclasses.dataclass(frozen=True)
class _WorkerEvent(Event):
    attempt: int
    rank: int
    host: str | None
    state: str
    reason: str
    at_start: bool


@dataclasses.dataclass(frozen=True)
class WorkerExited(_WorkerEvent):
    """Worker `rank` exited with `exit_code` (or was killed by `signal`)."""

    name: ClassVar[str] = "worker_exited"
    exit_code: int | None = None
    signal: str | None = None


@dataclasses.dataclass(frozen=True)
class WorkerHung(_WorkerEvent):
    """Worker `rank` made no progress (or is stopped): blamed for a hang."""

    name: ClassVar[str] = "worker_hung"


@dataclasses.dataclass(frozen=True)
class WorkerNotStarted(_WorkerEvent):
    """Worker `rank`'s host could not take it (e.g. no free ports)."""

    name: ClassVar[str] = "worker_not_started"


def for_failure(failure: results.Failure) -> _WorkerEvent:
    """The event for the worker that ended an attempt."""
    common = dict(
        attempt=failure.attempt, rank=failure.worker, host=failure.host,
        state=failure.state.value, reason=failure.reason, time=failure.time,
        at_start=failure.at_start,
    )
    if failure.state == results.WorkerState.HUNG:
        return WorkerHung(**common)
    code = failure.exit_code
    if code is None:
        return WorkerNotStarted(**common)
    return WorkerExited(
        **common, exit_code=code,
        signal=results.signal_name(-code) if code < 0 else None,
    )


@dataclasses.dataclass(frozen=True)
class Restarting(Event):
    """The group restarts after a failure: restart `used` of `limit` of
    budget `kind` (`"restart"` or `"preemption"`)."""

    name: ClassVar[str] = "restarting"
    attempt: int
    kind: str
    used: int
    limit: int
    description: str

    def console(self) -> str:
        note = (
            " (not counted toward --max_restarts)"
            if self.kind == "preemption" else ""
        )
        return (
            f"{self.description}; {self.kind} {self.used}/{self.limit}{note}"
        )


@dataclasses.dataclass(frozen=True)
class HostUnreachable(Event):
    """`host` did not answer a probe; waited for up to `host_wait` s."""

    name: ClassVar[str] = "host_unreachable"
    attempt: int
    host: str
    reason: str
    host_wait: float

    def console(self) -> str:
        wait = (
            f"; waiting up to {self.host_wait:g}s for it"
            if self.host_wait else ""
        )
        return f"host {self.host} is unreachable ({self.reason}){wait}"


@dataclasses.dataclass(frozen=True)
class HostExcluded(Event):
    """An elastic run goes on without `host` for good: `reason`."""

    name: ClassVar[str] = "host_excluded"
    attempt: int
    host: str
    reason: str

    def console(self) -> str:
        return (
            f"host {self.host}: {self.reason}; going on without it (it is "
            "not taken back)"
        )


@dataclasses.dataclass(frozen=True)
class Shrunk(Event):
    """The next group goes on without the `lost` hosts: `old_size` →
    `new_size` workers (at least `min_workers`)."""

    name: ClassVar[str] = "shrunk"
    attempt: int
    lost: list[str]
    hosts: list[str]
    old_size: int
    new_size: int
    min_workers: int

    def console(self) -> str:
        return (
            f"going on without {', '.join(self.lost)}: {self.new_size} "
            f"worker(s) on {len(self.hosts)} host(s) (--min_workers "
            f"{self.min_workers})"
        )


@dataclasses.dataclass(frozen=True)
class HostsReturned(Event):
    """Missing `hosts` answered twice: the group stops to grow."""

    name: ClassVar[str] = "hosts_returned"
    attempt: int
    hosts: list[str]
    grace_period: float

    def console(self) -> str:
        return (
            f"host(s) {', '.join(self.hosts)} answer again; stopping the "
            "group to grow it (SIGTERM: workers save and exit; SIGKILL "
            f"after {self.grace_period:g}s)"
        )


@dataclasses.dataclass(frozen=True)
class Grew(Event):
    """The next group takes back hosts: `old_size` → `new_size` workers."""

    name: ClassVar[str] = "grew"
    attempt: int
    hosts: list[str]
    old_size: int
    new_size: int


@dataclasses.dataclass(frozen=True)
class Interrupted(Event):
    """The launcher got `signal`; workers get SIGTERM, then SIGKILL after
    `grace_period` s."""

    name: ClassVar[str] = "interrupted"
    attempt: int
    signal: str
    grace_period: float

    def console(self) -> str:
        return (
            f"got {self.signal}; stopping workers (SIGTERM, then SIGKILL "
            f"after {self.grace_period:g}s)"
        )


@dataclasses.dataclass(frozen=True)
class GaveUp(Event):
    """The run ends without success: `reason`, exit `returncode`."""

    name: ClassVar[str] = "gave_up"
    attempt: int
    reason: str
    returncode: int

    def console(self) -> str:
        return self.reason


@dataclasses.dataclass(frozen=True)
class GoodputMeasured(Event, goodput.Goodput):
    """The run's wall time split into steps that count and badput by
    cause: the fields of `goodput.Goodput` (seconds; None: not measured)
    and `goodput`, their ratio `counted / wall_time`."""

    name: ClassVar[str] = "goodput"
    attempt: int

    def to_json(self) -> dict[str, Any]:
        record = super().to_json()
        record["goodput"] = self.goodput
        return record

    @classmethod
    def of(cls, attempt: int, report: goodput.Goodput) -> GoodputMeasured:
        """The event for `report`, after attempt `attempt`."""
        return cls(attempt=attempt, **dataclasses.asdict(report))


@dataclasses.dataclass(frozen=True)
class RunEnded(Event):
    """The run is over; `result` is what `run` returns."""

    name: ClassVar[str] = "run_ended"
    result: results.RunResult

    def to_json(self) -> dict[str, Any]:
        record = {"event": self.name, "time": self.time}
        record.update(_plain(self.result))
        record["outcome"] = self.result.outcome
        return record


class EventBus:
    """Delivers each event to every subscriber, in order, one at a time.

    Example:

    ```python
    bus = EventBus()
    seen = []
    bus.subscribe(seen.append)
    ```
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[Event], None]] = []

    def subscribe(self, subscriber: Callable[[Event], None]) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def publish(self, event: Event) -> None:
        with self._lock:
            for subscriber in self._subscribers:
                subscriber(event)


class Console:
    """Writes `[launcher]` lines, and the summary, to a stream.

    `write` is shared with the workers' output (one lock: lines never
    interleave).
    """

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._stream.write(text)
            self._stream.flush()

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunEnded):
            self.write(event.result.summary() + "\n")
            return
        line = event.console()
        if line is not None:
            self.write(f"[launcher] {line}\n")


class JsonLines:
    """Appends each event to `path` as one JSON object per line."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.to_json(), default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def read(log_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of `log_dir/events.jsonl`, in order (empty if none).

    Args:
        log_dir: str or path. The run's `--log_dir`.

    Returns:
        list of dict, each with `"event"` and `"time"`.

    Example:

    ```python
    names = [e["event"] for e in read("/tmp/logs")]
    ```
    """
    path = os.path.join(os.fspath(log_dir), EVENTS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            # A line still being written has no newline yet: not read.
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []

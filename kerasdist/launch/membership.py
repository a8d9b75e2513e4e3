"""Which hosts are up: probing, "answered twice", and the `host_wait` clock.

Concurrency: probes run on daemon threads (one per host, so a dead host
costs one probe timeout, not one per host). Every result a thread produces
is written under `Membership._lock`, and each background probe carries the
generation it was started in: `watch` results from an earlier attempt
(`new_attempt` bumps the generation) are dropped, never mixed with the
current attempt's. The main loop only reads through the methods.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

from kerasdist.launch import hosts as hostlib

__all__ = ["Membership"]

Down = dict  # {Host: reason in words}


@dataclasses.dataclass
class _Probe:
    """A probe of every host started when a failure was seen."""

    since: float  # Clock time of the failure.
    thread: threading.Thread
    down: Down


class Membership:
    """The hosts of a run and what the launcher last learned about them.

    Args:
        hosts: list of `Host`. Every host, in order.
        starter_for: callable `Host -> Starter`. Who probes a host.
        host_wait: float. Seconds from a failure to wait for a host.
        clock: callable returning seconds (monotonic). Defaults to
            `time.monotonic`; tests pass a fake one.

    Example:

    ```python
    members = Membership(spec.host_list(), starter_for, host_wait=30)
    down = members.probe(members.hosts)
    ```
    """

    def __init__(self, hosts: Sequence[hostlib.Host],
                 starter_for: Callable[[hostlib.Host], hostlib.Starter], *,
                 host_wait: float, clock: Callable[[], float] = time.monotonic):
        self.hosts = list(hosts)
        self.host_wait = host_wait
        self._starter_for = starter_for
        self._clock = clock
        self._lock = threading.Lock()
        self._generation = 0
        self._returned: tuple[hostlib.Host, ...] = ()
        self._answered: frozenset[hostlib.Host] = frozenset()
        self._watcher: threading.Thread | None = None
        self._early: _Probe | None = None

    def probe(self, hosts: Sequence[hostlib.Host]) -> Down:
        """{host: reason} for the `hosts` that do not answer (in parallel).

        Args:
            hosts: list of `Host`.

        Returns:
            dict mapping each unreachable host to the reason, in words.
        """
        down: Down = {}
        lock = threading.Lock()

        def probe(host):
            starter = self._starter_for(host)
            reason = starter.reachable(host, starter.probe_timeout)
            if reason is not None:
                with lock:
                    down[host] = reason

        threads = [threading.Thread(target=probe, args=(h,), daemon=True)
                   for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {h: down[h] for h in hosts if h in down}

    def failure_seen(self) -> None:
        """Starts probing every host at once, so that the probe overlaps
        the stopping of the survivors; `host_wait` counts from now."""
        since, down = self._clock(), {}

        def run():
            found = self.probe(self.hosts)
            with self._lock:
                down.update(found)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        with self._lock:
            self._early = _Probe(since, thread, down)

    def deadline(self) -> float:
        """Clock time until which unreachable hosts are waited for: the
        failure's time (or now) plus `host_wait`."""
        with self._lock:
            early = self._early
        since = early.since if early is not None else self._clock()
        return since + self.host_wait

    def unreachable(self) -> Down:
        """{host: reason} for the hosts down now: the result of the probe
        started at the failure if there is one (once), else a new probe."""
        with self._lock:
            early, self._early = self._early, None
        if early is None:
            return self.probe(self.hosts)
        early.thread.join()
        with self._lock:
            return dict(early.down)

    def seen_at_failure(self, timeout: float = 60.0) -> Down:
        """{host: reason} from the probe started at the failure (waiting
        for it), without using it up; empty when there is none.

        Args:
            timeout: float. Seconds to wait for the probe at most.

        Returns:
            dict mapping each unreachable host to the reason.
        """
        with self._lock:
            early = self._early
        if early is None:
            return {}
        early.thread.join(timeout)
        with self._lock:
            return dict(early.down)

    def new_attempt(self) -> None:
        """Forgets what missing hosts answered: a new group started."""
        with self._lock:
            self._generation += 1
            self._returned = ()
            self._answered = frozenset()

    def watch(self, missing: Sequence[hostlib.Host]) -> None:
        """Probes `missing` hosts in the background (unless a probe is
        still running); `returned` then names those that answered this
        probe and the one before it (a flapping host does not resize)."""
        with self._lock:
            if self._watcher is not None and self._watcher.is_alive():
                return
            generation = self._generation

        def run():
            down = self.probe(missing)
            up = frozenset(h for h in missing if h not in down)
            with self._lock:
                if generation != self._generation:
                    return  # A probe from an earlier attempt: stale.
                self._returned = tuple(
                    h for h in missing if h in up and h in self._answered
                )
                self._answered = up

        watcher = threading.Thread(target=run, daemon=True)
        with self._lock:
            self._watcher = watcher
        watcher.start()

    def wait_idle(self, timeout: float) -> bool:
        """Waits for the background probe of `watch` to end.

        Args:
            timeout: float. Seconds to wait at most.

        Returns:
            bool. True when no probe is running.
        """
        with self._lock:
            watcher = self._watcher
        if watcher is not None:
            watcher.join(timeout)
            return not watcher.is_alive()
        return True

    def returned(self) -> tuple[hostlib.Host, ...]:
        """Missing hosts that answered twice in a row, in order."""
        with self._lock:
            return self._returned

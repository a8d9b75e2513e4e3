"""Preemption and heartbeats for `kd.callbacks.BackupAndRestore`.

Every signal in `kerasdist.launch.protocol.PREEMPTION_SIGNALS` (SIGTERM,
SIGUSR1) means "save, then restart me". One process-wide recorder handles
them: from the creation of a `kd.MultiWorkerMirroredStrategy` (TensorFlow's
multi-worker runtime installs its own SIGTERM handler then, which would
swallow the signal) or from the start of a `fit` with the callback. A
signal that arrives before `fit` is acted on at its first step boundary.

With several workers all must save at the same step boundary: the worker
that received the signal writes, to `backup_dir/preempt/rank-<r>`, the step
two calls ahead. Peers are at most one step apart (each step is an
all-reduce), so every worker reads the announcement before it passes that
step, and all save at the same one.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from kerasdist import _internals
from kerasdist.callbacks import _backup_store as store
from kerasdist.launch import protocol

PREEMPT_DIR = "preempt"
HEARTBEAT_SECONDS = 1.0


class Heartbeat:
    """Shows the launcher progress about once a second.

    Args:
        send: callable or None. Writes the heartbeat (the worker's goodput
            facts into `KERASDIST_HEARTBEAT_FILE`); None only touches it.
    """

    def __init__(self, send: Callable[[], None] | None = None):
        self._send = send or protocol.touch_heartbeat
        self._last = 0.0

    def start(self) -> None:
        self.beat(now=True)

    def beat(self, now: bool = False) -> None:
        """Sends a heartbeat if one second passed since the last (or
        `now`)."""
        clock = time.monotonic()
        if now or clock - self._last >= HEARTBEAT_SECONDS:
            self._send()
            self._last = clock


class _Recorder:
    """The process-wide handler of the preemption signals."""

    def __init__(self):
        self._previous: dict[int, Any] = {}
        self._fits: list[Preemption] = []
        self._fit_started = False
        self.pending: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in protocol.PREEMPTION_SIGNALS:
            current = signal.getsignal(signum)
            if signum not in self._previous:
                self._previous[signum] = current
            # Always set it again: TensorFlow's runtime may have replaced
            # the handler underneath Python's record of it.
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None
                          else previous)
        self._previous.clear()
        self._fits.clear()
        self._fit_started = False
        self.pending = None

    def attach(self, preemption: Preemption) -> None:
        self.install()
        self._fit_started = True
        # One `fit` at a time: a new one means earlier ones ended (those
        # that raised never reached on_train_end).
        self._fits = [preemption]
        if self.pending is not None:
            preemption.requested = self.pending
            self.pending = None

    def detach(self, preemption: Preemption) -> None:
        self._fits = [p for p in self._fits if p is not preemption]
        if not self._fits:
            self.uninstall()

    def _handle(self, signum, frame):
        for p in self._fits:
            if _internals.fit_is_running(p.model, frame):
                p.requested = signum
                return
        if not self._fit_started:
            self.pending = signum  # Acted on at the first step of `fit`.
            return
        # `fit` ended with an exception (Keras then skips on_train_end):
        # give the signal to whoever handled it before.
        self.uninstall()
        signal.raise_signal(signum)


_RECORDER = _Recorder()


def record_preemption_signals() -> None:
    """Records preemption signals from now on, for the next `fit`.

    Called when a `kd.MultiWorkerMirroredStrategy` is created.
    """
    _RECORDER.install()


class Preemption:
    """A preemption request during one `fit`, and the agreed stop step.

    Args:
        backup_dir: str. The shared backup directory.
        model: the model whose `fit` runs.
        rank: int. This worker's rank.
        num_workers: int.
    """

    def __init__(self, backup_dir: str, model: Any, rank: int,
                 num_workers: int):
        self.dir = os.path.join(backup_dir, PREEMPT_DIR)
        self.model = model
        self.rank = rank
        self.num_workers = num_workers
        self.requested: int | None = None  # the signal received
        self._announced = False
        self._restored_step = 0

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""

    def clear(self) -> None:
        """Chief, at the start: forget announcements of earlier attempts."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def set_restored_step(self, step: int) -> None:
        self._restored_step = step

    def install(self) -> None:
        _RECORDER.attach(self)

    def uninstall(self) -> None:
        _RECORDER.detach(self)

    def should_stop(self, global_step: int, steps: int) -> bool:
        """True when this worker must save and exit at `global_step`."""
        if self.num_workers == 1:
            return bool(self.requested)
        if self.requested and not self._announced:
            os.makedirs(self.dir, exist_ok=True)
            store.write_text_atomic(
                os.path.join(self.dir, f"rank-{self.rank}"),
                str(global_step + 2 * steps),
            )
            self._announced = True
        stop_at = self._announced_stop()
        return stop_at is not None and global_step >= stop_at

    def _announced_stop(self) -> int | None:
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return None
        steps = []
        for name in entries:
            try:
                with open(os.path.join(self.dir, name)) as f:
                    steps.append(int(f.read()))
            except (OSError, ValueError):
                continue
        # Ignore announcements from before this attempt's restore.
        steps = [s for s in steps if s > self._restored_step]
        return min(steps) if steps else None

"""Preemption and heartbeats for `kd.callbacks.BackupAndRestore`.

On SIGTERM every worker must save at the same step boundary: the worker
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
from typing import Any

from kerasdist import _internals
from kerasdist.callbacks import _backup_store as store
from kerasdist.launch import protocol

PREEMPT_DIR = "preempt"
HEARTBEAT_SECONDS = 1.0


class Heartbeat:
    """Touches the launcher's heartbeat file about once a second."""

    def __init__(self):
        self._last = 0.0

    def start(self) -> None:
        protocol.touch_heartbeat()
        self._last = time.monotonic()

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last >= HEARTBEAT_SECONDS:
            protocol.touch_heartbeat()
            self._last = now


class Preemption:
    """Records SIGTERM during `fit` and agrees on the step to stop at.

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
        self.requested = False
        self._announced = False
        self._old_handler: Any = None
        self._restored_step = 0

    def clear(self) -> None:
        """Chief, at the start: forget announcements of earlier attempts."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def set_restored_step(self, step: int) -> None:
        self._restored_step = step

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum, frame):
            if _internals.fit_is_running(self.model, frame):
                self.requested = True
                return
            # `fit` ended with an exception (Keras then skips on_train_end):
            # give the signal to whoever handled it before.
            self.uninstall()
            signal.raise_signal(signum)

        previous = signal.getsignal(signal.SIGTERM)
        # A handler left by an earlier `fit` that raised: chain past it.
        previous = getattr(previous, "_kerasdist_previous", previous)
        on_sigterm._kerasdist_previous = previous
        signal.signal(signal.SIGTERM, on_sigterm)
        self._old_handler = previous

    def uninstall(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None

    def should_stop(self, global_step: int, steps: int) -> bool:
        """True when this worker must save and exit at `global_step`."""
        if self.num_workers == 1:
            return self.requested
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

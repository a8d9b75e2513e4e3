"""TensorFlow's C++ start-up lines, kept off the launcher's console.

On a machine without GPUs every TensorFlow 2.21 worker prints, before
absl's logging is initialised (so `TF_CPP_MIN_LOG_LEVEL` does not hide
them, and the cuInit line is an ERROR that only level 3 would hide, with
every real error): absl's pre-init notice, oneDNN's notice, the CUDA
driver probe, its `failed call to cuInit` error, and the CPU-instructions
notice. `kerasdist-run` drops exactly those lines from its console; every
other line, warnings and real errors included, passes, and the workers'
own log files (`--log_dir`) keep everything. `KERASDIST_VERBOSE=1` in the
launcher's environment shows them on the console too.

Concurrency: `StartupFilter` is called from each worker's output thread;
its only state, the workers known to have no CUDA driver, is guarded by
one lock.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable

__all__ = ["ENV_VERBOSE", "StartupFilter", "console_writer", "is_noise"]

ENV_VERBOSE = "KERASDIST_VERBOSE"

_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is"
    r"|\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^(\[[^\]]*\] )?To enable the following instructions: .* rebuild "
    r"TensorFlow"
)
_NO_DRIVER = "Could not find cuda drivers"
# Noise only once the same worker said it has no driver: with a driver
# installed, a failed cuInit is a real error.
_NO_DRIVER_ONLY = re.compile(r"cuda_platform\.cc:\d+\] failed call to cuInit")


class StartupFilter:
    """Passes a worker's output lines on to `write`, less the start-up noise.

    Args:
        write: callable. Takes text of whole lines, each prefixed with its
            worker's `[worker-i...]` tag, as the launcher's console does.

    Example:

    >>> out = []
    >>> quiet = StartupFilter(out.append)
    >>> quiet("[worker-0] W0000 cudart_stub.cc:31] Could not find cuda "
    ...       "drivers on your machine\\n[worker-0] Epoch 1/3\\n")
    >>> out
    ['[worker-0] Epoch 1/3\\n']
    """

    def __init__(self, write: Callable[[str], None]):
        self._write = write
        self._lock = threading.Lock()
        self._no_driver: set[str] = set()

    def __call__(self, text: str) -> None:
        kept = [line for line in text.splitlines(keepends=True)
                if not self._is_noise(line)]
        if kept:
            self._write("".join(kept))

    def _is_noise(self, line: str) -> bool:
        worker = line.split("]", 1)[0]
        if is_noise(line):
            if _NO_DRIVER in line:
                with self._lock:
                    self._no_driver.add(worker)
            return True
        if _NO_DRIVER_ONLY.search(line):
            with self._lock:
                return worker in self._no_driver
        return False


def is_noise(line: str) -> bool:
    """True for a start-up line dropped whatever came before it.

    Example:

    >>> is_noise("W0000 cudart_stub.cc:31] Could not find cuda drivers")
    True
    """
    return bool(_NOISE.search(line))


def console_writer(write: Callable[[str], None],
                   environ=None) -> Callable[[str], None]:
    """`write` itself under `KERASDIST_VERBOSE=1`, else a `StartupFilter`.

    Example:

    >>> console_writer(print, {"KERASDIST_VERBOSE": "1"}) is print
    True
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VERBOSE, "").strip() not in ("", "0"):
        return write
    return StartupFilter(write)

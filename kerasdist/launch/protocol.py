"""The contract between `kerasdist-run` and the workers it starts.

Kept in one place so the launcher and `kd.callbacks.BackupAndRestore` agree:

- `RESTART_EXIT_CODE` (75, `EX_TEMPFAIL` in `sysexits.h`): a worker exiting
  with it asks to be restarted, not failed. `BackupAndRestore` exits with it
  after saving on SIGTERM (preemption). The launcher restarts the group and
  does **not** count it toward `--max_restarts` (it has its own bound,
  `--max_preemptions`), because the state was saved and nothing was lost.
- `PERMANENT_EXIT_CODE` (78, `EX_CONFIG`): the worker failed in a way a
  restart cannot fix (`kerasdist.errors.PermanentError`); the launcher stops
  at once.
- `PREEMPTION_SIGNALS`: the signals that mean "save now, then restart me"
  (SIGTERM: preemption; SIGUSR1: a scheduler's time-limit warning, e.g.
  SLURM `--signal=USR1@90`). `exit_for_restart()` is how a worker that
  saved leaves; it is where the per-engine mapping of "saved, restart me"
  lives (exit 75 under `kerasdist-run`).
- Environment variables the launcher sets in every worker:
  `KERASDIST_RESTART_COUNT` (0 on the first attempt), `KERASDIST_WORKER_INDEX`,
  `KERASDIST_NUM_WORKERS`, `KERASDIST_HEARTBEAT_FILE` (a file the worker
  touches to show progress; see `touch_heartbeat`) and `TF_CONFIG`.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = [
    "ENV_HEARTBEAT_FILE",
    "ENV_NUM_WORKERS",
    "ENV_RESTART_COUNT",
    "ENV_WORKER_INDEX",
    "PERMANENT_EXIT_CODE",
    "PREEMPTION_SIGNALS",
    "RESTART_EXIT_CODE",
    "exit_for_restart",
    "install_permanent_error_hook",
    "restart_count",
    "touch_heartbeat",
]

RESTART_EXIT_CODE = 75
PERMANENT_EXIT_CODE = 78
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
ENV_RESTART_COUNT = "KERASDIST_RESTART_COUNT"
ENV_WORKER_INDEX = "KERASDIST_WORKER_INDEX"
ENV_NUM_WORKERS = "KERASDIST_NUM_WORKERS"
ENV_HEARTBEAT_FILE = "KERASDIST_HEARTBEAT_FILE"


def restart_count() -> int:
    """How many times the launcher has restarted this worker group.

    Returns:
        int. `KERASDIST_RESTART_COUNT`, or 0 outside the launcher.

    Example:

    >>> restart_count() >= 0
    True
    """
    raw = os.environ.get(ENV_RESTART_COUNT, "").strip()
    return int(raw) if raw.isdigit() else 0


def touch_heartbeat() -> None:
    """Marks progress for the launcher's `--timeout` (no-op outside it).

    Sets the modification time of `KERASDIST_HEARTBEAT_FILE` to now.

    Example:

    >>> touch_heartbeat()
    """
    path = os.environ.get(ENV_HEARTBEAT_FILE)
    if not path:
        return
    try:
        os.utime(path)
    except FileNotFoundError:
        try:
            with open(path, "a"):
                pass
        except OSError:
            pass
    except OSError:
        pass


def _exit_on_permanent_error(previous):
    """An excepthook: report as before, then exit 78 for a PermanentError."""

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        from kerasdist.errors import PermanentError

        if isinstance(exc_type, type) and issubclass(
            exc_type, PermanentError
        ):
            sys.stdout.flush()
            sys.stderr.flush()
            # The interpreter would exit 1 after the hook: a failure the
            # launcher retries. os._exit keeps the status; atexit handlers
            # do not run (TF's may block on peers that wait in a
            # collective; the launcher stops those).
            os._exit(PERMANENT_EXIT_CODE)

    hook._kerasdist_permanent = True
    return hook


def install_permanent_error_hook() -> bool:
    """Makes an uncaught `PermanentError` exit with `PERMANENT_EXIT_CODE`.

    Only inside a worker started by the launcher (`KERASDIST_RESTART_COUNT`
    is set), so `kerasdist-run` stops at once instead of retrying a failure
    that restarting cannot fix. The previous `sys.excepthook` still prints
    the traceback first. `import kerasdist` calls it; calling it again does
    nothing.

    Returns:
        bool. True if the hook is (now or already) installed.

    Example:

    >>> install_permanent_error_hook() in (True, False)
    True
    """
    if ENV_RESTART_COUNT not in os.environ:
        return False
    if not getattr(sys.excepthook, "_kerasdist_permanent", False):
        sys.excepthook = _exit_on_permanent_error(sys.excepthook)
    return True


def exit_for_restart() -> None:
    """Leaves the process so that the engine restarts it ("saved, restart me").

    Call it only after the state was saved. Under `kerasdist-run` (and by
    default) it exits with `RESTART_EXIT_CODE`.

    Raises:
        SystemExit: always.

    Example:

    ```python
    callback.save()
    protocol.exit_for_restart()
    ```
    """
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(RESTART_EXIT_CODE)

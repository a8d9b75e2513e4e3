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
- Elastic runs (the launcher may restart the group at another size) also
  get `KERASDIST_MIN_WORKERS` and `KERASDIST_MAX_WORKERS` (the allowed
  group sizes; elastic when MIN < MAX) and `KERASDIST_HOST` (this worker's
  host address). `kerasdist.elastic` reads them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from kerasdist._validate import env_int

__all__ = [
    "DEFAULT_K8S_RESTART_EXIT_CODE",
    "ENGINES",
    "ENV_ENGINE",
    "ENV_HEARTBEAT_FILE",
    "ENV_HOST",
    "ENV_K8S_RESTART_EXIT_CODE",
    "ENV_MAX_WORKERS",
    "ENV_WORKER_SIZES",
    "ENV_MIN_WORKERS",
    "ENV_SLURM_REQUEUE",
    "ENV_NUM_WORKERS",
    "ENV_RESTART_COUNT",
    "ENV_WORKER_INDEX",
    "PERMANENT_EXIT_CODE",
    "PREEMPTION_SIGNALS",
    "RESTART_EXIT_CODE",
    "RestartRequested",
    "exit_for_restart",
    "install_permanent_error_hook",
    "kubernetes_restart_exit_code",
    "restart_engine",
    "restart_count",
    "slurm_requeue",
    "TRAINING_FINISHED",
    "heartbeat_says_finished",
    "read_heartbeat",
    "report_training_finished",
    "touch_heartbeat",
]

RESTART_EXIT_CODE = 75
PERMANENT_EXIT_CODE = 78
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
ENV_RESTART_COUNT = "KERASDIST_RESTART_COUNT"
ENV_WORKER_INDEX = "KERASDIST_WORKER_INDEX"
ENV_NUM_WORKERS = "KERASDIST_NUM_WORKERS"
ENV_HEARTBEAT_FILE = "KERASDIST_HEARTBEAT_FILE"
# Elastic runs (owner: kerasdist.elastic; set by the multi-host launcher).
ENV_MIN_WORKERS = "KERASDIST_MIN_WORKERS"  # smallest group size allowed
ENV_MAX_WORKERS = "KERASDIST_MAX_WORKERS"  # largest group size allowed
# The group sizes the launcher can reach between them, comma-separated
# ("14,16": hosts of 2 slots each; set over hosts only); unset: every
# size from min to max.
ENV_WORKER_SIZES = "KERASDIST_WORKER_SIZES"
ENV_HOST = "KERASDIST_HOST"  # this worker's host address
# The heartbeat's JSON field saying training is done (`{"finished": true}`).
TRAINING_FINISHED = "finished"


def restart_count() -> int:
    """How many times the launcher has restarted this worker group.

    Returns:
        int. `KERASDIST_RESTART_COUNT`, or 0 outside the launcher.

    Example:

    >>> restart_count() >= 0
    True
    """
    try:
        return env_int(ENV_RESTART_COUNT) or 0
    except ValueError:
        return 0  # Not set by a launcher we know: a first attempt.


def report_training_finished() -> None:
    """Tells the launcher this worker's training is done (no-op outside it).

    Writes `{"finished": true}` to `KERASDIST_HEARTBEAT_FILE` (the format
    `kd.callbacks.BackupAndRestore` writes its goodput facts in). An
    elastic `kerasdist-run` does not resize a group once one of its
    workers said so (a grow would stop workers in their post-`fit` code).
    It also counts as progress. Call it when `fit` returns.

    Example:

    >>> report_training_finished()
    """
    path = os.environ.get(ENV_HEARTBEAT_FILE)
    if not path:
        return
    try:
        with open(path, "w") as f:
            f.write(json.dumps({TRAINING_FINISHED: True}) + "\n")
    except OSError:
        pass


def read_heartbeat(text: str) -> dict | None:
    """The JSON object a heartbeat file holds, or None.

    The file is empty (only touched) or holds one JSON object: the goodput
    facts of `kd.callbacks.BackupAndRestore`, or `{"finished": true}` from
    `report_training_finished`.

    Args:
        text: str. The file's content.

    Returns:
        dict or None (empty, or not a JSON object).

    Example:

    >>> read_heartbeat('{"steps": 3}')
    {'steps': 3}
    """
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def heartbeat_says_finished(text: str) -> bool:
    """True when a heartbeat file's text says training is done: its JSON
    object (see `read_heartbeat`) has `"finished": true`.

    Example:

    >>> heartbeat_says_finished('{"steps": 3, "finished": true}')
    True
    """
    record = read_heartbeat(text)
    return record is not None and record.get(TRAINING_FINISHED) is True


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
        from kerasdist.errors import PermanentError

        permanent = isinstance(exc_type, type) and issubclass(
            exc_type, PermanentError)
        if permanent:
            # The launcher stops the other workers when one exits 78; one
            # that is reporting the same error would be cut off mid-message
            # by the default SIGTERM action (fit has restored it). The
            # process exits right after the report; SIGKILL still bounds it.
            for signum in PREEMPTION_SIGNALS:
                try:
                    signal.signal(signum, signal.SIG_IGN)
                except ValueError:  # not the main thread: report anyway
                    break
        previous(exc_type, exc, tb)
        if permanent:
            sys.stdout.flush()
            sys.stderr.flush()
            # The interpreter would exit 1 after the hook: a failure the
            # launcher retries. os._exit keeps the status; atexit handlers
            # do not run (TF's may block on peers that wait in a
            # collective; the launcher stops those).
            os._exit(PERMANENT_EXIT_CODE)

    hook._kerasdist_permanent = True  # noqa: SLF001 (our own marker)
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

    Call it only after the state was saved. What "restart me" means depends
    on the engine this worker runs under (`restart_engine()`):

    - `kerasdist-run` (and by default): exit with `RESTART_EXIT_CODE` (75).
    - SLURM: task 0 runs `scontrol requeue $SLURM_JOB_ID` when the job is
      requeueable (`sbatch --requeue`); every task exits 75, which, when
      the job was not requeued, the batch script's restart loop answers by
      rerunning `srun` (see `deploy/slurm/train.sbatch`).
    - Kubernetes: exit with `kubernetes_restart_exit_code()` (default 143,
      >= 128 as TFJob's `ExitCode` policy needs), which kerasdist's
      JobSet/Job manifests map to a group restart.
    - Ray Train: raise `RestartRequested`; Ray's `FailureConfig` restarts
      the worker group from the last reported checkpoint.

    Raises:
        SystemExit: except under Ray Train.
        RestartRequested: under Ray Train.

    Example:

    ```python
    callback.save()
    protocol.exit_for_restart()
    ```
    """
    sys.stdout.flush()
    sys.stderr.flush()
    engine = restart_engine()
    if engine == "ray":
        raise RestartRequested(
            "kerasdist: state saved; asking Ray Train to restart the group"
        )
    if engine == "slurm":
        slurm_requeue()
        sys.exit(RESTART_EXIT_CODE)
    if engine == "kubernetes":
        sys.exit(kubernetes_restart_exit_code())
    sys.exit(RESTART_EXIT_CODE)


# ---------------------------------------------------------------------------
# Per-engine mapping of "saved, restart me" (owner: cluster engines).
# ---------------------------------------------------------------------------

ENV_ENGINE = "KERASDIST_ENGINE"
ENV_K8S_RESTART_EXIT_CODE = "KERASDIST_K8S_RESTART_EXIT_CODE"
ENV_SLURM_REQUEUE = "KERASDIST_SLURM_REQUEUE"
ENGINES = ("kerasdist-run", "slurm", "kubernetes", "ray")
DEFAULT_K8S_RESTART_EXIT_CODE = 143
_requeued = False


class RestartRequested(RuntimeError):
    """Raised under Ray Train by `exit_for_restart()`: saved, restart me.

    Ray Train treats an exception in the training function as a worker
    failure and, within `FailureConfig(max_failures)`, restarts the whole
    group from the last reported checkpoint. Recovery treats it as a
    restart, not a bug.

    Example:

    >>> issubclass(RestartRequested, RuntimeError)
    True
    """


def restart_engine(environ=None) -> str:
    """Which engine restarts this worker: one of `ENGINES`.

    `KERASDIST_ENGINE` chooses explicitly; otherwise `kerasdist-run` (its
    workers have `KERASDIST_WORKER_INDEX`), then Ray Train (a training
    session is active), then SLURM (`SLURM_JOB_ID`), then Kubernetes
    (`KUBERNETES_SERVICE_HOST`), else `"kerasdist-run"`.

    Args:
        environ: mapping or None. Defaults to `os.environ`.

    Returns:
        str.

    Raises:
        ValueError: if `KERASDIST_ENGINE` is not one of `ENGINES`.

    Example:

    >>> restart_engine({"SLURM_JOB_ID": "7"})
    'slurm'
    """
    environ = os.environ if environ is None else environ
    chosen = environ.get(ENV_ENGINE, "").strip()
    if chosen:
        if chosen not in ENGINES:
            raise ValueError(
                f"Invalid value for {ENV_ENGINE}. Received: "
                f"{ENV_ENGINE}={chosen!r}. Expected one of {list(ENGINES)}."
            )
        return chosen
    if environ.get(ENV_WORKER_INDEX, "").strip():
        return "kerasdist-run"
    if environ is os.environ and _in_ray_train():
        return "ray"
    if environ.get("SLURM_JOB_ID", "").strip():
        return "slurm"
    if environ.get("KUBERNETES_SERVICE_HOST", "").strip():
        return "kubernetes"
    return "kerasdist-run"


def _in_ray_train() -> bool:
    if "ray.train" not in sys.modules:
        return False
    from kerasdist.cluster.ray import ray_world

    return ray_world() is not None


def kubernetes_restart_exit_code(environ=None) -> int:
    """The exit code meaning "saved, restart me" under Kubernetes.

    `KERASDIST_K8S_RESTART_EXIT_CODE`, default 143. It must be in
    [128, 255]: Kubeflow TFJob's `ExitCode` restart policy retries only
    codes >= 128 (`IsRetryableExitCode` in training-operator), and the
    JobSet/Job manifests' `podFailurePolicy` must name the same code.

    Args:
        environ: mapping or None. Defaults to `os.environ`.

    Returns:
        int.

    Raises:
        ValueError: if the variable is not an integer in [128, 255].

    Example:

    >>> kubernetes_restart_exit_code({})
    143
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_K8S_RESTART_EXIT_CODE, "").strip()
    if not raw:
        return DEFAULT_K8S_RESTART_EXIT_CODE
    if not raw.isdigit() or not 128 <= int(raw) <= 255:
        raise ValueError(
            f"Invalid value for {ENV_K8S_RESTART_EXIT_CODE}. Received: "
            f"{ENV_K8S_RESTART_EXIT_CODE}={raw!r}. Expected an exit code in "
            "[128, 255] (TFJob retries only codes >= 128), the same as the "
            "podFailurePolicy's onExitCodes."
        )
    return int(raw)


def slurm_requeue(environ=None) -> bool:
    """Requeues this SLURM batch job if it may be (`scontrol requeue`).

    Runs at most once per process, and only in task 0 (the chief, which
    writes the backup: requeueing kills every task of the job, so no other
    task may do it while the chief may still be saving). Skipped when
    `KERASDIST_SLURM_REQUEUE` is `0`, when the job is not requeueable
    (`Requeue=0` in `scontrol show job`, i.e. not submitted with
    `--requeue`), or outside SLURM.

    Args:
        environ: mapping or None. Defaults to `os.environ`.

    Returns:
        bool. True if SLURM accepted the requeue (False in other tasks).

    Example:

    ```python
    if not protocol.slurm_requeue():
        sys.exit(protocol.RESTART_EXIT_CODE)  # the batch loop reruns srun
    ```
    """
    global _requeued
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID", "").strip()
    if _requeued or not job_id or environ.get(ENV_SLURM_REQUEUE) == "0":
        return _requeued
    if environ.get("SLURM_PROCID", "0").strip() != "0":
        return False
    try:
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id],
            capture_output=True, text=True, timeout=60,
        )
        if " Requeue=1 " not in f" {shown.stdout} " or shown.returncode:
            return False
        done = subprocess.run(
            ["scontrol", "requeue", job_id],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    _requeued = done.returncode == 0
    return _requeued

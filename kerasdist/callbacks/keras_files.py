"""Keras's own file-writing callbacks under multi-worker training.

Every worker runs the same script, so `keras.callbacks.ModelCheckpoint`,
`CSVLogger` and `TensorBoard` write the same path from every worker (seen:
`BlockingIOError: unable to lock file` on one worker, `UnavailableError` on
the other). When `fit` starts under a multi-worker kerasdist strategy, the
callbacks passed to it are adapted before the first step, in the way of
tf_keras's `distribute/distributed_file_utils.py`: the chief writes the
real path; every other worker runs the same callback with its path in a
private temporary directory that is deleted when the process exits (so no
worker skips a save that might run a collective).

`keras.callbacks.BackupAndRestore` cannot be adapted that way: every worker
must restore from the same backup, and Keras's resumes only at an epoch
start. It is refused with a message naming `kd.callbacks.BackupAndRestore`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

import keras

from kerasdist import cluster as cluster_lib
from kerasdist.errors import PermanentError

__all__ = ["KerasBackupAndRestoreError", "adapt_file_callbacks"]

_PATH_ATTRS = {
    keras.callbacks.ModelCheckpoint: ("filepath",),
    keras.callbacks.CSVLogger: ("filename",),
    keras.callbacks.TensorBoard: ("log_dir",),
}
_MARK = "_kerasdist_worker_path"


class KerasBackupAndRestoreError(PermanentError, ValueError):
    """`keras.callbacks.BackupAndRestore` passed to a multi-worker `fit`.

    Every worker would write the same backup file, and a restart resumes at
    the start of the epoch. `kd.callbacks.BackupAndRestore` takes the same
    `backup_dir` and `save_freq`, is multi-worker safe and resumes at the
    exact step.

    Example:

    >>> issubclass(KerasBackupAndRestoreError, ValueError)
    True
    """


def _callbacks_in(callbacks: Any) -> list:
    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return list(callbacks.callbacks)
    if isinstance(callbacks, keras.callbacks.Callback):
        return [callbacks]
    return list(callbacks)


def _is_keras_backup(callback: Any) -> bool:
    from kerasdist.callbacks.backup_and_restore import BackupAndRestore

    return isinstance(
        callback, keras.callbacks.BackupAndRestore
    ) and not isinstance(callback, BackupAndRestore)


def adapt_file_callbacks(
    callbacks: Any, task: cluster_lib.TaskInfo | None = None
) -> list:
    """Makes Keras's file-writing callbacks safe on several workers.

    On the chief nothing changes. On every other worker, the output path
    of each `ModelCheckpoint`, `CSVLogger` and `TensorBoard` (or a
    subclass) is moved into a private temporary directory, deleted when the
    process exits. Callbacks already wrapped in `kd.callbacks.ChiefOnly`
    are left alone. Calling it again on the same callbacks does nothing.

    Args:
        callbacks: list of `keras.callbacks.Callback`, a `CallbackList`, or
            None, as passed to `fit`.
        task: `kerasdist.cluster.TaskInfo` or None. This worker; defaults to
            `kerasdist.cluster.from_env()`.

    Returns:
        list of the callbacks whose paths were moved (empty on the chief).

    Raises:
        KerasBackupAndRestoreError: if `keras.callbacks.BackupAndRestore`
            is among them (on every worker, before the first step).

    Example:

    ```python
    adapt_file_callbacks([keras.callbacks.CSVLogger("log.csv")])
    ```
    """
    found = _callbacks_in(callbacks)
    for callback in found:
        if _is_keras_backup(callback):
            raise KerasBackupAndRestoreError(
                "keras.callbacks.BackupAndRestore is not multi-worker safe: "
                "every worker writes the same backup file (\"BlockingIOError:"
                " unable to lock file\"), and it resumes at the start of an "
                "epoch. Replace it with kd.callbacks.BackupAndRestore("
                f"{getattr(callback, 'backup_dir', 'backup_dir')!r}) (same "
                "backup_dir and save_freq; only the chief writes, and a "
                "restart resumes at the exact step)."
            )
    task = task if task is not None else cluster_lib.from_env()
    if task.is_chief:
        return []
    moved = []
    for callback in found:
        attrs = next((a for cls, a in _PATH_ATTRS.items()
                      if isinstance(callback, cls)), ())
        if not attrs or getattr(callback, _MARK, None):
            continue
        temp = tempfile.mkdtemp(prefix=f"kerasdist-worker{task.worker_rank}-")
        atexit.register(shutil.rmtree, temp, True)
        for name in attrs:
            path = os.fspath(getattr(callback, name))
            setattr(callback, name, os.path.join(
                temp, os.path.basename(path.rstrip("/\\")) or name))
        setattr(callback, _MARK, temp)
        moved.append(callback)
    return moved

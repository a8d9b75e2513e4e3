"""The on-disk store of `kd.callbacks.BackupAndRestore` (no TensorFlow).

One backup is one `.npz` file `ckpt-<global step, 12 digits>.npz` holding
arrays `v00000`, `v00001`, ... and a JSON `__meta__` string. Files are
written aside, flushed to disk (`fsync`), renamed into place and the
directory is flushed too, so a kill or a power loss never leaves a damaged
file under a backup's name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from kerasdist.errors import PermanentError

FORMAT_VERSION = 1
PREFIX = "ckpt-"
SUFFIX = ".npz"
META_KEY = "__meta__"
TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = "corrupt-"
PROGRESS_FILE = "progress.json"  # the furthest step trained (goodput)


def ckpt_name(global_step: int) -> str:
    """The file name of the backup taken after `global_step` steps."""
    return f"{PREFIX}{global_step:012d}{SUFFIX}"


def list_backups(backup_dir: str) -> list[str]:
    """Backup files in `backup_dir`, newest first."""
    try:
        names = os.listdir(backup_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = [n for n in names if n.startswith(PREFIX) and n.endswith(SUFFIX)]
    return [os.path.join(backup_dir, n) for n in sorted(names, reverse=True)]


def fsync_dir(directory: str) -> None:
    """Flushes a directory's entries (a rename) to disk, where supported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some file systems cannot fsync a directory.
    finally:
        os.close(fd)


def write_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes an `.npz` next to `path`, fsyncs it, renames it into place."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def write_backup(path: str, meta: dict, values: list[np.ndarray]) -> None:
    """Writes one backup: `values` in order, and `meta` as JSON."""
    arrays = {f"v{i:05d}": a for i, a in enumerate(values)}
    arrays[META_KEY] = np.array(json.dumps(meta))
    write_atomic(path, arrays)


def save(backup_dir: str, global_step: int, meta: dict,
         values: list[np.ndarray], keep: int, keep_it: bool) -> None:
    """Writes the backup of `global_step` and rotates the old ones.

    Every worker calls it; only the chief (`keep_it`) keeps the file, the
    others write it to a temporary directory that is deleted (as
    `tf_keras/distribute/distributed_file_utils.py` does), so the work is
    the same on all of them.
    """
    name = ckpt_name(global_step)
    if keep_it:
        os.makedirs(backup_dir, exist_ok=True)
        path = os.path.join(backup_dir, name)
        write_backup(path, meta, values)
        rotate(backup_dir, keep, path)
        return
    scratch = tempfile.mkdtemp(prefix="kerasdist-backup-worker-")
    try:
        write_backup(os.path.join(scratch, name), meta, values)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_text_atomic(path: str, text: str) -> None:
    """Writes a small text file aside and renames it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read(path: str) -> tuple[dict, list[np.ndarray]]:
    """Reads a backup; raises on any damage (zip CRCs are checked)."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f[META_KEY]))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown backup format {meta.get('format')!r}")
        count = sum(1 for name in f.files if name != META_KEY)
        values = [f[f"v{i:05d}"] for i in range(count)]
        if count < len(meta["names"]):
            raise ValueError(f"{count} arrays for {len(meta['names'])} names")
    return meta, values


def rotate(backup_dir: str, keep: int, newest: str) -> None:
    """Deletes all but the `keep` newest backups; never deletes `newest`.

    `newest` is the backup just written. Files named after a later step are
    left over from an abandoned future (the run restarted from an older
    backup): they go first, so they can never push `newest` out.
    """
    backups = [p for p in list_backups(backup_dir) if p != newest]
    name = os.path.basename(newest)
    later = [p for p in backups if os.path.basename(p) > name]
    earlier = [p for p in backups if os.path.basename(p) < name]
    for old in later + earlier[keep - 1:]:
        try:
            os.unlink(old)
        except OSError:
            pass


def delete_all(backup_dir: str) -> None:
    """Removes every backup, set-aside and temporary file, the progress
    file, and the directory itself if nothing else is left in it."""
    try:
        names = os.listdir(backup_dir)
    except OSError:
        return
    for name in names:
        if name.startswith((PREFIX, CORRUPT_PREFIX, TMP_PREFIX)) or (
            name == PROGRESS_FILE
        ):
            try:
                os.unlink(os.path.join(backup_dir, name))
            except OSError:
                pass
    try:
        os.rmdir(backup_dir)
    except OSError:
        pass


def set_aside(path: str) -> None:
    """Renames an unreadable backup to `corrupt-<name>` (kept for study)."""
    directory, name = os.path.split(path)
    try:
        os.replace(path, os.path.join(directory, CORRUPT_PREFIX + name))
    except OSError:
        pass


def remove_temporaries(backup_dir: str) -> None:
    """Removes files left by a kill in the middle of a save."""
    for name in os.listdir(backup_dir):
        if name.startswith(TMP_PREFIX):
            try:
                os.unlink(os.path.join(backup_dir, name))
            except OSError:
                pass


class BackupMismatchError(PermanentError, ValueError):
    """The backup was made by a different model; nothing was loaded.

    Recovery does not retry this: the backup directory belongs to another
    model (or the model's code changed). Use a new `backup_dir` or delete
    the old one.

    Example:

    >>> issubclass(BackupMismatchError, ValueError)
    True
    """


class BackupConfigError(PermanentError, ValueError):
    """`backup_dir` or another setting can never work; nothing was trained.

    Raised before the first step: a URL or blank path, a directory that
    cannot be created or written, a backup made with another
    `steps_per_execution`. Recovery does not retry it.

    Example:

    >>> issubclass(BackupConfigError, PermanentError)
    True
    """


def check_path(backup_dir: Any) -> str:
    """Returns `backup_dir` as a str if it can name a local directory.

    Raises:
        BackupConfigError: for a blank path or a URL.
    """
    if not isinstance(backup_dir, (str, os.PathLike)) or not str(
        os.fspath(backup_dir)
    ).strip():
        raise BackupConfigError(
            "Invalid value for argument `backup_dir`. "
            f"Received: backup_dir={backup_dir!r}. Expected a non-empty "
            "directory path."
        )
    path = os.fspath(backup_dir)
    if not isinstance(path, str):
        path = os.fsdecode(path)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
        raise BackupConfigError(
            "Invalid value for argument `backup_dir`. "
            f"Received: backup_dir={path!r}. Expected a local or mounted "
            "file system path: URLs (gs://, s3://, hdfs://) are not "
            "supported, because a backup is renamed into place atomically. "
            "Mount the bucket (e.g. with gcsfuse) and pass the mount's path."
        )
    return path


def check_writable(backup_dir: str) -> None:
    """Creates `backup_dir` if needed and writes and removes a probe file.

    Raises:
        BackupConfigError: naming the path, the OS error and the fix.
    """
    probe = os.path.join(backup_dir, f"{TMP_PREFIX}probe-{os.getpid()}")
    try:
        os.makedirs(backup_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
    except OSError as e:
        raise BackupConfigError(
            "Invalid value for argument `backup_dir`. "
            f"Received: backup_dir={backup_dir!r}, where no backup can be "
            f"written ({type(e).__name__}: {e.strerror or e}). Expected a "
            "directory this process can create and write files in: fix "
            "its permissions, or pass a path on a writable file system."
        ) from None


def _normalized(path: str) -> str:
    # Keras suffixes auto-generated names (`dense_3`, `sequential_1`) with a
    # counter that depends on how many models the process built before; the
    # structure is what identifies the model.
    return re.sub(r"_\d+(?=$|/|_)", "", path)


def check_compatible(
    backup_dir: str,
    meta: dict,
    values: list[np.ndarray],
    groups: list[tuple[str, list[tuple[str, tuple, Any]]]],
) -> None:
    """Raises `BackupMismatchError` unless the backup fits the variables.

    Args:
        backup_dir: str. For the message.
        meta: dict. The backup's metadata.
        values: list of arrays. The backup's values.
        groups: `[(kind, [(path, shape, dtype), ...]), ...]` in saved order,
            with `meta["num_<kind>"]` values each.
    """
    start = 0
    for kind, variables in groups:
        n = meta[f"num_{kind}"]
        saved_names = meta["names"][start:start + n]
        saved_values = values[start:start + n]
        start += n
        if len(variables) != n:
            raise BackupMismatchError(
                f"The backup in {backup_dir!r} was made by a "
                f"different model: it has {n} {kind} variables, this "
                f"model has {len(variables)}. Use a new `backup_dir` "
                "(or delete this one) for a different model."
            )
        for (path, shape, dtype), name, value in zip(
            variables, saved_names, saved_values, strict=True
        ):
            same_name = _normalized(path) == _normalized(name)
            if not same_name or tuple(shape) != value.shape or (
                np.dtype(dtype) != value.dtype
            ):
                raise BackupMismatchError(
                    f"The backup in {backup_dir!r} was made by a "
                    f"different model: its {kind} variable {name!r} has "
                    f"shape {value.shape} and dtype {value.dtype}, but "
                    f"this model's is {path!r} with shape "
                    f"{tuple(shape)} and dtype {dtype}. Use a new "
                    "`backup_dir` (or delete this one) for a different "
                    "model."
                )

"""kd.callbacks.BackupAndRestore: settings that can never work fail before
the first step with a clear message (issue 13, smaller defects)."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import fault_worker as fw
import numpy as np
import pytest

import kerasdist as kd
from kerasdist.errors import PermanentError

HERE = os.path.dirname(os.path.abspath(__file__))


def _fit(path, backup_dir):
    model = fw.build_model()
    log = path / "steps.jsonl"
    model.fit(fw.make_dataset(), epochs=1, verbose=0, callbacks=[
        fw.step_log_callback(str(log)),
        kd.callbacks.BackupAndRestore(backup_dir, save_freq=4)])


@pytest.mark.parametrize("backup_dir", ["gs://bucket/run1", "s3://b/r",
                                        "hdfs://nn/x"])
def test_url_is_refused(backup_dir):
    with pytest.raises(
        kd.callbacks.backup_and_restore.BackupConfigError,
        match=rf"Received: backup_dir='{backup_dir}'\. Expected a local or "
        r"mounted file system path: URLs .* are not supported.*gcsfuse",
    ) as info:
        kd.callbacks.BackupAndRestore(backup_dir)
    assert isinstance(info.value, PermanentError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("backup_dir", ["", "   ", "\t"])
def test_blank_dir_is_refused(backup_dir):
    with pytest.raises(ValueError, match=re.escape(
            "Invalid value for argument `backup_dir`. Received: "
            f"backup_dir={backup_dir!r}. Expected a non-empty directory")):
        kd.callbacks.BackupAndRestore(backup_dir)


def test_numpy_integers_are_accepted():
    cb = kd.callbacks.BackupAndRestore(
        "/tmp/x", save_freq=np.int64(7), keep=np.int32(3))
    assert (cb.save_freq, cb.keep) == (7, 3)
    assert type(cb.save_freq) is int and type(cb.keep) is int
    with pytest.raises(PermanentError, match=r"Received: keep=np.int64\(0\)"):
        kd.callbacks.BackupAndRestore("/tmp/x", keep=np.int64(0))


def test_mismatch_error_is_permanent():
    assert issubclass(kd.callbacks.BackupMismatchError, PermanentError)
    assert issubclass(kd.callbacks.BackupMismatchError, ValueError)


@pytest.mark.timeout(120)
def test_dir_under_a_file_fails_before_the_first_step(tmp_path):
    (tmp_path / "file").write_text("x")
    backup_dir = tmp_path / "file" / "backup"
    with pytest.raises(
        PermanentError,
        match=rf"backup_dir='{backup_dir}', where no backup can be written "
        r"\(NotADirectoryError: Not a directory\)\. Expected a directory "
        r"this process can create and write files in",
    ):
        _fit(tmp_path, backup_dir)
    assert not os.path.exists(tmp_path / "steps.jsonl")


@pytest.mark.real_component
@pytest.mark.timeout(120)
def test_read_only_dir_fails_before_the_first_step(tmp_path):
    # An existing directory nobody may write in, even root: immutable.
    backup_dir = tmp_path / "backup"
    backup_dir.mkdir()
    if not shutil.which("chattr") or subprocess.run(
        ["chattr", "+i", str(backup_dir)], capture_output=True
    ).returncode:
        pytest.skip("chattr +i is not available (needs ext4 and "
                    "CAP_LINUX_IMMUTABLE)")
    try:
        with pytest.raises(
            PermanentError,
            match=rf"backup_dir='{backup_dir}', where no backup can be "
            r"written \(PermissionError: Operation not permitted\)",
        ):
            _fit(tmp_path, backup_dir)
    finally:
        subprocess.run(["chattr", "-i", str(backup_dir)], check=True)
    assert not os.path.exists(tmp_path / "steps.jsonl")


@pytest.mark.real_component
@pytest.mark.timeout(180)
def test_missing_dir_on_read_only_file_system(tmp_path):
    # A read-only tmpfs in a private mount namespace: it disappears with
    # the process, even if the test fails.
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{HERE!r}]
        import pathlib
        import test_backup_config as t
        from kerasdist.errors import PermanentError
        try:
            t._fit(pathlib.Path({str(tmp_path)!r}), {str(mount_point)!r}
                   + "/run1")
        except PermanentError as e:
            print("ERROR:", e)
    """)
    command = ["unshare", "-m", "sh", "-c",
               f'mount -t tmpfs -o ro tmpfs "{mount_point}" && '
               f'exec "{sys.executable}" -c "$0"', script]
    if not shutil.which("unshare") or subprocess.run(
        ["unshare", "-m", "true"], capture_output=True
    ).returncode:
        pytest.skip("unshare -m is not available (needs CAP_SYS_ADMIN)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=150, env=env)
    assert (f"ERROR: Invalid value for argument `backup_dir`. Received: "
            f"backup_dir='{mount_point}/run1', where no backup can be "
            "written (OSError: Read-only file system)") in result.stdout, (
        result.stdout + result.stderr)
    assert not os.path.exists(tmp_path / "steps.jsonl")

"""The on-disk store of kd.callbacks.BackupAndRestore, alone (no model)."""

import os
import zipfile

import numpy as np
import pytest

from kerasdist.callbacks import _backup_store as store


def _write(directory, step, value=0.0):
    path = os.path.join(directory, store.ckpt_name(step))
    store.write_backup(path, {"format": store.FORMAT_VERSION, "names": ["a"],
                              "global_step": step},
                       [np.full((2,), value, "float32")])
    return path


def _names(directory):
    return sorted(n for n in os.listdir(directory))


def test_write_then_read_round_trip_leaves_no_temporary(tmp_path):
    path = _write(tmp_path, 7, 1.5)
    meta, values = store.read(path)
    assert meta["global_step"] == 7
    np.testing.assert_array_equal(values[0], [1.5, 1.5])
    assert _names(tmp_path) == ["ckpt-000000000007.npz"]


def test_read_refuses_a_torn_file(tmp_path):
    path = _write(tmp_path, 3)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(zipfile.BadZipFile):
        store.read(path)


def test_rotation_keeps_the_newest_and_drops_later_leftovers(tmp_path):
    # ckpt-35 and ckpt-30 are from an abandoned future (the run restarted
    # from an older backup): the new ckpt-5 must survive keep=2.
    for step in (30, 35):
        _write(tmp_path, step)
    _write(tmp_path, 0)
    newest = _write(tmp_path, 5)
    store.rotate(str(tmp_path), 2, newest)
    assert _names(tmp_path) == ["ckpt-000000000000.npz",
                                "ckpt-000000000005.npz"]
    store.rotate(str(tmp_path), 1, _write(tmp_path, 10))
    assert _names(tmp_path) == ["ckpt-000000000010.npz"]


def test_set_aside_hides_a_backup_from_listing(tmp_path):
    path = _write(tmp_path, 4)
    store.set_aside(path)
    assert store.list_backups(str(tmp_path)) == []
    assert _names(tmp_path) == ["corrupt-ckpt-000000000004.npz"]


def test_delete_all_removes_backups_and_empty_directory(tmp_path):
    directory = tmp_path / "backup"
    directory.mkdir()
    _write(directory, 1)
    store.set_aside(_write(directory, 2))
    store.delete_all(str(directory))
    assert not directory.exists()


def test_non_chief_save_keeps_nothing(tmp_path):
    store.save(str(tmp_path / "b"), 3, {"format": 1, "names": ["a"]},
               [np.zeros(1)], keep=2, keep_it=False)
    assert not (tmp_path / "b").exists()

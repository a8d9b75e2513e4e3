"""The Ray Train `BackupAndRestore` reports exactly the saves that happened
(its `on_backup_saved` hook), on a real local Ray cluster (the fixture of
tests/test_ray_train.py: a head and three 1-CPU nodes on 127.0.0.1)."""

import json
import os

import pytest

# First: it keeps Ray on 127.0.0.1 (an environment variable read when Ray
# is imported), and skips when Ray is not installed.
from test_ray_train import ray_cluster, scaling  # noqa: F401

pytestmark = [pytest.mark.real_component, pytest.mark.slow]


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.timeout(600)
def test_ray_reports_exactly_the_saves_on_update_boundaries(
    ray_cluster, tmp_path  # noqa: F811
):
    """save_freq=3 with 2 accumulation steps: saves fall due at steps 3, 6,
    9, ... and happen at the next optimizer update (4, 6, 10, ...). Ray
    gets one checkpoint per save, at its step, holding that save's file
    (reporting from optimizer.iterations would report steps 3 and 9
    before any backup of them existed)."""
    from backup_hook_ray_worker import accumulating_job
    from ray import train

    from kerasdist.integrations.ray import KerasTrainer

    out = tmp_path / "out"
    out.mkdir()
    result = KerasTrainer(
        accumulating_job,
        train_loop_config={"out": str(out), "save_freq": 3},
        scaling_config=scaling(2),
        run_config=train.RunConfig(storage_path=str(tmp_path / "results"),
                                   name="hook"),
    ).fit()
    assert result.error is None
    saves = _read(out / "saves-0.jsonl")
    steps = [s["global_step"] for s in saves]
    assert steps == [4, 6, 10, 12, 16, 18, 22, 24, 24]
    assert [s["global_step"] for s in _read(out / "saves-1.jsonl")] == steps
    reported = result.best_checkpoints
    assert [m["global_step"] for _, m in reported] == steps
    for (checkpoint, _), save in zip(reported, saves, strict=True):
        with checkpoint.as_directory() as d:
            assert save["file"] in os.listdir(d), (save, os.listdir(d))

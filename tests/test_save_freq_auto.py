"""kd.callbacks.BackupAndRestore: the post-save hook, save_freq="auto"
(Young/Daly from the measured save cost and failure rate) and the goodput
facts a worker writes into the launcher's heartbeat file.

Real `fit` runs in this process; an interruption is an exception raised
from a callback (what a crash looks like to `fit`), the resumed run a new
model and `fit`, as after a restart. A slow save is a hook that sleeps:
its time is part of the save's cost, as a slow file system's would be.
"""

import json
import math
import os
import re
import time

import fault_worker as fw
import keras
import numpy as np
import pytest
from absl.testing import parameterized

import kerasdist as kd
from kerasdist.callbacks import _backup_interval as interval_lib
from kerasdist.callbacks import _backup_store as store


class Recorder(kd.callbacks.BackupAndRestore):
    """Records each committed save as the hook sees it (and may sleep, a
    slow save)."""

    def __init__(self, *args, sleep=0.0, stop_after=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sleep = sleep
        self.stop_after = stop_after
        self.saves = []

    def on_backup_saved(self, backup):
        super().on_backup_saved(backup)
        time.sleep(self.sleep)
        on_disk = None
        if backup.path is not None:
            on_disk = store.read(backup.path)[0]["global_step"]
        self.saves.append((backup, on_disk, self.auto_interval))
        if self.stop_after and len(self.saves) >= self.stop_after:
            self.model.stop_training = True


class Interrupt(keras.callbacks.Callback):
    """Sleeps after global step `pause_at` (so a heartbeat is written),
    raises `fw.Interrupted` after step `stop_at` or once `when()`."""

    def __init__(self, stop_at=None, pause_at=None, when=None):
        super().__init__()
        self.stop_at, self.pause_at, self.step = stop_at, pause_at, 0
        self.when = when

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == self.pause_at:
            time.sleep(1.2)
        if self.step == self.stop_at or (self.when and self.when()):
            raise fw.Interrupted()


def _fit(backup, *, epochs=1, num_examples=fw.NUM_EXAMPLES, accumulation=1,
         extra=()):
    model = fw.build_model(accumulation_steps=accumulation)
    model.fit(
        fw.make_dataset(num_examples=num_examples,
                        accumulation_steps=accumulation),
        epochs=epochs, verbose=0, callbacks=[*extra, backup])
    return model


# ---------------------------------------------------------------------------
# The post-save hook.


@pytest.mark.timeout(180)
def test_hook_fires_once_per_committed_save_on_update_boundaries(tmp_path):
    """save_freq=3 with 2 accumulation steps: a save falls due at steps 3,
    6, 9, ... and is taken at the next optimizer update (4, 6, 10, ...);
    the hook sees exactly those saves, each already on disk, then the
    final one."""
    seen = []
    backup = Recorder(str(tmp_path / "b"), save_freq=3, on_saved=seen.append)
    _fit(backup, accumulation=2)  # 24 steps of 8 examples
    saves = [b for b, _, _ in backup.saves]
    assert [b.global_step for b in saves] == [
        4, 6, 10, 12, 16, 18, 22, 24, 24]
    assert [b.finished for b in saves] == [False] * 8 + [True]
    assert [b.updates for b in saves] == [s.global_step // 2 for s in saves]
    # Each backup was committed when the hook ran, at the step it says.
    assert [d for _, d, _ in backup.saves] == [b.global_step for b in saves]
    assert [os.path.basename(b.path) for b in saves[:2]] == [
        "ckpt-000000000002.npz", "ckpt-000000000003.npz"]
    assert seen == saves  # the on_saved argument sees the same
    assert all("loss" in b.logs for b in saves)
    assert backup.goodput_facts["saves"] == 9


def test_on_saved_must_be_callable():
    with pytest.raises(ValueError, match=r"on_saved=3\. Expected a callable"):
        kd.callbacks.BackupAndRestore("/tmp/x", on_saved=3)


# ---------------------------------------------------------------------------
# save_freq="auto": arguments.


class MtbfArgumentTest(parameterized.TestCase):
    @parameterized.parameters("soon", -1, 0, "-3h", "3x", True, float("inf"),
                              ([3],))
    def test_rejects_mtbf(self, mtbf):
        with self.assertRaisesRegex(
            ValueError,
            r"Invalid value for argument `mtbf`\. Received: "
            rf"mtbf={re.escape(repr(mtbf))}\. Expected a positive mean "
            r"time between "
            r"failures",
        ):
            kd.callbacks.BackupAndRestore("/tmp/x", "auto", mtbf=mtbf)

    @parameterized.parameters(("3h", 10800.0), (90, 90.0), ("1.5m", 90.0),
                              ("2d", 172800.0), ("45s", 45.0), ("10", 10.0))
    def test_parses_mtbf(self, mtbf, seconds):
        cb = kd.callbacks.BackupAndRestore("/tmp/x", "auto", mtbf=mtbf)
        self.assertEqual((cb.save_freq, cb.mtbf), ("auto", seconds))

    def test_mtbf_without_auto_warns(self):
        with self.assertWarnsRegex(UserWarning, "used only with save_freq"):
            kd.callbacks.BackupAndRestore("/tmp/x", 5, mtbf="3h")


@pytest.mark.timeout(180)
def test_bad_env_mtbf_fails_before_the_first_step_keeping_backups(
    tmp_path, monkeypatch
):
    backup_dir = tmp_path / "b"
    _fit(kd.callbacks.BackupAndRestore(str(backup_dir), save_freq=5))
    before = sorted(os.listdir(backup_dir))
    monkeypatch.setenv("KERASDIST_MTBF", "soon")
    steps = Interrupt(stop_at=10**9)
    with pytest.raises(ValueError, match=(
        r"Invalid value for KERASDIST_MTBF\. Received: "
        r"KERASDIST_MTBF='soon'")):
        _fit(kd.callbacks.BackupAndRestore(str(backup_dir), "auto"),
             extra=[steps])
    assert steps.step == 0
    assert sorted(os.listdir(backup_dir)) == before


# ---------------------------------------------------------------------------
# save_freq="auto": the interval.


def _young_daly_gap(c, m):
    """Daly's interval is shorter than Young's by at most this fraction."""
    r = c / (2 * m)
    return 2 / 3 * math.sqrt(r) + r / 9 + 1e-9


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sleep", [0.02, 0.3])
def test_auto_interval_follows_sqrt_2cm_of_the_measured_save_cost(
    tmp_path, sleep
):
    """A slower save (the hook sleeps) gets a longer interval: each choice
    is Daly's interval for the save cost C measured over the workers and
    M = mtbf + elapsed (no failure yet), within Daly's documented gap to
    Young's sqrt(2CM); the next save comes that many steps later."""
    backup = Recorder(str(tmp_path / "b"), "auto", mtbf="2s", sleep=sleep,
                      stop_after=5)
    _fit(backup, epochs=1000, num_examples=fw.GLOBAL_BATCH * 100)
    saves = backup.saves
    regular = [(b, chosen) for b, _, chosen in saves if not b.finished]
    assert regular[0][0].global_step == interval_lib.FIRST_SAVE_STEPS
    assert len(regular) == 5, [b.global_step for b, _ in regular]
    choices = [chosen for _, chosen in regular[1:]]
    for chosen in choices:
        c, m = chosen["save_seconds"], chosen["mtbf"]
        assert c >= sleep  # the measured cost includes the slow part
        assert m == pytest.approx(2.0 + chosen["elapsed"], rel=1e-9)
        young = math.sqrt(2 * c * m)
        assert chosen["interval_seconds"] == pytest.approx(
            interval_lib.daly_interval(c, m), rel=1e-9)
        assert abs(chosen["interval_seconds"] / young - 1) <= (
            _young_daly_gap(c, m)), chosen
        assert chosen["interval_steps"] == max(round(
            chosen["interval_seconds"] / chosen["step_seconds"]), 1)
    # The interval chosen at a save is the distance to the next one.
    for (before, _), (after, chosen) in zip(regular, regular[1:], strict=False):
        assert after.global_step - before.global_step == (
            chosen["interval_steps"]), (before, after, chosen)
    print(f"\nsleep {sleep}s: " + ", ".join(
        f"C={ch['save_seconds']:.3f}s M={ch['mtbf']:.2f}s -> "
        f"{ch['interval_seconds']:.3f}s = {ch['interval_steps']} steps"
        for ch in choices))


@pytest.mark.timeout(300)
def test_auto_counts_failures_across_restarts(tmp_path, monkeypatch):
    """After a failure (restart 1) M = (T + mtbf) / 2, from the run's
    start recorded in the backup; the first interval of the restarted
    attempt comes from the backup's estimates, the same on every worker."""
    backup_dir = str(tmp_path / "b")
    monkeypatch.setenv("KERASDIST_RESTART_COUNT", "0")
    first = Recorder(backup_dir, "auto", mtbf="10s", sleep=0.05)
    with pytest.raises(fw.Interrupted):
        _fit(first, epochs=1000, num_examples=fw.GLOBAL_BATCH * 100,
             extra=[Interrupt(when=lambda: len(first.saves) >= 2)])
    saved = store.read(first.saves[-1][0].path)[0]  # the one restored
    monkeypatch.setenv("KERASDIST_RESTART_COUNT", "1")
    second = Recorder(backup_dir, "auto", mtbf="10s", sleep=0.05,
                      stop_after=2)
    _fit(second, epochs=1000, num_examples=fw.GLOBAL_BATCH * 100)
    chosen = second.saves[0][2]  # chosen at the restore
    assert chosen is not None
    clock = second._run.clock  # noqa: SLF001
    assert (clock.attempt, clock.failures, clock.preemptions) == (1, 1, 0)
    assert chosen["mtbf"] == pytest.approx(
        (saved["auto"]["elapsed"] + 10) / 2, rel=1e-9)
    assert chosen["save_seconds"] == saved["auto"]["save_seconds"]
    last = second.saves[-1][2]  # chosen at the next save
    assert last["mtbf"] == pytest.approx((last["elapsed"] + 10) / 2)
    assert last["elapsed"] > saved["auto"]["elapsed"]


def test_run_clock_counts_preemptions_apart_from_failures():
    t0 = 1000.0
    saved = {"run": {"started": t0, "attempt": 2, "failures": 1,
                     "preemptions": 1}, "preempted": True}
    clock = interval_lib.RunClock.resumed(saved, 5)
    # Restart 3 followed the preemption save; 4 and 5 were failures.
    assert (clock.started, clock.failures, clock.preemptions) == (t0, 3, 2)
    clock = interval_lib.RunClock.resumed(dict(saved, preempted=False), 3)
    assert (clock.failures, clock.preemptions) == (2, 1)
    # A new launcher (restart count back to 0) keeps the counts.
    clock = interval_lib.RunClock.resumed(saved, 0)
    assert (clock.failures, clock.preemptions) == (1, 1)
    assert interval_lib.RunClock.resumed(None, 2).failures == 2


def test_mtbf_estimate_and_daly_limits():
    est = interval_lib.estimate_mtbf
    assert est(100.0, 0, 50.0) == 150.0
    assert est(100.0, 3, 50.0) == 37.5
    assert est(100.0, 4, None) == 25.0
    assert est(100.0, 0, None) == interval_lib.NO_FAILURE_MTBF
    daly = interval_lib.daly_interval
    assert daly(1.0, 1e6) == pytest.approx(math.sqrt(2e6), rel=1e-3)
    assert daly(10.0, 4.0) == 4.0  # C >= 2M: save every M


# ---------------------------------------------------------------------------
# Goodput facts.


@pytest.mark.timeout(300)
def test_facts_in_the_heartbeat_file_count_retrained_steps(
    tmp_path, monkeypatch
):
    """A run interrupted after step 11, last saved at 8, its progress last
    written at step 10 (a heartbeat): the resumed attempt reports 2 steps
    retrained (9 and 10; step 11 fell between heartbeats), in its
    `goodput_facts` and in the heartbeat file the launcher reads."""
    beat = tmp_path / "worker-0.heartbeat"
    monkeypatch.setenv("KERASDIST_HEARTBEAT_FILE", str(beat))
    monkeypatch.setenv("KERASDIST_RESTART_COUNT", "0")
    backup_dir = str(tmp_path / "b")
    with pytest.raises(fw.Interrupted):
        _fit(kd.callbacks.BackupAndRestore(backup_dir, 4),
             extra=[Interrupt(stop_at=11, pause_at=10)])
    first = json.loads(beat.read_text())
    assert (first["attempt"], first["global_step"], first["saved_step"]) == (
        0, 10, 8)
    monkeypatch.setenv("KERASDIST_RESTART_COUNT", "1")
    backup = kd.callbacks.BackupAndRestore(backup_dir, 4)
    _fit(backup, epochs=2)
    facts = json.loads(beat.read_text())
    assert facts == backup.goodput_facts
    assert facts["attempt"] == 1 and facts["finished"]
    assert (facts["restored_step"], facts["retrained_steps"]) == (8, 2)
    assert facts["global_step"] == 24 and facts["steps"] == 16
    assert facts["saves"] == 5  # steps 12, 16, 20, 24 and the final one
    assert 0 < facts["retrained_seconds"] < facts["step_seconds"]
    assert facts["save_seconds"] > 0
    assert facts["train_begin"] <= facts["first_step"] <= facts["updated"]
    assert np.isfinite(list(v for v in facts.values()
                            if isinstance(v, float))).all()


def test_the_estimates_all_reduce_is_traced_once():
    # save_freq="auto" all-reduces its estimates at every save: one traced
    # function per strategy and dtype, not a new trace (and collective set
    # up) per save.
    from kerasdist.callbacks import _backup_restore as restore_lib

    strategy = kd.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    for values in ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.5, 0.25, 0.0]):
        sums = restore_lib._all_reduce_sum(  # noqa: SLF001
            model, values, "float64")
        np.testing.assert_allclose(sums, [2 * v for v in values])
    total = restore_lib._SUMS[strategy]["float64"]  # noqa: SLF001
    assert total.experimental_get_tracing_count() == 1

"""Goodput in every `kerasdist-run` summary, its event, and the callback's
own report without a launcher (SLURM, Ray Train).

The real runs use a small Keras job whose steps take at least 0.2 s (a
sleeping callback inside the step), so the chief's progress file, written
about once a second, always knows steps past the last backup: a SIGKILL
then leaves steps to retrain, whatever the machine's load.
"""

import io
import json
import re
import sys
import textwrap

import pytest

import kerasdist as kd
from kerasdist.launch import goodput, protocol

QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}

# argv: backup_dir, worker to SIGKILL in the first attempt (-1: none).
_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    import kerasdist as kd

    backup_dir, victim = sys.argv[1], int(sys.argv[2])
    strategy = kd.get_strategy()
    task = kd.cluster.from_env()
    doomed = kd.launch.restart_count() == 0 and task.worker_rank == victim

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.2)  # Inside the step's time, before the backup's.
            # 7 steps (>= 1.4 s) after the backup at step 8: the progress
            # file knows some of them.
            if doomed and batch == 15:
                os.kill(os.getpid(), signal.SIGKILL)

    rng = np.random.RandomState(0)
    x = rng.normal(size=(16 * 24, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    model.fit(data, epochs=1, verbose=0, callbacks=[
        Slow(), kd.callbacks.BackupAndRestore(backup_dir, save_freq=8)])
""")

_LINE = re.compile(
    r"\[launcher\] goodput (?P<pct>[\d.]+)% \((?P<counted>[\d.]+)s of steps "
    r"that count in (?P<wall>[\d.]+)s wall\); badput: (?P<parts>.*)"
)
_PART = re.compile(r"(?P<name>[a-z -]+?) (?:(?P<s>-?[\d.]+)s|not measured)")


def _run(tmp_path, num_workers, victim):
    out = io.StringIO()
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    result = kd.launch.run(
        [sys.executable, str(script), str(tmp_path / "backup"), str(victim)],
        num_workers=num_workers, max_restarts=1, log_dir=tmp_path / "logs",
        env=QUIET, stream=out,
    )
    text = out.getvalue()
    assert result.ok, text
    return result, text, kd.launch.read_events(tmp_path / "logs")


def _summary_parts(text):
    """The summary's goodput line: (wall, counted, {part: seconds})."""
    found = _LINE.search(text)
    assert found, f"no goodput line in the summary:\n{text}"
    print(f"\n{found[0]}")
    parts = {}
    for p in found["parts"].split(", "):
        m = _PART.fullmatch(p)
        assert m, f"cannot read badput part {p!r} in {found[0]!r}"
        parts[m["name"]] = None if m["s"] is None else float(m["s"])
    return float(found["wall"]), float(found["counted"]), parts


def _check_sums(result, text, events):
    wall, counted, parts = _summary_parts(text)
    assert parts["input stalls"] is None  # Said to be not measured.
    total = counted + sum(v for v in parts.values() if v is not None)
    assert abs(total - wall) <= 0.02 * wall, (total, wall, text)
    assert abs(wall - result.wall_time) <= 0.02 * result.wall_time
    # Nothing counted twice: the rest is not (much) below zero.
    assert parts["other"] >= -0.02 * wall, text
    report = next(e for e in events if e["event"] == "goodput")
    names = [p for p in goodput.PARTS if report[p] is not None]
    total = report["counted"] + sum(report[p] for p in names)
    assert abs(total - report["wall_time"]) <= 0.02 * report["wall_time"]
    assert report["goodput"] == pytest.approx(
        report["counted"] / report["wall_time"])
    assert [e["event"] for e in events][-2:] == ["goodput", "run_ended"]
    assert result.goodput.counted == pytest.approx(report["counted"])
    return parts, report


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sigkilled_worker_shows_retrained_steps_and_the_sum_holds(
        tmp_path):
    result, text, events = _run(tmp_path, num_workers=2, victim=1)
    assert result.restarts == 1, text
    parts, report = _check_sums(result, text, events)
    assert parts["steps retrained"] > 0 and report["retrained"] > 0, text
    assert report["restart"] > 0 and report["startup"] > 0, text
    # 24 steps of at least 0.2 s, each counted once.
    assert report["counted"] >= 24 * 0.2, report


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_clean_run_retrains_nothing(tmp_path):
    result, text, events = _run(tmp_path, num_workers=1, victim=-1)
    parts, report = _check_sums(result, text, events)
    assert parts["steps retrained"] == 0 and report["retrained"] == 0, text
    assert report["restart"] == 0 and report["detection"] == 0, report
    assert report["saves"] > 0, report  # At steps 8, 16, 24 and at the end.
    assert report["after_training"] > 0, report  # The process's exit.


def test_heartbeat_has_one_format(tmp_path, monkeypatch):
    beat = tmp_path / "worker-0.heartbeat"
    beat.write_text("")
    monkeypatch.setenv(protocol.ENV_HEARTBEAT_FILE, str(beat))
    protocol.report_training_finished()
    assert json.loads(beat.read_text()) == {"finished": True}
    assert protocol.heartbeat_says_finished(beat.read_text())
    assert not protocol.heartbeat_says_finished("finished\n")
    assert not protocol.heartbeat_says_finished('{"finished": false}')
    assert protocol.read_heartbeat("") is None


def test_from_facts_splits_a_run_without_a_launcher():
    """Two attempts of the chief (a SLURM requeue): the gap between them
    and the second start-up are restart; the parts sum to the wall."""
    first = {"train_begin": 100.0, "first_step": 110.0,
             "first_step_seconds": 2.0, "step_seconds": 20.0,
             "retrained_seconds": 0.0, "save_seconds": 1.0,
             "updated": 135.0}
    second = {"train_begin": 150.0, "first_step": 158.0,
              "first_step_seconds": 1.0, "step_seconds": 30.0,
              "retrained_seconds": 4.0, "save_seconds": 2.0,
              "updated": 195.0}
    report = goodput.from_facts([first, second], now=200.0)
    assert report.wall_time == 100.0
    assert report.startup == 8.0  # 100 -> the first step began at 108.
    assert report.restart == 15.0 + 7.0  # 135 -> 150, then -> 157.
    assert (report.counted, report.retrained, report.saves) == (
        46.0, 4.0, 3.0)
    assert report.after_training == 0.0  # Logged when fit ends.
    assert report.counted + report.startup + report.restart + (
        report.retrained + report.saves + report.other) == 100.0
    assert "goodput 46.0%" in report.line()


def test_timeline_splits_a_hang_and_a_restart():
    """The launcher's side without processes: a hung first attempt (5 s of
    silence before the launcher acted), a restart after waiting 0.5 s for
    hosts, and a finished second attempt."""
    first = {"first_step": 6.0, "first_step_seconds": 1.0,
             "step_seconds": 9.0, "retrained_seconds": 0.0,
             "save_seconds": 1.0, "updated": 16.0}
    second = {"first_step": 30.0, "first_step_seconds": 1.0,
              "step_seconds": 8.0, "retrained_seconds": 2.0,
              "save_seconds": 1.0, "updated": 39.0, "finished": True}
    timeline = goodput.Timeline(began=0.0)
    attempt = goodput._Attempt  # noqa: SLF001 (times chosen by the test)
    timeline.attempts = [
        attempt(1.0, ended=21.0, stopped=23.0, detection=5.0,
                         facts=first),
        attempt(24.0, waited=0.5, ended=40.0, stopped=40.5,
                         facts=second),
    ]
    report = timeline.account(wall_time=41.0)
    assert report.as_dict() == {
        "wall_time": 41.0, "counted": 15.0, "startup": 5.0,
        "detection": 5.0, "restart": 2.0 + 0.5 + 5.0, "retrained": 2.0,
        "waiting_for_hosts": 0.5, "saves": 2.0, "input_stalls": None,
        # fit's end until the exit, and stopping the last group.
        "after_training": 1.0 + 0.5,
        # After the last step until the hang began; between the last
        # step and fit's end; after the last group stopped.
        "other": 1.0 + 1.0 + 0.5, "goodput": 15.0 / 41.0,
    }


def test_a_hang_after_training_is_detection_only():
    """Seen in a 16-worker run: the backup said training had finished, so
    `fit` returned at once without a step, then a worker hung (stopped)
    and the launcher waited out its 180 s `--timeout`. Those 180 s are
    detection, not also time after training, and nothing is counted twice
    (`other` was -360 s)."""
    finished = {"updated": 30.0, "finished": True, "step_seconds": 0.0,
                "retrained_seconds": 0.0, "save_seconds": 0.0}
    timeline = goodput.Timeline(began=0.0)
    timeline.attempts = [goodput._Attempt(  # noqa: SLF001
        10.0, ended=220.0, stopped=221.0, detection=180.0, facts=finished)]
    report = timeline.account(wall_time=222.0)
    parts = report.as_dict()
    assert parts["detection"] == 180.0
    assert parts["startup"] == 10.0 + 20.0  # until fit returned
    # From fit's end to the hang (10 s), and stopping the group (1 s).
    assert parts["after_training"] == 10.0 + 1.0
    assert parts["other"] == 1.0  # after the group stopped
    total = sum(v for k, v in parts.items()
                if k not in ("wall_time", "goodput") and v is not None)
    assert total == 222.0

"""benchmarks/goodput_sim.py's model on timelines worked out by hand (no
processes: the model is plain Python)."""

import math

import pytest

from benchmarks import goodput_sim as sim


def _job(**kw):
    base = dict(workers=1, worker_mtbf=math.inf, step_seconds=1.0,
                total_steps=100, save_seconds=2.0, save_freq=25,
                startup_a=10.0, restart_a=5.0, detection=1.0,
                failure_times=())
    return sim.Job(**{**base, **kw})


def test_no_failure():
    # start-up 10 + 100 steps + saves after 25, 50, 75, 100 (2 s each).
    run = sim.simulate(_job())
    assert run["wall"] == pytest.approx(118.0)
    assert run["goodput"] == pytest.approx(100 / 118)
    assert run["parts"]["saves"] == pytest.approx(8.0)


def test_one_failure_replayed():
    """Fails at t=50: 13 steps after the save at 25 are lost; detection 1,
    restart 5, start-up 10, then steps 25..100 with saves at 50, 75, 100."""
    run = sim.simulate(_job(failure_times=(50.0,)))
    assert run["wall"] == pytest.approx(147.0)
    parts = run["parts"]
    assert {k: round(v, 6) for k, v in parts.items() if v} == {
        "counted": 100.0, "startup": 20.0, "restart": 5.0,
        "detection": 1.0, "retrained": 13.0, "saves": 8.0}
    assert sum(parts.values()) == pytest.approx(run["wall"])


def test_a_failure_while_leaving_restarts_the_group():
    # The job ends at 118 + 5 s of exit; a failure at 120 costs detection,
    # restart and start-up (the attempt that restores the last backup
    # leaves at once here): no steps.
    run = sim.simulate(_job(finish_seconds=5.0, failure_times=(120.0,)))
    assert run["wall"] == pytest.approx(120 + 1 + 5 + 10)
    assert run["parts"]["retrained"] == 0


def test_an_attempt_that_restored_the_last_backup_ends_at_its_own_pace():
    # The training attempt ends 30 s after its last backup (118 + 30); a
    # failure at 140 restarts the group, which restores the last backup
    # (nothing to train) and leaves 2 s after its start-up.
    run = sim.simulate(_job(finish_seconds=30.0, restored_finish_seconds=2.0,
                            failure_times=(140.0,)))
    assert run["wall"] == pytest.approx(140 + 1 + 5 + 10 + 2)
    assert run["parts"]["retrained"] == 0


def _real_run(kills, facts, wall=100.0):
    return {"start": 0.0, "wall": wall, "kills": list(kills),
            "facts": dict(enumerate(facts))}


def test_the_end_of_a_real_attempt_is_measured_to_the_exit_or_the_kill():
    trained = {"updated": 60.0, "steps": 500, "finished": True}
    restored = {"updated": 90.0, "steps": 0, "finished": True}
    # Nobody killed it: from the last backup to the end of the run.
    times = sim._finish_times(_real_run([], [trained]), [trained])  # noqa: SLF001
    assert times == {"finish": 40.0, "finish_until": None,
                     "restored_finish": 1.0}
    # A kill at 75 found its workers still there: at least 15 s, taken
    # as 15 s + CENSORED_MARGIN; the attempt that restored the last
    # backup then left 10 s after its facts.
    times = sim._finish_times(  # noqa: SLF001
        _real_run([75.0], [trained, restored]), [trained, restored])
    assert times["finish"] == pytest.approx(15.0 + sim.CENSORED_MARGIN)
    assert times["finish_until"] == pytest.approx(75.0 + sim.CENSORED_MARGIN)
    assert times["restored_finish"] == pytest.approx(10.0)


def test_a_replayed_end_cut_by_a_kill_lasts_until_that_kill():
    # The real end lasted at least 5 s, until a kill at 130: the replay's
    # attempt (done at 118) stays until 131 and meets that kill at 130,
    # however early its steps ended; a Poisson run uses the 5 s.
    job = _job(finish_seconds=5.0, finish_until=131.0,
               failure_times=(130.0,))
    run = sim.simulate(job)
    assert run["wall"] == pytest.approx(130 + 1 + 5 + 10)
    # The end (118 -> 130) is badput outside the named causes.
    assert run["parts"]["other"] == pytest.approx(12.0)


def test_auto_interval_uses_the_callbacks_estimator():
    # mtbf prior 200 s, C = 2 s: Daly's interval for M = T + 200.
    run = sim._Run(_job(save_freq="auto", mtbf_prior=200.0),  # noqa: SLF001
                   sim.random.Random(0))
    run.t = 50.0
    want = sim.interval_lib.daly_interval(2.0, 250.0)
    assert run.next_interval() == round(want)


def test_elastic_beats_waiting_for_a_slow_replacement():
    common = dict(workers=16, workers_per_host=8, host_loss=1.0,
                  replacement=200.0, failure_times=(40.0,), total_steps=400)
    wait = sim.simulate(_job(**common))
    elastic = sim.simulate(_job(elastic=True, **common))
    assert wait["parts"]["waiting"] == pytest.approx(200.0)
    assert elastic["parts"]["waiting"] == 0
    assert elastic["parts"]["shrunk"] > 0  # 8 of 16 workers: 2x slower
    assert elastic["goodput"] > wait["goodput"]
    for run in (wait, elastic):
        assert sum(run["parts"].values()) == pytest.approx(run["wall"])

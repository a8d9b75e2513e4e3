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
    # restart, start-up, and the exit again: no steps.
    run = sim.simulate(_job(finish_seconds=5.0, failure_times=(120.0,)))
    assert run["wall"] == pytest.approx(120 + 1 + 5 + 10 + 5)
    assert run["parts"]["retrained"] == 0


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

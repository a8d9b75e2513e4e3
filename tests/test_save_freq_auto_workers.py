"""save_freq="auto" with real worker processes under kerasdist-run: every
worker measures its own save and step times, but all must save at the
same steps (a save is a collective), so the interval is agreed at each
save. Each worker's goodput facts come from its heartbeat file."""

import json
import os

import pytest

from benchmarks import goodput_sim

pytestmark = [pytest.mark.real_component, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_workers_agree_on_the_auto_interval(tmp_path):
    run = goodput_sim.real_run(str(tmp_path), workers=2, steps=300,
                               save_freq="auto", job_mtbf=None,
                               mtbf_prior="3s")
    facts = []
    for rank in range(2):
        with open(tmp_path / "logs" / f"worker-{rank}.heartbeat") as f:
            facts.append(json.loads(f.read()))
    assert [f["rank"] for f in facts] == [0, 1]
    for f in facts:
        assert f["finished"] and f["steps"] == f["global_step"] == 300, f
    # The same saves on both workers (the interval was agreed), several.
    assert facts[0]["saves"] == facts[1]["saves"] >= 3, facts
    assert facts[0]["saved_step"] == facts[1]["saved_step"] == 300
    assert run["facts"][0]["saves"] == facts[0]["saves"]
    backups = os.listdir(tmp_path / "backup")
    assert "ckpt-000000000300.npz" in backups, backups

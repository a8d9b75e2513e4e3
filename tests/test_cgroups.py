"""kerasdist.testing.cgroups: memory limits and CPU quotas for test workers."""

import os
import subprocess
import sys

import pytest

from kerasdist.testing import cgroups

pytestmark = pytest.mark.real_component

# Allocates 64 MiB at a time, touching every page, and says how far it got.
_GREEDY = (
    "import sys\n"
    "chunks = []\n"
    "for i in range(64):\n"
    "    chunks.append(bytearray(64 << 20))\n"
    "    print((i + 1) * 64, flush=True)\n"
)


@pytest.fixture
def root():
    reason = cgroups.cgroups_unavailable()
    if reason:
        pytest.skip(reason)


def _exists(group: cgroups.Cgroup) -> list[bool]:
    return [os.path.isdir(group.path(c)) for c in group.controllers]


def test_a_process_past_the_memory_limit_is_killed_and_counted(root):
    with cgroups.cgroup(memory_bytes=256 << 20) as g:
        done = subprocess.run(g.wrap([sys.executable, "-c", _GREEDY]),
                              capture_output=True, text=True, timeout=120)
        reached = [int(x) for x in done.stdout.split()]
        assert done.returncode == -9, (done.returncode, done.stderr[-2000:])
        assert reached and reached[-1] < 256, reached
        assert g.oom_kills() == 1
        peak = g.peak_memory_bytes()
        assert 128 << 20 < peak <= 256 << 20, peak
    assert _exists(g) == [False]


def test_under_the_limit_the_process_finishes(root):
    with cgroups.cgroup(memory_bytes=1 << 30) as g:
        done = subprocess.run(
            g.wrap([sys.executable, "-c", "x = bytearray(64 << 20)"]),
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert g.oom_kills() == 0
        assert g.peak_memory_bytes() >= 64 << 20


def _burn_cpu(group: cgroups.Cgroup, seconds: float) -> None:
    """Runs a process inside `group` until it has used `seconds` of CPU."""
    busy = subprocess.Popen(group.wrap([
        sys.executable, "-c",
        "import time\nt = time.process_time()\n"
        f"while time.process_time() - t < {seconds}: pass\n"]))
    assert busy.wait(timeout=120) == 0


def _cpu_stat(group: cgroups.Cgroup) -> dict[str, str]:
    with open(group.path("cpu", "cpu.stat")) as f:
        return dict(line.split() for line in f)


def test_a_cpu_quota_throttles_a_busy_process(root):
    with cgroups.cgroup(cpu_fraction=0.1) as g:
        _burn_cpu(g, 0.3)
        stat = _cpu_stat(g)
        # 0.3 s of CPU at 0.1 core cannot run without being throttled.
        assert int(stat["nr_throttled"]) > 0, stat
        assert int(stat["throttled_time"]) > 0, stat


def test_a_short_period_paces_the_quota_in_smaller_grants(root):
    with cgroups.cgroup(cpu_fraction=0.1, cpu_period_us=10_000) as g:
        _burn_cpu(g, 0.3)
        with open(g.path("cpu", "cpu.cfs_period_us")) as f:
            assert int(f.read()) == 10_000
        with open(g.path("cpu", "cpu.cfs_quota_us")) as f:
            assert int(f.read()) == 1_000
        stat = _cpu_stat(g)
        # 0.3 s of CPU in 1 ms grants: more than a hundred throttled
        # periods, each a stall of at most 9 ms (100 ms periods: ~3).
        assert int(stat["nr_throttled"]) > 100, stat


def test_processes_left_inside_are_killed_and_the_group_removed(root):
    with pytest.raises(KeyError):
        with cgroups.cgroup(memory_bytes=1 << 30, cpu_fraction=1.0) as g:
            sleeper = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(600)"])
            g.add(sleeper.pid)
            assert g.pids() == [sleeper.pid]
            raise KeyError("an exception in the block")
    assert sleeper.wait(timeout=30) == -9
    assert _exists(g) == [False, False]


@pytest.mark.parametrize("kwargs", [
    {}, {"memory_bytes": 0}, {"cpu_fraction": -1.0}, {"memory_bytes": True},
    {"cpu_fraction": 0.5, "cpu_period_us": 500},
    {"cpu_fraction": 0.5, "cpu_period_us": 10_000.0},
    {"memory_bytes": 1 << 30, "cpu_period_us": 10_000},
    {"cpu_fraction": 0.05, "cpu_period_us": 10_000}])
def test_bad_limits_are_named(kwargs):
    with pytest.raises(ValueError, match="Received: |at least one limit"):
        with cgroups.cgroup(**kwargs):
            pass

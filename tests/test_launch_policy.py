"""The launcher's policies and membership, without processes: seconds to run.

`policy` decides (restart budgets, permanent errors, preemptions,
interruption, elastic shrink and grow); `membership` knows which hosts
answer (probes, "answered twice", the `--host_wait` clock). Both are driven
here with fake starters and a fake clock, so every rule of the options
table and of the elastic section of docs/guide/fault_tolerance.md is
checked in milliseconds; the multi-process tests then prove the loop
applies the decisions to real workers.
"""

import dataclasses
import io
import os
import signal
import threading

import pytest

import kerasdist as kd
from kerasdist.launch import events, membership, policy
from kerasdist.launch.hosts import Host, Starter
from kerasdist.launch.results import Failure, WorkerState

HERE = os.path.dirname(os.path.abspath(__file__))
A, B, C = Host("127.0.0.2", 1), Host("127.0.0.3", 1), Host("127.0.0.4", 2)


def _failure(state=WorkerState.FAILED, code=-9, worker=1, attempt=1):
    return Failure(attempt, worker, state, "died (SIGKILL)", code, 0.0,
                   "127.0.0.3")


class FakeStarter(Starter):
    """Answers probes from a set of hosts that are up; starts nothing."""

    name = "fake"
    probe_timeout = 0.0

    def __init__(self, up):
        self.up = set(up)
        self.probes = []
        self.gate = None  # A threading.Event a probe waits on, if set.

    def reachable(self, host, timeout):
        self.probes.append(host)
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        return None if host in self.up else "no answer within 0s"

    def start(self, host, command, env, **process):
        raise AssertionError("policy tests start no process")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _members(up, hosts=(A, B, C), host_wait=30.0):
    starter, clock = FakeStarter(up), FakeClock()
    members = membership.Membership(
        list(hosts), lambda h: starter, host_wait=host_wait, clock=clock
    )
    return members, starter, clock


# -- restart policy: --max_restarts, --max_preemptions, exit 78 ----------


def test_failures_spend_max_restarts_then_give_up_with_the_exit_status():
    budget = policy.Budget(max_restarts=2, max_preemptions=100)
    for used in (1, 2):
        decision, budget = policy.after_attempt(_failure(), budget)
        assert decision == policy.Restart(_failure(), "restart", used, 2)
    decision, after = policy.after_attempt(_failure(), budget)
    assert isinstance(decision, policy.GiveUp), decision
    assert decision.returncode == 128 + signal.SIGKILL
    assert "no restarts left (2 allowed); giving up" in decision.reason
    assert after == budget  # Nothing spent on giving up.


def test_hang_gives_up_with_124():
    decision, _ = policy.after_attempt(
        _failure(WorkerState.HUNG, None), policy.Budget(0, 0)
    )
    assert decision.returncode == 124, decision


def test_preemptions_have_their_own_budget():
    budget = policy.Budget(max_restarts=0, max_preemptions=1)
    preempted = _failure(WorkerState.PREEMPTED, 75)
    decision, budget = policy.after_attempt(preempted, budget)
    assert decision == policy.Restart(preempted, "preemption", 1, 1)
    assert (budget.restarts, budget.preemptions) == (0, 1)
    decision, _ = policy.after_attempt(preempted, budget)
    assert isinstance(decision, policy.GiveUp)
    assert "no preemptions left (1 allowed)" in decision.reason
    assert decision.returncode == 75


def test_permanent_error_is_never_retried():
    decision, budget = policy.after_attempt(
        _failure(WorkerState.PERMANENT, 78), policy.Budget(3, 100)
    )
    assert isinstance(decision, policy.GiveUp)
    assert decision.returncode == 78
    assert "not retried (a restart cannot fix it)" in decision.reason
    assert budget == policy.Budget(3, 100)


@pytest.mark.parametrize("outcome, expected", [
    (policy.Succeeded(), policy.Finish()),
    (policy.Interrupted(signal.SIGTERM), policy.Stop(signal.SIGTERM)),
    (policy.HostsBack((B,)), policy.Grow((B,))),
])
def test_other_outcomes(outcome, expected):
    assert policy.after_attempt(outcome, policy.Budget(0, 0))[0] == expected


def test_stop_exits_128_plus_the_signal():
    assert policy.Stop(signal.SIGTERM).returncode == 143
    assert policy.Stop(signal.SIGINT).returncode == 130


# -- placement: --hosts, --min_workers, --host_wait -----------------------


def _place(down, *, min_workers=4, elastic=False, waited=0.0,
           host_wait=30.0, failure=None):
    return policy.placement(
        [A, B, C], {h: "no answer" for h in down}, min_workers=min_workers,
        elastic=elastic, waited=waited, host_wait=host_wait,
        failure=failure,
    )


def test_every_host_up_starts_on_all_in_order():
    assert _place([]) == policy.Start((A, B, C))


def test_unreachable_host_is_waited_for_until_host_wait():
    assert _place([B], waited=29.9) == policy.Wait((B,))


def test_fixed_group_gives_up_after_host_wait_with_the_failure_status():
    decision = _place([B], waited=30.0, failure=_failure())
    assert isinstance(decision, policy.GiveUp), decision
    assert decision.returncode == 137
    assert decision.reason == (
        "127.0.0.3 still unreachable after 30s; the hosts left have 3 "
        "worker slot(s), fewer than the 4 needed (not elastic: pass "
        "--min_workers to go on with fewer); giving up"
    )


def test_elastic_group_shrinks_to_the_hosts_left():
    decision = _place([B], min_workers=3, elastic=True, waited=30.0)
    assert decision == policy.Resize((A, C), (B,), 3)
    assert decision.size == 3


def test_host_wait_zero_shrinks_at_once():
    decision = _place([B], min_workers=2, elastic=True, waited=0.0,
                      host_wait=0.0)
    assert decision == policy.Resize((A, C), (B,), 2)


def test_too_few_workers_left_gives_up_even_when_elastic():
    decision = _place([C], min_workers=3, elastic=True, waited=31.0)
    assert isinstance(decision, policy.GiveUp), decision
    assert "have 2 worker slot(s), fewer than the 3 needed; giving up" in (
        decision.reason)
    assert decision.returncode == 1  # A grow found too few: no failure.


def test_at_start_the_wait_is_over():
    assert _place([A], min_workers=3, elastic=True, waited=None) == (
        policy.Resize((B, C), (A,), 3))


def test_no_grow_once_a_worker_finished():
    assert policy.may_grow([B], finished=False)
    assert not policy.may_grow([B], finished=True)
    assert not policy.may_grow([], finished=False)


def test_decisions_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.Start((A,)).hosts = ()


# -- membership: probes, "answered twice", the host_wait clock ------------


def test_probe_names_the_hosts_that_do_not_answer_in_order():
    members, _, _ = _members(up={A})
    assert members.probe([A, B, C]) == {
        B: "no answer within 0s", C: "no answer within 0s"}


def test_host_wait_counts_from_the_failure():
    members, _, clock = _members(up={A, B, C}, host_wait=30.0)
    assert members.deadline() == 130.0  # No failure: from now.
    members.failure_seen()
    clock.now = 110.0
    assert members.deadline() == 130.0
    assert members.unreachable() == {}
    assert members.deadline() == 140.0  # The failure's probe was used.


def test_probe_started_at_the_failure_is_used_once():
    members, starter, _ = _members(up={A, C})
    members.failure_seen()
    assert members.unreachable() == {B: "no answer within 0s"}
    assert starter.probes.count(B) == 1
    starter.up.add(B)
    assert members.unreachable() == {}  # A new probe.
    assert starter.probes.count(B) == 2


def _watch(members, missing):
    members.watch(missing)
    assert members.wait_idle(10), "the probe did not end within 10s"


def test_a_missing_host_must_answer_twice_in_a_row():
    members, starter, _ = _members(up={A})
    _watch(members, [B])
    assert members.returned() == ()
    starter.up.add(B)
    _watch(members, [B])
    assert members.returned() == ()  # Once: could be flapping.
    _watch(members, [B])
    assert members.returned() == (B,)


def test_a_flapping_host_does_not_grow_the_group():
    members, starter, _ = _members(up={A, B})
    _watch(members, [B])
    starter.up.discard(B)
    _watch(members, [B])
    starter.up.add(B)
    _watch(members, [B])
    assert members.returned() == ()


def test_a_probe_from_an_earlier_attempt_is_dropped():
    """The race of issue 19: a prober left from attempt N writes after
    attempt N+1 reset membership; its answer must not count."""
    members, starter, _ = _members(up={A, B})
    _watch(members, [B])
    starter.gate = threading.Event()
    members.watch([B])  # Blocked in `reachable` until the gate opens.
    members.new_attempt()
    starter.gate.set()
    assert members.wait_idle(10), "the probe did not end within 10s"
    assert members.returned() == ()
    starter.gate = None
    _watch(members, [B])
    assert members.returned() == ()  # Counting starts again.


# -- every option of the table is covered --------------------------------

# Where each `kerasdist-run` option's rule is tested: here for the
# decisions, in the named file for what needs real processes.
CLI_TEST = "test_host_and_env_are_reachable_from_the_command_line"
COVERED = {
    "num_workers": "test_spec_defaults_and_slots",
    "max_restarts":
        "test_failures_spend_max_restarts_then_give_up_with_the_exit_status",
    "max_preemptions": "test_preemptions_have_their_own_budget",
    "log_dir": "test_events_jsonl_is_one_object_per_line",
    "timeout": "test_launch.py::test_hung_worker_is_detected_by_timeout",
    "start_timeout": "test_launch.py::test_start_timeout_spares_a_slow_start",
    "grace_period": "test_end_stops_with_the_grace_each_outcome_asks",
    "restart_grace_period": "test_end_stops_with_the_grace_each_outcome_asks",
    "env": "test_launch.py::" + CLI_TEST,
    "host": "test_launch.py::" + CLI_TEST,
    "hosts": "test_every_host_up_starts_on_all_in_order",
    "hostfile": "test_launch_hosts.py::test_hostfile_line_is_named",
    "min_workers": "test_elastic_group_shrinks_to_the_hosts_left",
    "host_wait": "test_host_wait_counts_from_the_failure",
    "starter": "test_starter_is_injectable_and_chosen_by_address",
    "ssh_command": "test_ssh_starter.py::test_ssh_failure_is_told_apart",
}


def test_every_option_has_a_rule_test():
    names = {f.name for f in kd.launch.spec.option_fields()}
    assert names == set(COVERED), (
        "options without a listed test: "
        f"{sorted(names - set(COVERED))}; listed but gone: "
        f"{sorted(set(COVERED) - names)}"
    )
    for option, where in COVERED.items():
        path, _, name = where.rpartition("::")
        path = os.path.join(HERE, path or os.path.basename(__file__))
        with open(path) as text:
            assert f"def {name}(" in text.read(), (
                f"--{option}: {where} is not a test")


class _FakeGroup:
    def __init__(self):
        self.graces = []

    def stop(self, grace):
        self.graces.append(grace)


@pytest.mark.parametrize("outcome, grace", [
    (_failure(), 0.5),  # --restart_grace_period: peers cannot save.
    (policy.Interrupted(signal.SIGTERM), 7.0),  # --grace_period: they save.
    (policy.HostsBack((B,)), 7.0),  # A grow: they save too.
    (policy.Succeeded(), 0.0),  # All exited: reap.
])
def test_end_stops_with_the_grace_each_outcome_asks(outcome, grace):
    from kerasdist.launch import agent

    spec = kd.launch.WorkerSpec(["true"], grace_period=7,
                                restart_grace_period=0.5)
    made = agent.Agent(spec, io.StringIO())
    group = _FakeGroup()
    made.stop_group(group, outcome)
    assert group.graces == [grace]


def test_spec_defaults_and_slots():
    spec = kd.launch.WorkerSpec(["true"], hosts="127.0.0.2:2,127.0.0.3",
                                num_workers=3)
    assert [(h.address, h.slots) for h in spec.host_list()] == [
        ("127.0.0.2", 2), ("127.0.0.3", 3)]
    assert spec.max_workers == 5 and not spec.elastic
    assert kd.launch.WorkerSpec(["true"], hosts="a,b",
                                min_workers=1).elastic


@pytest.mark.parametrize("name, value, expected", [
    ("timeout", 0, "Expected a positive number of seconds or None."),
    ("grace_period", -1, "Expected a number of seconds >= 0."),
    ("restart_grace_period", "1", "Expected a number of seconds >= 0."),
    ("host_wait", True, "Expected a number of seconds >= 0."),
])
def test_seconds_are_checked_alike(name, value, expected):
    with pytest.raises(kd.launch.LauncherError) as e:
        kd.launch.WorkerSpec(["true"], **{name: value})
    assert f"Received: {name}={value!r}. {expected}" in str(e.value)


def test_starter_is_injectable_and_chosen_by_address():
    from kerasdist.launch import agent

    spec = kd.launch.WorkerSpec(["true"], hosts="127.0.0.2,10.9.9.9")
    starters = agent.Starters(spec)
    assert starters(A).name == "local"
    assert starters(Host("10.9.9.9", 1)).name == "ssh"
    fake = FakeStarter(up=set())
    made = agent.Agent(spec, None, starter_for=lambda h: fake)
    with pytest.raises(kd.launch.LauncherError, match=(
            "Host[(]s[)] unreachable at start: 127.0.0.2 [(]no answer")):
        made.hosts_at_start()


def test_elastic_start_on_the_hosts_that_answer():
    from kerasdist.launch import agent

    spec = kd.launch.WorkerSpec(["true"], hosts="127.0.0.2,127.0.0.3",
                                min_workers=1)
    fake = FakeStarter(up={B})
    made = agent.Agent(spec, None, starter_for=lambda h: fake)
    seen = []
    made.bus.subscribe(seen.append)
    assert made.hosts_at_start() == (B,)
    assert [type(e) for e in seen] == [
        events.HostUnreachable, events.Shrunk]
    assert (seen[1].old_size, seen[1].new_size) == (2, 1)


def test_events_jsonl_is_one_object_per_line(tmp_path):
    writer = events.JsonLines(str(tmp_path / events.EVENTS_FILE))
    writer(events.for_failure(_failure()))
    writer(events.Shrunk(attempt=1, lost=["b"], hosts=["a"], old_size=2,
                         new_size=1, min_workers=1))
    with open(tmp_path / events.EVENTS_FILE, "a") as f:
        f.write('{"event": "half a li')  # Still being written.
    got = kd.launch.read_events(tmp_path)
    assert [e["event"] for e in got] == ["worker_exited", "shrunk"]
    assert (got[0]["rank"], got[0]["signal"], got[0]["exit_code"]) == (
        1, "SIGKILL", -9)
    assert (got[1]["old_size"], got[1]["new_size"]) == (2, 1)


def _event_classes():
    found, todo = [], [events.Event]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if not cls.__name__.startswith("_") and cls is not events.Event:
            found.append(cls)
    return found


def test_every_event_and_field_is_documented():
    path = os.path.join(os.path.dirname(HERE), "docs", "guide",
                        "fault_tolerance.md")
    with open(path, encoding="utf-8") as f:
        rows = {line.split("|")[1].strip(): line for line in f
                if line.startswith("| `")}
    classes = _event_classes()
    assert len(classes) >= 12, classes
    for cls in classes:
        row = rows.get(f"`{cls.name}`")
        assert row is not None, (
            f"event {cls.name!r} has no row in the fault-tolerance guide's "
            "events table")
        fields = [f.name for f in dataclasses.fields(cls)
                  if f.name not in ("time", "attempt")]
        if cls is events.RunEnded:
            fields = [f.name for f in dataclasses.fields(
                kd.launch.RunResult)] + ["outcome"]
        for name in fields:
            assert f"`{name}`" in row, (
                f"field {name!r} of event {cls.name!r} is not in its row")


def test_report_training_finished_writes_the_heartbeat(tmp_path, monkeypatch):
    from kerasdist.launch import protocol

    beat = tmp_path / "worker-0.heartbeat"
    beat.write_text("")
    monkeypatch.setenv(protocol.ENV_HEARTBEAT_FILE, str(beat))
    protocol.report_training_finished()
    assert beat.read_text() == '{"finished": true}\n'
    monkeypatch.delenv(protocol.ENV_HEARTBEAT_FILE)
    protocol.report_training_finished()  # Outside the launcher: no-op.


def test_hang_blame_goes_to_the_worker_whose_host_does_not_answer():
    """Issue 25 (6): after a partition every worker is silent; the one on
    the host that does not answer is named, not a bystander."""
    hung = Failure(1, 0, WorkerState.HUNG, "made no progress for 20s (hung)",
                   None, 0.0, "127.0.0.2")
    hosts_of = {0: "127.0.0.2", 1: "127.0.0.3", 2: "127.0.0.4"}
    blamed = policy.blame(hung, hosts_of, {B: "no answer within 1s"})
    assert (blamed.worker, blamed.host, blamed.reason) == (
        1, "127.0.0.3", "made no progress for 20s (hung); its host does "
        "not answer (no answer within 1s)")
    assert policy.blame(hung, hosts_of, {}) is hung  # Every host answers.
    assert policy.blame(hung, hosts_of, {A: "gone"}) is hung  # Already.
    died = _failure()
    assert policy.blame(died, hosts_of, {B: "gone"}) is died  # Not a hang.

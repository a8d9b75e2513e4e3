"""The launcher's loop: start a group, watch it, ask the policies, apply.

Follows the recovery protocol in DESIGN.md: collectives cannot admit a lone
replacement, so when any worker fails, hangs or asks for a restart, every
worker is stopped and the group starts again on fresh ports (as torchrun
does). What to do next is decided by `policy` (pure functions returning
typed decisions), which hosts are up by `membership`, the workers of one
attempt are a `group.Group`, and everything that happens is published as
an `events` event (the console lines are one subscriber, `events.jsonl`
another). Options are `spec.WorkerSpec`'s fields.

Concurrency: the loop runs on the calling thread; the signal handler only
sets `Agent.interrupted` (read by the loop before anything starts and
while waiting); probes run on `membership`'s threads.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from kerasdist.launch import events, goodput, policy, protocol, quiet
from kerasdist.launch import hosts as hostlib
from kerasdist.launch.group import Group, StartFailed
from kerasdist.launch.membership import Membership
from kerasdist.launch.results import (
    Failure,
    RunResult,
    WorkerState,
    signal_name,
)
from kerasdist.launch.spec import (
    LauncherError,
    WorkerSpec,
    check_command,
    check_log_dir,
    option_fields,
)

__all__ = [
    "Agent",
    "Failure",
    "LauncherError",
    "RunResult",
    "Starters",
    "WorkerSpec",
    "WorkerState",
    "run",
]

_POLL_SECONDS = 0.05
_REGROW_SECONDS = 2.0  # How often an elastic run probes its missing hosts.
_PLACE_SECONDS = 1.0  # How often unreachable hosts are probed again.
_END = (policy.Finish, policy.Stop, policy.GiveUp)


class Starters:
    """The `Starter` for each host, from `WorkerSpec.starter` (one each).

    Args:
        spec: `WorkerSpec`.

    Example:

    ```python
    starter = Starters(spec)(spec.host_list()[0])
    ```
    """

    def __init__(self, spec: WorkerSpec):
        self._spec = spec
        self._made: dict[str, hostlib.Starter] = {}

    def __call__(self, host: hostlib.Host) -> hostlib.Starter:
        spec = self._spec
        how = spec.starter
        if how == "auto":
            how = "local" if (
                not spec.multi_host or hostlib.is_local_address(host.address)
            ) else "ssh"
        if how not in self._made:
            if how == "ssh":
                from kerasdist.launch import ssh

                self._made[how] = ssh.SshStarter(
                    ssh_command=spec.ssh_command, cwd=os.getcwd()
                )
            else:
                self._made[how] = hostlib.LocalStarter()
        return self._made[how]


def _size(hosts: Sequence[hostlib.Host]) -> int:
    return sum(h.slots for h in hosts)


class Agent:
    """Runs attempts until success, give-up or interruption.

    `run` (the function) makes one, installs the signal handlers and
    calls `Agent.run`; build one yourself to inject starters or subscribe
    to its events.

    Args:
        spec: `WorkerSpec`.
        stream: text stream or None (`sys.stdout`).
        starter_for: callable `Host -> Starter` or None (from
            `spec.starter`).

    Example:

    ```python
    agent = Agent(WorkerSpec(["python", "train.py"]), None)
    agent.bus.subscribe(print)
    result = agent.run()
    ```
    """

    def __init__(self, spec: WorkerSpec, stream: IO[str] | None,
                 starter_for: Callable[[hostlib.Host], hostlib.Starter]
                 | None = None):
        self.spec = spec
        self.console = events.Console(
            stream if stream is not None else sys.stdout
        )
        # Workers' lines, less TensorFlow's start-up noise (launch/quiet.py).
        self.worker_output = quiet.console_writer(self.console.write)
        self.bus = events.EventBus()
        self.bus.subscribe(self.console)
        self.interrupted: int | None = None
        self.hosts = spec.host_list()
        self.min_workers = (
            spec.min_workers if spec.min_workers is not None
            else spec.max_workers
        )
        self._starter_for = starter_for or Starters(spec)
        self.members = Membership(
            self.hosts, self._starter_for, host_wait=spec.host_wait
        )
        self.attempt = 0
        self.budget = policy.Budget(spec.max_restarts, spec.max_preemptions)
        self.failures: list[Failure] = []
        self.sizes: list[int] = []
        self.timeline = goodput.Timeline()
        # Hosts an elastic run goes on without for good (their workers
        # never got going): {host: why}.
        self.excluded: dict[hostlib.Host, str] = {}

    def run(self) -> RunResult:
        """Runs attempts until the run ends (see `run`, the function).

        Returns:
            `RunResult`.

        Raises:
            LauncherError: before anything started.
        """
        spec = self.spec
        start = time.monotonic()
        self.timeline = goodput.Timeline()
        check_command(spec)
        if spec.log_dir:
            check_log_dir(spec.log_dir)
            self.bus.subscribe(events.JsonLines(
                os.path.join(spec.log_dir, events.EVENTS_FILE)
            ))
        hosts = self.hosts_at_start()
        beat_dir = spec.log_dir or tempfile.mkdtemp(prefix="kerasdist-run-")
        try:
            end = self._loop(hosts, beat_dir)
        finally:
            if not spec.log_dir:
                shutil.rmtree(beat_dir, ignore_errors=True)
        if isinstance(end, policy.GiveUp):
            self.bus.publish(events.GaveUp(
                attempt=self.attempt, reason=end.reason,
                returncode=end.returncode,
            ))
        wall_time = time.monotonic() - start
        spent = self.timeline.account(wall_time)
        self.bus.publish(events.GoodputMeasured.of(self.attempt, spent))
        result = RunResult(
            returncode=0 if isinstance(end, policy.Finish)
            else end.returncode,
            attempts=self.attempt,
            restarts=self.budget.restarts,
            preemptions=self.budget.preemptions,
            failures=self.failures,
            wall_time=wall_time,
            interrupted_by=(
                signal_name(end.signum) if isinstance(end, policy.Stop)
                else None
            ),
            sizes=self.sizes,
            goodput=spent,
        )
        self.bus.publish(events.RunEnded(result=result))
        return result

    def _loop(self, hosts: Sequence[hostlib.Host], beat_dir: str):
        """Attempts until a decision ends the run; returns that decision."""
        while True:
            if self.interrupted is not None:
                return policy.Stop(self.interrupted)
            outcome = self._attempt(hosts, beat_dir)
            if self.interrupted is not None:
                # Also when the signal came while the group was stopping.
                outcome = policy.Interrupted(self.interrupted)
            if isinstance(outcome, Failure):
                self.failures.append(outcome)
            decision, self.budget = policy.after_attempt(outcome, self.budget)
            if isinstance(decision, _END):
                return decision
            failure = None
            if isinstance(decision, policy.Restart):
                failure = decision.failure
                self.bus.publish(events.Restarting(
                    attempt=self.attempt, kind=decision.kind,
                    used=decision.used, limit=decision.limit,
                    description=failure.describe(),
                ))
                self._exclude_failing_at_start()
            placing = time.time()
            placed = self._place(failure)
            if self.spec.multi_host:  # Probing and --host_wait.
                self.timeline.waited(time.time() - placing)
            if isinstance(placed, _END):
                return placed
            self._announce_size(hosts, placed)
            hosts = placed.hosts

    def _usable(self) -> list[hostlib.Host]:
        """The hosts not excluded, in order."""
        return [h for h in self.hosts if h not in self.excluded]

    def _exclude_failing_at_start(self) -> None:
        """Elastic: drops a host whose workers never get going."""
        if not self.spec.elastic:
            return
        host = policy.failing_at_start(
            self.failures, self._usable(), min_workers=self.min_workers
        )
        if host is None:
            return
        why = (
            "its workers hung or died at start-up in "
            f"{policy.START_FAILURES} attempts in a row"
        )
        self.excluded[host] = why
        self.bus.publish(events.HostExcluded(
            attempt=self.attempt, host=str(host), reason=why,
        ))

    def _announce_size(self, old: Sequence[hostlib.Host], placed) -> None:
        """Publishes `Shrunk` or `Grew` when the group changes size."""
        old_size, new_size = _size(old), _size(placed.hosts)
        names = [str(h) for h in placed.hosts]
        if new_size < old_size or isinstance(placed, policy.Resize):
            lost = placed.lost if isinstance(placed, policy.Resize) else [
                h for h in old if h not in placed.hosts]
            self.bus.publish(events.Shrunk(
                attempt=self.attempt, hosts=names, old_size=old_size,
                lost=[str(h) for h in lost], new_size=new_size,
                min_workers=self.min_workers,
            ))
        elif new_size > old_size:
            self.bus.publish(events.Grew(
                attempt=self.attempt, hosts=names, old_size=old_size,
                new_size=new_size,
            ))

    # -- hosts ---------------------------------------------------------

    def hosts_at_start(self) -> tuple[hostlib.Host, ...]:
        """The hosts of the first attempt.

        Returns:
            Every host, or (elastic start) the hosts that answer if they
            hold at least `min_workers`.

        Raises:
            LauncherError: naming the hosts that do not answer.
        """
        if not self.spec.multi_host:
            return tuple(self.hosts)  # Started here, as before hosts.
        down = self.members.probe(self.hosts)
        placed = policy.placement(
            self.hosts, down, min_workers=self.min_workers,
            elastic=self.spec.elastic, waited=None,
            host_wait=self.spec.host_wait,
        )
        if isinstance(placed, policy.Start):
            return placed.hosts
        if self.spec.elastic and isinstance(placed, policy.Resize):
            self._announce_down(down, set(), wait=0.0)
            self._announce_size(self.hosts, placed)
            return placed.hosts
        which = "; ".join(f"{h} ({why})" for h, why in down.items())
        raise LauncherError(
            f"Host(s) unreachable at start: {which}. Nothing was "
            "started. Check that each host is up and that workers can "
            "be started there (for ssh hosts: `ssh HOST true` works "
            "without a password), or remove it from --hosts/--hostfile"
            + (" (or pass --min_workers to start with fewer)."
               if not self.spec.elastic else ".")
        )

    def _announce_down(self, down: dict, announced: set,
                       wait: float) -> None:
        for h, why in down.items():
            if h not in announced:
                announced.add(h)
                self.bus.publish(events.HostUnreachable(
                    attempt=self.attempt, host=str(h), reason=why,
                    host_wait=wait,
                ))

    def _place(self, failure: Failure | None):
        """Hosts for the next attempt, waiting up to `host_wait` (from the
        failure) for the unreachable ones: `Start`, `Resize`, `GiveUp` or
        `Stop`."""
        spec = self.spec
        if not spec.multi_host:
            return policy.Start(tuple(self.hosts))
        deadline = self.members.deadline()
        announced: set[hostlib.Host] = set()
        while self.interrupted is None:
            down = self.members.unreachable()
            self._announce_down(down, announced, spec.host_wait)
            if self.interrupted is not None:
                break
            placed = policy.placement(
                self._usable(), down, min_workers=self.min_workers,
                elastic=spec.elastic,
                waited=spec.host_wait - (deadline - time.monotonic()),
                host_wait=spec.host_wait, failure=failure,
            )
            if not isinstance(placed, policy.Wait):
                return placed
            self._sleep_unless_interrupted(_PLACE_SECONDS)
        # Interrupted: no probe, no new group (no ssh session) after this.
        return policy.Stop(self.interrupted)

    def _sleep_unless_interrupted(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.interrupted is None and time.monotonic() < end:
            time.sleep(_POLL_SECONDS)

    # -- one attempt ---------------------------------------------------

    def _environment(self, index: int, host: hostlib.Host, size: int,
                     beat_dir: str) -> dict[str, str]:
        """The variables the launcher sets for one worker (but TF_CONFIG)."""
        spec = self.spec
        env = dict(spec.env or {})
        env[protocol.ENV_RESTART_COUNT] = str(self.attempt - 1)
        env[protocol.ENV_WORKER_INDEX] = str(index)
        env[protocol.ENV_NUM_WORKERS] = str(size)
        env[protocol.ENV_HEARTBEAT_FILE] = os.path.join(
            beat_dir, f"worker-{index}.heartbeat"
        )
        if spec.multi_host:
            env[protocol.ENV_HOST] = host.address
        if spec.elastic:
            env[protocol.ENV_MIN_WORKERS] = str(self.min_workers)
            env[protocol.ENV_MAX_WORKERS] = str(spec.max_workers)
            if spec.multi_host:  # One host: every size is checked.
                env[protocol.ENV_WORKER_SIZES] = ",".join(
                    str(n) for n in policy.group_sizes(
                        [h.slots for h in self.hosts], self.min_workers))
        if "PYTHONUNBUFFERED" not in os.environ:
            env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _attempt(self, hosts: Sequence[hostlib.Host], beat_dir: str):
        """Runs one attempt; returns its `policy.Outcome`."""
        spec = self.spec
        self.attempt += 1
        self.sizes.append(_size(hosts))
        self.members.new_attempt()
        self.timeline.start()
        group = Group(
            spec, self.attempt, hosts, self._starter_for, beat_dir,
            self.worker_output,
            lambda i, h, n: self._environment(i, h, n, beat_dir),
        )
        self.bus.publish(events.AttemptStarted(
            attempt=self.attempt, size=group.size,
            hosts=[str(h) for h in hosts], command=list(spec.command),
            multi_host=spec.multi_host,
        ))
        missing = [h for h in self._usable() if h not in hosts] if (
            spec.elastic
        ) else []
        try:
            group.start()
        except StartFailed as e:
            self.timeline.end(detection=0.0)
            self.timeline.stop(None)
            self.bus.publish(events.for_failure(e.failure))
            return e.failure
        try:
            outcome = self._monitor(group, missing)
        except BaseException:
            # E.g. a test's timeout: never leave workers behind.
            group.stop(0.0)
            raise
        if self.interrupted is not None:
            outcome = policy.Interrupted(self.interrupted)
        self.timeline.end(detection=_silence(group, outcome))
        self.stop_group(group, outcome)
        self.timeline.stop(self._chief_facts(group))
        if isinstance(outcome, Failure):
            if spec.multi_host:
                outcome = policy.blame(
                    outcome, {w.index: w.host for w in group.workers},
                    self.members.seen_at_failure(),
                )
            self.bus.publish(events.for_failure(outcome))
        return outcome

    def _chief_facts(self, group: Group) -> dict | None:
        """Worker 0's goodput facts of this attempt, or None."""
        facts = group.workers[0].goodput_facts() if group.workers else None
        if facts is None or facts.get("attempt") != self.attempt - 1:
            return None  # None written, or not by this attempt.
        return facts

    def _monitor(self, group: Group, missing: list[hostlib.Host]):
        """Waits for success, a failure, returned hosts or an interruption.
        """
        next_probe = time.monotonic() + _REGROW_SECONDS
        while self.interrupted is None:
            failure = group.check()
            if failure is not None:
                return failure
            if group.succeeded():
                return policy.Succeeded()
            if policy.may_grow(missing, finished=group.finishing()):
                back = self.members.returned()
                if back:
                    return policy.HostsBack(back)
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + _REGROW_SECONDS
                    self.members.watch(missing)
            time.sleep(_POLL_SECONDS)
        return policy.Interrupted(self.interrupted)

    def stop_group(self, group: Group, outcome: policy.Outcome) -> None:
        """Stops `group` as `outcome` asks, publishing an interruption or a
        grow (the failure is published by the caller, with its blame).

        Args:
            group: `group.Group` (anything with `stop(grace)`).
            outcome: how the attempt ended: `grace_period` for an
                interruption or a grow (workers save), `restart_grace_period`
                after a failure (peers cannot save), 0 after success.
        """
        spec = self.spec
        if isinstance(outcome, policy.Interrupted):
            self.bus.publish(events.Interrupted(
                attempt=self.attempt, signal=signal_name(outcome.signum),
                grace_period=spec.grace_period,
            ))
            group.stop(spec.grace_period)
        elif isinstance(outcome, policy.HostsBack):
            self.bus.publish(events.HostsReturned(
                attempt=self.attempt, hosts=[str(h) for h in outcome.hosts],
                grace_period=spec.grace_period,
            ))
            group.stop(spec.grace_period)
        elif isinstance(outcome, policy.Succeeded):
            group.stop(0.0)  # Reap; all exited.
        else:
            if spec.multi_host:
                # Probe while the survivors stop; host_wait counts from now.
                self.members.failure_seen()
            group.stop(spec.restart_grace_period)


def _silence(group: Group, outcome: policy.Outcome) -> float:
    """Seconds a hung worker was silent before the launcher acted (the
    failure's detection time); 0 for anything else (an exit is seen
    within one poll)."""
    if not isinstance(outcome, Failure) or (
        outcome.state != WorkerState.HUNG
    ):
        return 0.0
    for w in group.workers:
        if w.index == outcome.worker:
            return max(time.monotonic() - w.last_progress(), 0.0)
    return 0.0


def run(
    command: Sequence[str], *, stream: IO[str] | None = None, **options: Any
) -> RunResult:
    """Runs `command` as a group of workers, restarting the group on failure.

    Every worker gets `TF_CONFIG` (its own free port on `host`, fresh each
    attempt), `KERASDIST_RESTART_COUNT`, `KERASDIST_WORKER_INDEX`,
    `KERASDIST_NUM_WORKERS` and `KERASDIST_HEARTBEAT_FILE`, runs in its own
    process group (killed if the launcher dies), and has each output line
    prefixed with `[worker-i] `. When a worker exits non-zero, is killed,
    asks for a restart (`RESTART_EXIT_CODE`) or shows no progress for
    `timeout` seconds, the whole group is stopped and started again; a
    worker exiting with `PERMANENT_EXIT_CODE` ends the run at once.
    SIGINT/SIGTERM to the launcher are forwarded to the workers (as
    SIGTERM), and it returns.

    Args:
        command: list of str. The worker command.
        stream: text stream or None. Where output goes; defaults to
            `sys.stdout`.
        **options: the fields of `WorkerSpec`, with the same defaults:
            OPTIONS.

    Returns:
        `RunResult`; its `summary()` was also printed.

    Raises:
        LauncherError: on invalid arguments, a command that cannot be run
            or a `log_dir` that cannot be written, before starting
            anything.

    Example:

    ```python
    result = kd.launch.run(["python", "train.py"], num_workers=2,
                           max_restarts=3, log_dir="/tmp/logs")
    assert result.ok, result.summary()
    ```
    """
    known = {f.name for f in option_fields()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LauncherError(
            f"Unknown option(s) {unknown} for kerasdist.launch.run. "
            f"Expected some of {sorted(known)}."
        )
    if options.get("log_dir") is not None:
        options["log_dir"] = os.fspath(options["log_dir"])
    spec = WorkerSpec(
        command=list(command) if not isinstance(command, str) else command,
        **options,
    )
    agent = Agent(spec, stream)
    installed = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum, frame):
            del frame
            if agent.interrupted is None:
                agent.interrupted = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            installed[sig] = signal.signal(sig, on_signal)
    try:
        return agent.run()
    finally:
        for sig, handler in installed.items():
            signal.signal(sig, handler)


def _signature() -> inspect.Signature:
    """`run`'s signature with `WorkerSpec`'s options spelled out."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("command", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation="Sequence[str]"),
        inspect.Parameter("stream", keyword, default=None,
                          annotation="IO[str] | None"),
    ]
    params += [
        inspect.Parameter(f.name, keyword, default=f.default,
                          annotation=f.type)
        for f in option_fields()
    ]
    return inspect.Signature(params, return_annotation="RunResult")


run.__signature__ = _signature()
if run.__doc__:  # None under `python -OO`.
    run.__doc__ = run.__doc__.replace(
        "OPTIONS.", ", ".join(f"`{f.name}`" for f in option_fields()) + "."
    )

"""The workers of one attempt: start them, watch them, blame, stop them.

Collectives cannot admit a lone replacement, so a group is started and
stopped as a whole, on fresh ports each time (as torchrun does). `check`
returns the first reason to end the attempt: a worker that exited
non-zero, asked for a restart, failed permanently, or a hang (no output
and no heartbeat for `timeout` seconds). Blame goes to a stopped worker
(SIGSTOP, a frozen VM) rather than the peer that failed waiting for it.

Single-threaded: only the agent's loop calls into a `Group`; each
`supervisor.Process` pumps its own output on its own thread.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

from kerasdist import cluster
from kerasdist.launch import hosts as hostlib
from kerasdist.launch import protocol, supervisor
from kerasdist.launch.results import Failure, WorkerState, exit_reason
from kerasdist.launch.spec import LauncherError, WorkerSpec

__all__ = ["Group", "StartFailed", "Worker"]

_EXIT_STATES = {
    0: WorkerState.SUCCEEDED,
    protocol.RESTART_EXIT_CODE: WorkerState.PREEMPTED,
    protocol.PERMANENT_EXIT_CODE: WorkerState.PERMANENT,
}


def _mtime(path: str) -> tuple[int, int] | None:
    """(modification time in ns, size): what changes when a worker touches
    or writes its heartbeat file (times are coarse: the size tells a write
    within the same tick)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Worker:
    """One worker process of one attempt."""

    def __init__(self, index: int, process: supervisor.Process,
                 heartbeat: str, host: str | None,
                 starter: hostlib.Starter):
        self.index = index
        self.host = host
        self.process = process
        self.heartbeat = heartbeat
        self.starter = starter
        self.state = WorkerState.HEALTHY
        self._created = _mtime(heartbeat)
        self._started = False
        self._finished = False
        self._read_at = self._created

    def started(self) -> bool:
        """True once the worker touched its heartbeat file (start-up over:
        `BackupAndRestore` touches it when `fit` begins)."""
        if not self._started:
            mtime = _mtime(self.heartbeat)
            self._started = mtime is not None and mtime != self._created
        return self._started

    def last_progress(self) -> float:
        """Monotonic time of the last output or heartbeat."""
        latest = self.process.last_output
        try:
            age = time.time() - os.stat(self.heartbeat).st_mtime
            latest = max(latest, time.monotonic() - age)
        except OSError:
            pass
        return latest

    def finished(self) -> bool:
        """True once the worker reported that training is done
        (`protocol.report_training_finished`) or exited 0."""
        if self._finished or self.state == WorkerState.SUCCEEDED:
            return True
        mtime = _mtime(self.heartbeat)
        if mtime is not None and mtime != self._read_at:
            self._read_at = mtime  # Read only when it changed.
            # Once said, it stays said for this attempt.
            self._finished = protocol.heartbeat_says_finished(
                self.heartbeat_text())
        return self._finished

    def heartbeat_text(self) -> str:
        """The heartbeat file's content ("" if it cannot be read)."""
        try:
            with open(self.heartbeat) as f:
                return f.read(1 << 16)
        except OSError:
            return ""

    def goodput_facts(self) -> dict | None:
        """The worker's last goodput facts (`BackupAndRestore` writes them
        into its heartbeat file), or None."""
        record = protocol.read_heartbeat(self.heartbeat_text())
        return record if record and "step_seconds" in record else None

    def is_stopped(self) -> bool:
        """True when the process is stopped (SIGSTOP) or traced."""
        return self.process.state() in supervisor.STOPPED_STATES

    def poll(self) -> int | None:
        """The exit status (None while running); updates `state`."""
        code = self.process.returncode
        if code is not None and self.state == WorkerState.HEALTHY:
            self.state = _EXIT_STATES.get(code, WorkerState.FAILED)
        return code


class StartFailed(Exception):
    """A host could not take its workers; carries the attempt's failure."""

    def __init__(self, failure: Failure):
        super().__init__(failure.reason)
        self.failure = failure


class Group:
    """The workers of one attempt on `hosts`.

    Args:
        spec: `WorkerSpec`.
        attempt: int. Attempt number, from 1.
        hosts: list of `Host` this group runs on.
        starter_for: callable `Host -> Starter`.
        beat_dir: str. Directory of the heartbeat files.
        write: callable. Where the workers' prefixed output goes.
        environment: callable `(index, host, size) -> dict` of the
            launcher's variables for a worker, without `TF_CONFIG`.
    """

    def __init__(self, spec: WorkerSpec, attempt: int,
                 hosts: Sequence[hostlib.Host],
                 starter_for: Callable[[hostlib.Host], hostlib.Starter],
                 beat_dir: str, write: Callable[[str], None],
                 environment: Callable[..., dict]):
        self.spec = spec
        self.attempt = attempt
        self.hosts = list(hosts)
        self.size = sum(h.slots for h in hosts)
        self.workers: list[Worker] = []
        self._starter_for = starter_for
        self._beat_dir = beat_dir
        self._write = write
        self._environment = environment

    def start(self) -> None:
        """Starts every worker.

        Raises:
            StartFailed: a host could not pick ports for its workers.
            LauncherError: the command cannot be started at all.
        """
        spec = self.spec
        members = [h for h in self.hosts for _ in range(h.slots)]
        # Fresh ports every attempt: the old ones may still be in TIME_WAIT.
        if spec.multi_host:
            config = cluster.make_tf_config(self._addresses(), 0)
        else:
            config = cluster.make_tf_config(len(members), 0, host=spec.host)
        try:
            for i, host in enumerate(members):
                self._start_one(i, host, config)
        except BaseException as e:
            self.stop(0.0)
            if isinstance(e, OSError):  # E.g. a script without #! line.
                raise LauncherError(
                    f"Invalid worker command: {spec.command[0]!r} cannot "
                    f"be started ({e.strerror or e}). Give an executable "
                    "program or an interpreter and a script, e.g. "
                    "kerasdist-run -- python train.py."
                ) from None
            raise

    def _start_one(self, i: int, host: hostlib.Host, config: dict) -> None:
        spec = self.spec
        env = self._environment(i, host, self.size)
        env["TF_CONFIG"] = json.dumps(
            dict(config, task={"type": "worker", "index": i})
        )
        heartbeat = env[protocol.ENV_HEARTBEAT_FILE]
        with open(heartbeat, "w"):
            pass
        where = f"@{host}" if spec.multi_host else ""
        starter = self._starter_for(host)
        process = starter.start(
            host, spec.command, env,
            log_path=(
                os.path.join(spec.log_dir, f"worker-{i}.log")
                if spec.log_dir else None
            ),
            log_header=f"===== attempt {self.attempt}"
            + (f" on {host}" if spec.multi_host else "") + " =====",
            sink=self._write,
            prefix=f"[worker-{i}{where}] ",
        )
        self.workers.append(Worker(
            i, process, heartbeat,
            host.address if spec.multi_host else None, starter,
        ))

    def _addresses(self) -> list[str]:
        """`ADDRESS:PORT` of each worker, with ports free where it runs.

        Raises:
            StartFailed: when a host cannot say which ports are free.
        """
        by_starter: dict[int, tuple[hostlib.Starter, list]] = {}
        for h in self.hosts:
            starter = self._starter_for(h)
            by_starter.setdefault(id(starter), (starter, []))[1].append(h)
        ports: dict[hostlib.Host, list[int]] = {}
        for starter, hosts in by_starter.values():
            try:
                picked = iter(starter.pick_ports(hosts))
            except OSError as e:
                raise StartFailed(Failure(
                    self.attempt, self._first_index(hosts[0]),
                    WorkerState.FAILED, f"could not be started ({e})", None,
                    time.time(), hosts[0].address, at_start=True,
                )) from None
            for h in hosts:
                ports[h] = [next(picked) for _ in range(h.slots)]
        return [f"{h.address}:{p}" for h in self.hosts for p in ports[h]]

    def _first_index(self, host: hostlib.Host) -> int:
        index = 0
        for h in self.hosts:
            if h == host:
                return index
            index += h.slots
        return index

    def stop(self, grace: float) -> None:
        """SIGTERM every process group, SIGKILL what is left after grace."""
        supervisor.stop_all([w.process for w in self.workers], grace)
        for w in self.workers:
            w.poll()
            if w.state == WorkerState.HEALTHY:
                w.state = WorkerState.STOPPED

    def succeeded(self) -> bool:
        """True when every worker exited with status 0."""
        return all(w.state == WorkerState.SUCCEEDED for w in self.workers)

    def finishing(self) -> bool:
        """True when a worker finished training (it said so, or exited 0):
        the group is finishing and must not be resized."""
        return any(w.finished() for w in self.workers)

    def check(self) -> Failure | None:
        """The first reason to end this attempt, if any.

        When several workers have ended by the same look, one killed by a
        signal is named: the others' exits (a peer's collective or RPC
        failing, a model-parallel server whose chief failed) follow from
        it, often within one poll.
        """
        ended = []
        for w in self.workers:
            code = w.poll()
            if w.state == WorkerState.FAILED:
                blamed = self._blame_stopped(w)
                if blamed is not None:
                    return blamed
            if w.state in (
                WorkerState.FAILED, WorkerState.PREEMPTED,
                WorkerState.PERMANENT,
            ):
                ended.append((w, code))
        if not ended:
            return self._hung()
        w, code = min(ended, key=lambda e: (e[1] or 0) >= 0)
        # E.g. an ssh worker whose connection ended: say so.
        lost = w.starter.failure_reason(w.process)
        return Failure(
            self.attempt, w.index, w.state,
            f"lost its host ({lost})" if lost else exit_reason(code),
            code, time.time(), w.host, not w.started(),
        )

    def _blame_stopped(self, failed: Worker) -> Failure | None:
        """A stopped peer, not the worker that failed waiting for it.

        TensorFlow's own heartbeat ends a healthy worker whose peer stopped
        (SIGSTOP, a frozen VM): the stopped one is the cause.
        """
        for w in self.workers:
            if w is not failed and w.state == WorkerState.HEALTHY and (
                w.is_stopped()
            ):
                w.state = WorkerState.HUNG
                return Failure(
                    self.attempt, w.index, WorkerState.HUNG,
                    "is stopped (process state T, e.g. SIGSTOP) and made "
                    f"no progress; worker-{failed.index} "
                    f"{exit_reason(failed.process.returncode)} waiting "
                    "for it (hung)",
                    None, time.time(), w.host, not w.started(),
                )
        return None

    def _hung(self) -> Failure | None:
        """The worker to blame for a hang, if any worker is past timeout.

        Workers blocked in a collective with a stopped peer stop
        progressing too; blame the stopped one, else the one silent
        longest.
        """
        spec = self.spec
        if spec.timeout is None:
            return None
        now = time.monotonic()
        healthy = [w for w in self.workers
                   if w.state == WorkerState.HEALTHY]
        silent = [w for w in healthy
                  if now - w.last_progress() > _limit(spec, w)]
        if not silent:
            return None
        stopped = [w for w in healthy if w.is_stopped()]
        culprit = stopped[0] if stopped else min(
            healthy, key=Worker.last_progress
        )
        culprit.state = WorkerState.HUNG
        note = (
            "; it is stopped (process state T, e.g. SIGSTOP)"
            if stopped else ""
        )
        started = culprit.started()
        return Failure(
            self.attempt, culprit.index, WorkerState.HUNG,
            f"made no progress for {_limit(spec, culprit):g}s (hung){note}",
            None,
            time.time(), culprit.host, not started,
        )


def _limit(spec: WorkerSpec, worker: Worker) -> float:
    """Seconds of silence after which `worker` is hung."""
    if worker.started() or spec.start_timeout is None:
        return spec.timeout
    return spec.start_timeout

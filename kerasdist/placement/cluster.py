"""Joining a cluster for model parallelism across machines.

Every worker's script calls `join_cluster()` first. The chief connects to
the cluster with TensorFlow's distributed runtime
(`tf.config.experimental_connect_to_cluster`) and gets the devices of every
task; `place` and `PipelineModel` then put stages on them and TensorFlow
moves activations and gradients between the tasks. Every other worker
serves (`tf.distribute.Server`) and never returns from `join_cluster()`.

How a server learns that the chief has finished: a control channel over
UDP, on the same port number as the server's gRPC address (TCP and UDP
ports are separate, and `TF_CONFIG` already names that address, so nothing
else has to be agreed on). The chief says hello until each server answers
(the bounded wait that names a worker which never answers), then sends a
heartbeat every `heartbeat` seconds while it runs and "done" when its
Python interpreter exits normally, or "failed" after an uncaught exception.
A server exits 0 on "done"; it exits 1 on "failed" or when the heartbeats
stop for `liveness` seconds (the chief was killed), so the launcher restarts
the group per the recovery contract.

A server under a memory limit (a cgroup v1 or v2 memory group with a limit)
also starts a small watchdog process: if the kernel kills the server past
its limit, which the server cannot report itself (SIGKILL), the watchdog
writes so, with the limit, to the worker's log.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time

import tensorflow as tf
from absl import logging

from kerasdist import cluster as cluster_lib

__all__ = ["join_cluster"]

# Exit status of a server whose chief failed or vanished.
CHIEF_LOST_EXIT_CODE = 1

_HELLO, _ACK, _ALIVE, _DONE, _FAILED = (
    b"kd-hello", b"kd-ack", b"kd-alive", b"kd-done", b"kd-failed"
)
_joined: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class _Task:
    job: str
    index: int
    address: str

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.address.rsplit(":", 1)
        return host.strip("[]"), int(port)

    def device(self, kind: str = "CPU", i: int = 0) -> str:
        return f"/job:{self.job}/replica:0/task:{self.index}/device:{kind}:{i}"


def join_cluster(
    timeout: float = 120.0,
    heartbeat: float = 1.0,
    liveness: float = 30.0,
) -> list[str]:
    """Joins the cluster for model parallelism; the chief gets its devices.

    Call it first in the script every worker runs (under `kerasdist-run`,
    SLURM or any engine `kd.cluster.resolve()` knows), before any tensor,
    model or strategy exists. On the chief it waits until every worker
    answers, connects to the cluster and returns the devices of all tasks,
    named as `TF_CONFIG` orders them: worker i's CPU is
    `/job:worker/replica:0/task:i/device:CPU:0`, its GPUs follow. On every
    other worker it serves the chief's operations and never returns: the
    process exits 0 once the chief's script ends normally, and 1 if the
    chief fails or is killed (so the launcher restarts the group and
    `BackupAndRestore` resumes).

    Args:
        timeout: float. Seconds the chief waits for every worker to answer
            (they may still be importing TensorFlow); a server waits as long
            for the chief's first hello. Default 120.
        heartbeat: float. Seconds between the chief's heartbeats. Default 1.
        liveness: float. Seconds without a heartbeat after which a server
            takes the chief for dead and exits 1. Default 30.

    Returns:
        list of str: on the chief, the devices of every task, the chief's
        own first. Other workers do not return.

    Raises:
        ValueError: for a cluster of one worker or a bad argument.
        RuntimeError: when called twice, or after TensorFlow initialised
            its runtime (a tensor, model or strategy already exists).
        TimeoutError: naming the workers that did not answer in `timeout`.

    Example:

    ```python
    import kerasdist as kd
    devices = kd.placement.join_cluster()  # first; servers stay here
    pipe = kd.placement.PipelineModel(model, devices[1:3],
                                      num_microbatches=4)
    ```
    """
    global _joined
    for name, value in (
        ("timeout", timeout), ("heartbeat", heartbeat), ("liveness", liveness)
    ):
        _check_positive(name, value)
    if liveness <= 2 * heartbeat:
        raise ValueError(
            "Invalid value for argument `liveness`. Received: "
            f"liveness={liveness} with heartbeat={heartbeat}. Expected "
            "liveness > 2 * heartbeat, so one late heartbeat is not taken "
            "for a dead chief."
        )
    if _joined is not None:
        raise RuntimeError(
            "kd.placement.join_cluster() was called twice. Received a "
            "second call after it returned the devices "
            f"{_joined}. Expected one call, at the start of the script: "
            "keep the list it returned."
        )
    info = cluster_lib.resolve()
    tasks = _tasks(info)
    _check_not_initialised()
    spec = tf.train.ClusterSpec({k: list(v) for k, v in info.cluster.items()})
    me = next(
        t for t in tasks
        if (t.job, t.index) == (info.task_type, info.task_index)
    )
    if not info.is_chief:
        _serve(spec, me, tasks[0], timeout, liveness)  # never returns
    servers = [t for t in tasks if t != me]
    control = _ChiefControl(servers, heartbeat)
    control.greet(timeout)
    tf.config.experimental_connect_to_cluster(
        spec, job_name=me.job, task_index=me.index, protocol="grpc"
    )
    control.start()
    _joined = _devices(tasks)
    logging.info(
        "kerasdist: joined a cluster of %d task(s) for model parallelism; "
        "devices: %s", len(tasks), _joined,
    )
    return list(_joined)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        not value > 0
    ):
        raise ValueError(
            f"Invalid value for argument `{name}`. Received: "
            f"{name}={value!r}. Expected a positive number of seconds."
        )


def _tasks(info: cluster_lib.TaskInfo) -> list[_Task]:
    """The training tasks in TF_CONFIG order (chief first, if any)."""
    if info.num_workers < 2:
        raise ValueError(
            "kd.placement.join_cluster() needs a cluster of at least 2 "
            f"workers. Received: {info.num_workers} worker (cluster from "
            f"{info.source!r}). Start the script on several workers, e.g. "
            "`kerasdist-run --num_workers 3 -- python train.py`, or, in one "
            "process, place stages on local devices (kd.virtual_cpus(n)) "
            "without join_cluster()."
        )
    tasks = []
    for job in ("chief", "worker"):
        for i, address in enumerate(info.cluster.get(job, ())):
            tasks.append(_Task(job, i, address))
    return tasks


def _check_not_initialised() -> None:
    """Raises if TensorFlow's runtime already started in this process.

    Changing a thread-pool size is refused once the runtime is initialised
    (tensorflow/python/eager/context.py); setting it and setting it back
    is otherwise no change.
    """
    current = tf.config.threading.get_intra_op_parallelism_threads()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(current + 1)
    except RuntimeError:
        raise RuntimeError(
            "kd.placement.join_cluster() was called after TensorFlow "
            "initialised its runtime (a tensor, variable, model or strategy "
            "already exists), when this process can no longer join a "
            "cluster. Call it first in the script, right after the imports "
            "(kd.virtual_cpus() and tf.config.threading settings may come "
            "before it)."
        ) from None
    tf.config.threading.set_intra_op_parallelism_threads(current)


def _devices(tasks: list[_Task]) -> list[str]:
    """Every task's CPU, then its GPUs, in task order."""
    present = {d.name for d in tf.config.list_logical_devices()}
    out = []
    for t in tasks:
        out.append(t.device("CPU"))
        i = 0
        while t.device("GPU", i) in present:
            out.append(t.device("GPU", i))
            i += 1
    missing = [d for d in out if d not in present]
    if missing:
        raise RuntimeError(
            f"The cluster's devices {missing} are not visible after "
            f"connecting; visible: {sorted(present)}."
        )
    return out


def _udp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(0.2)
    return sock


def _family(host: str) -> int:
    return socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][0]


def _serve(spec, me: _Task, chief: _Task, timeout: float,
           liveness: float) -> None:
    """Serves the chief's operations; exits when the chief ends."""
    host, port = me.host_port
    sock = _udp_socket(_family(host))
    try:
        sock.bind((host, port))
    except OSError as e:
        _exit(
            CHIEF_LOST_EXIT_CODE,
            f"cannot open the control channel on UDP {host}:{port} ({e}); "
            "another process holds that UDP port.",
        )
    # The server runs the chief's operations with this process's thread
    # settings (tf.config.threading, set before join_cluster()).
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=(
            tf.config.threading.get_intra_op_parallelism_threads()
        ),
        inter_op_parallelism_threads=(
            tf.config.threading.get_inter_op_parallelism_threads()
        ),
    )
    server = tf.distribute.Server(
        spec, job_name=me.job, task_index=me.index, protocol="grpc",
        config=config, start=True,
    )
    logging.info(
        "kerasdist: %s %d serves model parallelism at %s",
        me.job, me.index, me.address,
    )
    _watch_memory_limit(f"{me.job} {me.index}")
    code, why = _listen(sock, timeout, liveness)
    if code == 0:
        # The chief's runtime still talks to this server while it shuts
        # down ("Failed to remove function remotely" otherwise).
        _wait_closed(chief.host_port, liveness)
    del server
    _exit(code, why)


# Run by a watchdog next to each server (no TensorFlow import: a few MiB).
# When the server's process ends (the watchdog is re-parented), it compares
# the memory cgroup's kill counter with its value at start: a kill means the
# kernel ended the server past its memory limit, which nothing else reports
# (the server dies by SIGKILL, mid-operation, without a word).
_WATCHDOG = r"""
import os, sys, time
parent, events, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def kills():
    try:
        with open(events) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except OSError:
        pass
    return 0
start = kills()
while os.getppid() == parent:
    time.sleep(0.1)
if kills() > start:
    sys.stderr.write(
        "kerasdist: %s (pid %d) was killed by the kernel past its memory "
        "limit of %s MiB (%s): its stages' weights, optimizer state and "
        "activations need more memory than that. Split the model over more "
        "workers (more stages), keep fewer activations (recompute=True), "
        "or raise the limit.\n" % (name, parent, sys.argv[4], events))
"""


def _memory_events() -> tuple[str, int] | None:
    """This process's memory-cgroup file counting OOM kills, and its limit.

    Returns:
        (path of the file, limit in bytes), or None without a limit.
    """
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1
            base = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
            limit, events = "memory.limit_in_bytes", "memory.oom_control"
            break
    else:
        path = next((ln[3:] for ln in lines if ln.startswith("0::")), None)
        if path is None:
            return None
        base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        limit, events = "memory.max", "memory.events"
    try:
        with open(os.path.join(base, limit)) as f:
            value = f.read().strip()
    except OSError:
        return None
    if value == "max" or int(value) >= 1 << 60:  # no limit
        return None
    return os.path.join(base, events), int(value)


def _watch_memory_limit(name: str) -> None:
    """Starts the watchdog that reports a kill past the memory limit."""
    found = _memory_events()
    if found is None:
        return
    events, limit = found
    # Its own session: the launcher's SIGTERM to the worker's process
    # group must not end it before it has looked.
    subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), events,
         name, str(limit >> 20)],
        start_new_session=True, stdin=subprocess.DEVNULL,
    )


def _wait_closed(host_port: tuple[str, int], seconds: float) -> None:
    """Waits until nothing listens at `host_port` (the chief exited)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(host_port, timeout=1.0).close()
        except OSError:
            return
        time.sleep(0.2)


def _listen(sock: socket.socket, timeout: float, liveness: float):
    """Answers the chief until it says done, fails or goes silent.

    Returns:
        (exit code, reason).
    """
    chief = None
    last = time.monotonic()
    while True:
        try:
            data, sender = sock.recvfrom(64)
        except TimeoutError:
            silent = time.monotonic() - last
            if chief is None and silent > timeout:
                return CHIEF_LOST_EXIT_CODE, (
                    f"the chief did not connect within {timeout:g} s "
                    "(join_cluster(timeout=...)); is it running?"
                )
            if chief is not None and silent > liveness:
                return CHIEF_LOST_EXIT_CODE, (
                    f"no heartbeat from the chief for {liveness:g} s: it "
                    "was killed or stalled; exiting so the group restarts."
                )
            continue
        last = time.monotonic()
        if data == _HELLO:
            chief = sender
            sock.sendto(_ACK, sender)
        elif data == _DONE:
            sock.sendto(_ACK, sender)
            return 0, "the chief finished."
        elif data == _FAILED:
            sock.sendto(_ACK, sender)
            return CHIEF_LOST_EXIT_CODE, (
                "the chief failed; exiting so the group restarts."
            )


def _exit(code: int, why: str) -> None:
    log = logging.info if code == 0 else logging.error
    log("kerasdist: model-parallel server exits %d: %s", code, why)
    sys.stdout.flush()
    sys.stderr.flush()
    # The gRPC server cannot be stopped (tf.distribute.Server has no
    # stop()); leave without running its destructor.
    os._exit(code)


class _ChiefControl:
    """The chief's side of the control channels, one per server."""

    def __init__(self, servers: list[_Task], heartbeat: float):
        self.servers = servers
        self.heartbeat = heartbeat
        self.socks = [
            _udp_socket(_family(t.host_port[0])) for t in servers
        ]
        self.stopped = threading.Event()
        self.failed = False

    def greet(self, timeout: float) -> None:
        """Says hello until every server answers, or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        waiting = set(range(len(self.servers)))
        while waiting:
            for i in sorted(waiting):
                if self._ask(i, _HELLO):
                    waiting.discard(i)
            if waiting and time.monotonic() > deadline:
                names = [
                    f"{self.servers[i].job} {self.servers[i].index} at "
                    f"{self.servers[i].address}" for i in sorted(waiting)
                ]
                raise TimeoutError(
                    f"kd.placement.join_cluster(): {', '.join(names)} did "
                    f"not answer within timeout={timeout:g} s. Expected "
                    "every worker to run the same script and call "
                    "join_cluster() first; check that they started (their "
                    "logs) and can reach this host, or raise `timeout` "
                    "for slow starts."
                )

    def _ask(self, i: int, message: bytes) -> bool:
        try:
            self.socks[i].sendto(message, self.servers[i].host_port)
            data, _ = self.socks[i].recvfrom(64)
        except OSError:  # includes timeouts and refused (not yet bound)
            return False
        return data == _ACK

    def start(self) -> None:
        threading.Thread(
            target=self._beat, name="kerasdist-heartbeat", daemon=True
        ).start()
        previous = sys.excepthook

        def excepthook(*args):
            self.failed = True
            previous(*args)

        sys.excepthook = excepthook
        atexit.register(self.finish)

    def _beat(self) -> None:
        while not self.stopped.wait(self.heartbeat):
            for sock, t in zip(self.socks, self.servers, strict=True):
                try:
                    sock.sendto(_ALIVE, t.host_port)
                except OSError:
                    pass

    def finish(self) -> None:
        """Tells every server the chief ended (done, or failed)."""
        self.stopped.set()
        message = _FAILED if self.failed else _DONE
        for i in range(len(self.servers)):
            for _ in range(25):  # 5 s at most per server
                if self._ask(i, message):
                    break

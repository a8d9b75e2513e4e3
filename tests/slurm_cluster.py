"""A real SLURM cluster on this machine, for the SLURM tests.

Writes a `slurm.conf` under a temporary directory and starts, as root,
`munged` (its own socket and PID file), `slurmctld` and one `slurmd` per
emulated node (Debian's slurm-wlm is built with multiple-slurmd support, so
each `slurmd -N nodeX` is a node on its own 127.0.0.x address). Every daemon
is recorded by PID and stopped by PID (`stop()`), even on failure. Ports are
picked free on 127.0.0.1 so a stray SLURM on the machine does not interfere.

`cred_expire=10` (default 120 s): SLURM holds a requeued job for
`cred_expire + 1` seconds before it may start again; 10 s keeps the
requeue tests quick without changing what happens.

Node names are `node9` and `node10` on purpose: string-sorting them puts
`node10` first, which is what TF's `SlurmClusterResolver` gets wrong.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time

NODES = (("node9", "127.0.0.9"), ("node10", "127.0.0.10"))
CPUS_PER_NODE = 2
MUNGE_KEY = "/etc/munge/munge.key"
# Ports SLURM reserves for steps run with `srun --resv-ports` (below the
# Linux ephemeral range, so the kernel does not hand them out).
RESV_PORTS = "28100-28163"
REQUIRED = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol")


def missing() -> str | None:
    """Why SLURM cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the SLURM daemons must be started as root"
    absent = [p for p in REQUIRED if shutil.which(p) is None]
    if absent:
        return (
            f"{', '.join(absent)} not installed (apt-get install slurm-wlm "
            "munge; `make engines` does it)"
        )
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class SlurmCluster:
    """A running SLURM cluster; `env` points clients at it."""

    root: str
    conf: str
    env: dict
    pids: dict = dataclasses.field(default_factory=dict)

    def run(self, *args: str, timeout: float = 60, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        """Runs a SLURM client command against this cluster."""
        return subprocess.run(
            list(args), env={**os.environ, **self.env, **kwargs.pop(
                "extra_env", {})}, capture_output=True, text=True,
            timeout=timeout, check=check, **kwargs
        )

    def job_state(self, job_id: str) -> dict:
        """`scontrol show job` as a dict of its key=value fields."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait_job(self, job_id: str, timeout: float = 300) -> dict:
        """Waits until the job has left the queue; returns its last fields."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state.get("JobState") in (
                "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
            ):
                return state
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(
                    f"SLURM job {job_id} still {state.get('JobState')} "
                    f"after {timeout}s"
                )
            time.sleep(1)

    def stop(self) -> None:
        """Stops every daemon this object started, by PID."""
        for pid in reversed(list(self.pids.values())):
            _stop_pid(pid)
        self.pids.clear()


def _stop_pid(pid: int, grace: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_pid(path: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                text = f.read().strip()
            if text:
                return int(text)
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no PID file {path} after {timeout}s")


def _slurm_conf(root: str, munge_socket: str) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={socket.gethostname()} "
        f"NodeAddr={addr} Port={_free_port()} CPUs={CPUS_PER_NODE} "
        "RealMemory=2000 State=UNKNOWN"
        for name, addr in NODES
    )
    names = ",".join(name for name, _ in NODES)
    return f"""\
ClusterName=kerasdist
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MpiParams=ports={RESV_PORTS}
LaunchParameters=use_interactive_step
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=30
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


def start(root: str, timeout: float = 90) -> SlurmCluster:
    """Starts munged, slurmctld and the slurmds; waits until nodes are idle.

    On any failure everything started so far is stopped before raising.
    """
    os.makedirs(f"{root}/state", exist_ok=True)
    for name, _ in NODES:
        os.makedirs(f"{root}/spool/{name}", exist_ok=True)
    munge_dir = f"{root}/munge"
    os.makedirs(munge_dir, mode=0o700, exist_ok=True)
    munge_socket = f"{munge_dir}/munge.socket"
    conf = f"{root}/slurm.conf"
    with open(conf, "w") as f:
        f.write(_slurm_conf(root, munge_socket))
    cluster = SlurmCluster(root, conf, {"SLURM_CONF": conf})
    try:
        subprocess.run(
            ["munged", "--force", f"--socket={munge_socket}",
             f"--key-file={MUNGE_KEY}", f"--pid-file={munge_dir}/munged.pid",
             f"--log-file={munge_dir}/munged.log",
             f"--seed-file={munge_dir}/munged.seed"],
            check=True, capture_output=True, timeout=30,
        )
        cluster.pids["munged"] = _read_pid(f"{munge_dir}/munged.pid")
        subprocess.run(
            ["slurmctld", "-f", conf, "-i"], check=True,
            capture_output=True, timeout=30,
        )
        cluster.pids["slurmctld"] = _read_pid(f"{root}/slurmctld.pid")
        for name, _ in NODES:
            subprocess.run(
                ["slurmd", "-f", conf, "-N", name], check=True,
                capture_output=True, timeout=30,
            )
            cluster.pids[f"slurmd-{name}"] = _read_pid(
                f"{root}/slurmd-{name}.pid"
            )
        _wait_idle(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        res = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        out = res.stdout + res.stderr
        states = dict(
            line.split() for line in res.stdout.splitlines() if line.strip()
        )
        if len(states) == len(NODES) and all(
            s == "idle" for s in states.values()
        ):
            return
        time.sleep(0.5)
    logs = ""
    for name in ("slurmctld.log",):
        try:
            with open(os.path.join(cluster.root, name)) as f:
                logs += f.read()[-3000:]
        except OSError:
            pass
    raise TimeoutError(
        f"SLURM nodes not idle after {timeout}s: {out!r}\n{logs}"
    )

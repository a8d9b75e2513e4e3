"""SLURM: the cluster of the current job step, from SLURM's variables.

Reads the job-*step* variables that `srun` sets in every task
(`SLURM_STEP_NODELIST`, `SLURM_STEP_NUM_TASKS`, `SLURM_STEP_TASKS_PER_NODE`,
`SLURM_PROCID`, `SLURM_LOCALID`), not the job's (`SLURM_JOB_NODELIST` is
wrong once a step runs on fewer nodes than the allocation). Unlike
`tf.distribute.cluster_resolver.SlurmClusterResolver` it

- keeps SLURM's rank order: nodes in the step's node-list order (SLURM's
  hostlist order is numeric, `node9` before `node10`; TF sorts names as
  strings) and ranks placed by `SLURM_DISTRIBUTION` (block or cyclic);
- needs no GPU and no `nvidia-smi` (tensorflow/tensorflow#56894);
- gives every task its own port (`rank_ports`): the ports SLURM reserved
  for the step when `srun --resv-ports` is used (concurrent jobs on a node
  then cannot collide), distinct per task on a node.

Addresses are each node's `NodeAddr` (what SLURM itself uses to reach the
node; it defaults to the node name) from `scontrol show node`, or the node
names when `scontrol` is not available.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping

from kerasdist._validate import env_int
from kerasdist.cluster.tf_config import ClusterConfigError, TaskInfo

__all__ = [
    "ENV_PORT_BASE",
    "ENV_RESV_PORTS",
    "expand_hostlist",
    "expand_tasks_per_node",
    "from_slurm",
    "rank_hosts",
    "rank_ports",
]

# Ports (see `rank_ports`): an explicit base (rank r on base + r), else
# the ports SLURM reserved for the step (`srun --resv-ports`), else a
# default from SLURM_JOB_ID in [_DEFAULT_LOW, _DEFAULT_LOW + _DEFAULT_SPAN).
ENV_PORT_BASE = "KERASDIST_PORT_BASE"
ENV_RESV_PORTS = "SLURM_STEP_RESV_PORTS"
_DEFAULT_LOW = 20000
_DEFAULT_SPAN = 40000


def expand_hostlist(hostlist: str, *, use_scontrol: bool = True) -> list[str]:
    """Expands a SLURM hostlist such as `node[9-10,12],login1`.

    Uses `scontrol show hostnames` when it is installed (SLURM's own
    parser), else a pure-Python expander that handles comma lists, ranges,
    zero padding (`n[08-10]`) and several bracket groups per name.

    Args:
        hostlist: str. A compressed SLURM hostlist.
        use_scontrol: bool. Ask `scontrol` when available. Defaults to True.

    Returns:
        list of str, in SLURM's order.

    Raises:
        ClusterConfigError: if `hostlist` is empty or malformed.

    Example:

    >>> expand_hostlist("node[9-10,12],login1", use_scontrol=False)
    ['node9', 'node10', 'node12', 'login1']
    """
    if not hostlist or not hostlist.strip():
        raise ClusterConfigError(
            "The SLURM hostlist is empty. Received: hostlist="
            f"{hostlist!r}. Expected e.g. 'node[1-4]'."
        )
    if use_scontrol and shutil.which("scontrol"):
        return list(_scontrol_hostnames(hostlist))
    return _expand_python(hostlist)


@functools.lru_cache(maxsize=32)
def _scontrol_hostnames(hostlist: str) -> tuple[str, ...]:
    try:
        res = subprocess.run(
            ["scontrol", "show", "hostnames", hostlist],
            capture_output=True, text=True, timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return tuple(_expand_python(hostlist))
    if res.returncode != 0 or not res.stdout.split():
        # scontrol without a reachable configuration: parse it ourselves.
        return tuple(_expand_python(hostlist))
    return tuple(res.stdout.split())


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                break
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ClusterConfigError(
            f"Unbalanced brackets in the SLURM hostlist {text!r}. Expected "
            "e.g. 'node[1-4,7]'."
        )
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_range(body: str, hostlist: str) -> list[str]:
    """'9-10,12' -> ['9', '10', '12'], keeping zero padding."""
    out = []
    for item in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise ClusterConfigError(
                f"Malformed range {item!r} in the SLURM hostlist "
                f"{hostlist!r}. Expected numbers or ranges like '1-4'."
            )
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ClusterConfigError(
                f"Descending range {item!r} in the SLURM hostlist "
                f"{hostlist!r}."
            )
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _expand_python(hostlist: str) -> list[str]:
    hosts: list[str] = []
    for part in _split_top_level(hostlist.strip()):
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = [
            _expand_range(p[1:-1], hostlist) if p.startswith("[") else [p]
            for p in pieces
            if p
        ]
        hosts.extend("".join(c) for c in itertools.product(*choices))
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expands `SLURM_STEP_TASKS_PER_NODE`, e.g. `"2(x3),1"`.

    Args:
        spec: str. SLURM's compressed count list.

    Returns:
        list of int, one count per node.

    Raises:
        ClusterConfigError: if `spec` is malformed.

    Example:

    >>> expand_tasks_per_node("2(x3),1")
    [2, 2, 2, 1]
    """
    counts: list[int] = []
    for item in (spec or "").split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match or int(match.group(1)) < 1:
            raise ClusterConfigError(
                "SLURM_STEP_TASKS_PER_NODE is malformed. Received: "
                f"SLURM_STEP_TASKS_PER_NODE={spec!r}. Expected counts like "
                "'2(x3),1'."
            )
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def rank_hosts(
    hosts: list[str], tasks_per_node: list[int], distribution: str = "block"
) -> list[tuple[str, int]]:
    """Which node and local slot each rank runs on, as SLURM places them.

    Args:
        hosts: list of str. The step's nodes in SLURM's order.
        tasks_per_node: list of int. Tasks on each of those nodes.
        distribution: str. The first field of `SLURM_DISTRIBUTION`:
            `"block"` (SLURM's default: consecutive ranks fill a node) or
            `"cyclic"` (ranks go round the nodes). Defaults to `"block"`.

    Returns:
        list of (host, local index) tuples, indexed by rank.

    Raises:
        ClusterConfigError: for another distribution.

    Example:

    >>> rank_hosts(["node9", "node10"], [2, 1])
    [('node9', 0), ('node9', 1), ('node10', 0)]
    """
    if distribution == "block":
        return [
            (host, local)
            for host, count in zip(hosts, tasks_per_node, strict=True)
            for local in range(count)
        ]
    if distribution == "cyclic":
        placed: list[tuple[str, int]] = []
        used = [0] * len(hosts)
        while len(placed) < sum(tasks_per_node):
            for i, host in enumerate(hosts):
                if used[i] < tasks_per_node[i]:
                    placed.append((host, used[i]))
                    used[i] += 1
        return placed
    raise ClusterConfigError(
        "SLURM_DISTRIBUTION is not supported. Received: "
        f"SLURM_DISTRIBUTION={distribution!r}. Expected 'block' (the "
        "default) or 'cyclic'; run srun with --distribution=block."
    )


def _get(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ClusterConfigError(
            f"{name} is not set, but SLURM_PROCID is: this looks like a "
            "SLURM task started outside a job step. Start the workers with "
            "`srun` inside the job (sbatch/salloc), which sets "
            f"{name}, or set TF_CONFIG yourself."
        )
    return value


def _get_int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int:
    _get(environ, name)  # set and not blank, or an error naming it
    return env_int(name, minimum=minimum, environ=environ,
                   error=ClusterConfigError)


def _port_range(raw: str) -> list[int]:
    """SLURM's port list, e.g. '12000-12001,12005' -> [12000, 12001, 12005]."""
    ports: list[int] = []
    for item in raw.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", item)
        if not match:
            raise ClusterConfigError(
                f"{ENV_RESV_PORTS} is malformed. Received: "
                f"{ENV_RESV_PORTS}={raw!r}. Expected ports like "
                "'12000-12003'."
            )
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        ports.extend(range(lo, hi + 1))
    return ports


def _explicit_base(raw: str, num_tasks: int) -> int:
    if not raw.isdigit() or not 1024 <= int(raw) <= 65536 - num_tasks:
        raise ClusterConfigError(
            f"{ENV_PORT_BASE} must be a port number in [1024, "
            f"{65536 - num_tasks}] (rank r uses {ENV_PORT_BASE} + r, "
            f"{num_tasks} tasks). Received: {ENV_PORT_BASE}={raw!r}."
        )
    return int(raw)


def rank_ports(
    environ: Mapping[str, str], placed: list[tuple[str, int]]
) -> list[int]:
    """The port of every rank of the step, in rank order.

    In order of precedence:

    1. `KERASDIST_PORT_BASE`: rank r listens on base + r (one value per
       job: the same base in two jobs sharing a node collides);
    2. `SLURM_STEP_RESV_PORTS` (`srun --resv-ports=N`, with
       `MpiParams=ports=LOW-HIGH` in slurm.conf): SLURM reserves the same
       ports on every node of the step and gives none of them to another
       step on those nodes while it runs, so concurrent jobs cannot
       collide. With at least one port per task rank r takes the r-th
       (distinct even for emulated nodes sharing one machine), else the
       task with local index i on a node takes the i-th;
    3. otherwise a default from `SLURM_JOB_ID`: rank r of an N-task step
       listens on `20000 + (job_id * N + r) mod 40000`. Jobs of N tasks
       collide only when their ids differ by a multiple of 40000 / N
       (the old default, `15000 + (job_id mod 25) * 2000 + r`, collided
       every 25 ids); use 2. where the site allows.

    Args:
        environ: mapping. The task's environment.
        placed: list of (host, local index), indexed by rank
            (`rank_hosts`).

    Returns:
        list of int.

    Raises:
        ClusterConfigError: on a malformed variable, or fewer reserved
            ports than tasks on a node.

    Example:

    >>> rank_ports({"SLURM_STEP_RESV_PORTS": "12000-12002"},
    ...            [("node9", 0), ("node9", 1), ("node10", 0)])
    [12000, 12001, 12002]
    >>> rank_ports({"SLURM_STEP_RESV_PORTS": "12000-12001"},
    ...            [("node9", 0), ("node9", 1), ("node10", 0)])
    [12000, 12001, 12000]
    """
    raw = environ.get(ENV_PORT_BASE, "").strip()
    num_tasks = len(placed)
    if raw:
        base = _explicit_base(raw, num_tasks)
        return [base + r for r in range(num_tasks)]
    reserved = environ.get(ENV_RESV_PORTS, "").strip()
    if reserved:
        ports = _port_range(reserved)
        if len(ports) >= num_tasks:
            return ports[:num_tasks]
        per_node = 1 + max(local for _, local in placed)
        if len(ports) < per_node:
            raise ClusterConfigError(
                f"{ENV_RESV_PORTS}={reserved!r} reserves {len(ports)} "
                f"port(s), but {per_node} tasks run on one node. Run "
                f"`srun --resv-ports={num_tasks}` (or at least "
                f"{per_node})."
            )
        return [ports[local] for _, local in placed]
    job = environ.get("SLURM_JOB_ID", "0").strip()
    job_id = int(job) if job.isdigit() else 0
    return [
        _DEFAULT_LOW + (job_id * num_tasks + r) % _DEFAULT_SPAN
        for r in range(num_tasks)
    ]


@functools.lru_cache(maxsize=32)
def _node_addresses(nodelist: str) -> dict[str, str]:
    """NodeName -> NodeAddr from `scontrol show node` ({} if unavailable)."""
    if not shutil.which("scontrol"):
        return {}
    try:
        res = subprocess.run(
            ["scontrol", "-o", "show", "node", nodelist],
            capture_output=True, text=True, timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in res.stdout.splitlines():
        name = re.search(r"\bNodeName=(\S+)", line)
        addr = re.search(r"\bNodeAddr=(\S+)", line)
        if name and addr:
            found[name.group(1)] = addr.group(1)
    return found


def from_slurm(environ: Mapping[str, str] | None = None) -> TaskInfo | None:
    """The cluster of this SLURM job step, or None outside SLURM.

    Args:
        environ: mapping or None. Environment to read; defaults to
            `os.environ`.

    Returns:
        A `TaskInfo` with `source="slurm"` (one `"worker"` per task, in
        rank order, task index = `SLURM_PROCID`), or None when
        `SLURM_PROCID` is not set.

    Raises:
        ClusterConfigError: if a step variable is missing, malformed or
            contradicts another (e.g. `SLURM_STEP_NUM_TASKS` not the sum of
            `SLURM_STEP_TASKS_PER_NODE`, `SLURM_PROCID` out of range, or
            `SLURM_LOCALID` not where SLURM would place this rank).

    Example:

    >>> info = from_slurm({
    ...     "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
    ...     "SLURM_STEP_NODELIST": "node[9-10]",
    ...     "SLURM_STEP_NUM_TASKS": "3",
    ...     "SLURM_STEP_TASKS_PER_NODE": "2,1",
    ...     "KERASDIST_PORT_BASE": "12345"})
    >>> info.address
    'node10:12347'
    """
    environ = os.environ if environ is None else environ
    if not environ.get("SLURM_PROCID", "").strip():
        return None
    rank = _get_int(environ, "SLURM_PROCID")
    num_tasks = _get_int(environ, "SLURM_STEP_NUM_TASKS", minimum=1)
    nodelist = _get(environ, "SLURM_STEP_NODELIST")
    hosts = expand_hostlist(nodelist)
    counts = expand_tasks_per_node(_get(environ, "SLURM_STEP_TASKS_PER_NODE"))
    _check_consistent(hosts, counts, num_tasks, rank, nodelist)
    distribution = environ.get("SLURM_DISTRIBUTION", "block").split(":")[0]
    placed = rank_hosts(hosts, counts, distribution or "block")
    _check_local_id(environ, placed[rank], rank)
    ports = rank_ports(environ, placed)
    addresses = _node_addresses(nodelist) if num_tasks > 1 else {}
    workers = [
        f"{addresses.get(host, host)}:{port}"
        for (host, _), port in zip(placed, ports, strict=True)
    ]
    return TaskInfo("worker", rank, {"worker": workers}, source="slurm")


def _check_consistent(
    hosts: list[str], counts: list[int], num_tasks: int, rank: int,
    nodelist: str,
) -> None:
    if len(hosts) != len(counts):
        raise ClusterConfigError(
            "SLURM_STEP_TASKS_PER_NODE and SLURM_STEP_NODELIST disagree: "
            f"{len(counts)} count(s) for {len(hosts)} node(s) "
            f"(SLURM_STEP_NODELIST={nodelist!r} = {hosts}). They must come "
            "from the same job step."
        )
    if sum(counts) != num_tasks:
        raise ClusterConfigError(
            "SLURM_STEP_NUM_TASKS and SLURM_STEP_TASKS_PER_NODE disagree: "
            f"SLURM_STEP_NUM_TASKS={num_tasks} but the per-node counts "
            f"{counts} sum to {sum(counts)}."
        )
    if not 0 <= rank < num_tasks:
        raise ClusterConfigError(
            f"SLURM_PROCID={rank} is out of range for "
            f"SLURM_STEP_NUM_TASKS={num_tasks}: expected 0 to "
            f"{num_tasks - 1}."
        )


def _check_local_id(
    environ: Mapping[str, str], placed: tuple[str, int], rank: int
) -> None:
    node = environ.get("SLURMD_NODENAME", "").strip()
    if node and node != placed[0]:
        raise ClusterConfigError(
            f"SLURMD_NODENAME={node!r} contradicts SLURM_PROCID={rank}: with "
            "the step's SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE and "
            f"SLURM_DISTRIBUTION, rank {rank} runs on {placed[0]!r}. Use "
            "srun's default --distribution=block or cyclic, or set "
            "TF_CONFIG yourself."
        )
    raw = environ.get("SLURM_LOCALID", "").strip()
    if not raw:
        return
    if not raw.isdigit() or int(raw) != placed[1]:
        raise ClusterConfigError(
            f"SLURM_LOCALID={raw!r} contradicts SLURM_PROCID={rank}: with "
            "the step's SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE and "
            f"SLURM_DISTRIBUTION, rank {rank} is task {placed[1]} on "
            f"{placed[0]}. Use srun's default --distribution=block or "
            "cyclic, or set TF_CONFIG yourself."
        )

"""`TF_CONFIG`: read, validate and write it; `TaskInfo`.

`TF_CONFIG` is the JSON environment variable through which TensorFlow learns
the cluster (every task's address) and which task this process is. kerasdist
validates it up front so a typo is reported in words before TensorFlow starts
a gRPC server and hangs waiting for a peer that does not exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from kerasdist.errors import PermanentError

__all__ = [
    "ClusterConfigError",
    "TaskInfo",
    "TFConfigError",
    "free_ports",
    "from_env",
    "make_tf_config",
]

# Task types that run training steps. "evaluator" runs side-car evaluation and
# "ps" holds variables for ParameterServerStrategy; neither is a replica.
_TRAINING_TYPES = ("chief", "worker")
_KNOWN_TYPES = ("chief", "worker", "evaluator", "ps")


class ClusterConfigError(PermanentError, ValueError):
    """The environment describes the cluster wrongly.

    Raised for a malformed or contradictory `TF_CONFIG`, SLURM, Kubernetes
    or Ray environment; the message names the variable, the value received
    and the fix. It is a `kerasdist.errors.PermanentError`: restarting the
    worker cannot fix it, so recovery does not retry it.

    Example:

    >>> issubclass(ClusterConfigError, ValueError)
    True
    """


class TFConfigError(ClusterConfigError):
    """`TF_CONFIG` is malformed; the message names the problem and the fix.

    Example:

    >>> issubclass(TFConfigError, ClusterConfigError)
    True
    """


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What this process is in the cluster.

    Args:
        task_type: str. `"chief"`, `"worker"`, `"evaluator"` or `"ps"`.
            Defaults to `"worker"`.
        task_index: int. Index of this task among tasks of its type.
            Defaults to `0`.
        cluster: dict. Task type to list of `"host:port"` addresses, as in
            `TF_CONFIG["cluster"]`. Empty when running alone. Defaults to
            `{}`.
        source: str. Where the description came from: `"tf_config"`,
            `"slurm"`, `"kubernetes"`, `"ray"` or `"single"` (nothing found:
            one worker alone). Not compared by `==`. Defaults to
            `"single"`.

    Example:

    >>> info = TaskInfo("worker", 1, {"worker": ["a:1", "b:2"]})
    >>> info.num_workers, info.is_chief
    (2, False)
    """

    task_type: str = "worker"
    task_index: int = 0
    cluster: Mapping[str, Sequence[str]] = dataclasses.field(
        default_factory=dict
    )
    source: str = dataclasses.field(default="single", compare=False)

    @property
    def num_workers(self) -> int:
        """Number of training tasks (chief plus workers); at least 1."""
        n = sum(len(self.cluster.get(t, ())) for t in _TRAINING_TYPES)
        return max(n, 1)

    @property
    def worker_rank(self) -> int:
        """This task's rank among training tasks (the chief is rank 0)."""
        if self.task_type == "chief":
            return 0
        return len(self.cluster.get("chief", ())) + self.task_index

    @property
    def is_chief(self) -> bool:
        """True for the task that writes checkpoints, logs and summaries.

        That is the `"chief"` task if the cluster has one, else worker 0.
        """
        if self.task_type == "chief":
            return True
        return (
            self.task_type == "worker"
            and self.task_index == 0
            and not self.cluster.get("chief")
        )

    @property
    def is_multi_worker(self) -> bool:
        """True when the cluster has more than one training task."""
        return self.num_workers > 1

    def to_tf_config(self) -> dict:
        """This description as a `TF_CONFIG` dict.

        Returns:
            dict, ready for `json.dumps`; `{}` when running alone.

        Example:

        >>> info = TaskInfo("worker", 1, {"worker": ["a:1", "b:2"]})
        >>> info.to_tf_config()["task"]
        {'type': 'worker', 'index': 1}
        """
        if not self.cluster:
            return {}
        return {
            "cluster": {k: list(v) for k, v in self.cluster.items()},
            "task": {"type": self.task_type, "index": self.task_index},
        }

    @property
    def address(self) -> str | None:
        """This task's `"host:port"`, or None when running alone."""
        tasks = self.cluster.get(self.task_type)
        return tasks[self.task_index] if tasks else None


def from_env(environ: Mapping[str, str] | None = None) -> TaskInfo:
    """Reads and validates `TF_CONFIG` from the environment.

    Args:
        environ: mapping or None. Environment to read; defaults to
            `os.environ`.

    Returns:
        A `TaskInfo`. Without `TF_CONFIG` (or with an empty one) this is a
        single worker that is its own chief.

    Raises:
        TFConfigError: if `TF_CONFIG` is not valid JSON, has no `cluster`,
            names a task type or index that is not in the cluster, repeats an
            address, or has an address that is not `host:port`.

    Example:

    >>> info = from_env({"TF_CONFIG": json.dumps({
    ...     "cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]},
    ...     "task": {"type": "worker", "index": 0}})})
    >>> info.num_workers, info.is_chief
    (2, True)
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        return TaskInfo()
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TFConfigError(
            f"TF_CONFIG is not valid JSON ({e.msg} at position {e.pos}). "
            f"Received: TF_CONFIG={raw!r}. Expected e.g. "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}. '
            "Use kerasdist.cluster.make_tf_config() to build one."
        ) from None
    return parse(config)


def parse(config: Any) -> TaskInfo:
    """Validates a decoded `TF_CONFIG` dict; see `from_env`.

    Args:
        config: dict. The decoded `TF_CONFIG`.

    Returns:
        A `TaskInfo`.

    Raises:
        TFConfigError: as for `from_env`.

    Example:

    >>> parse({"cluster": {"worker": ["h:1"]},
    ...        "task": {"type": "worker", "index": 0}}).num_workers
    1
    """
    if not isinstance(config, dict):
        raise TFConfigError(
            "TF_CONFIG must be a JSON object with keys 'cluster' and 'task'. "
            f"Received: {config!r}."
        )
    cluster = _parse_cluster(config)
    task_type, index = _parse_task(config.get("task"), cluster)
    return TaskInfo(task_type, index, cluster, source="tf_config")


def _parse_cluster(config: dict) -> dict[str, list[str]]:
    """The validated `cluster` of a decoded TF_CONFIG."""
    cluster = config.get("cluster")
    if not cluster:
        raise TFConfigError(
            "TF_CONFIG has no 'cluster'. "
            f"Received: TF_CONFIG={json.dumps(config)}. Expected a 'cluster' "
            'mapping task types to addresses, e.g. {"worker": '
            '["host1:port", "host2:port"]}.'
        )
    if not isinstance(cluster, dict):
        raise TFConfigError(
            "TF_CONFIG 'cluster' must map task types to lists of addresses. "
            f"Received: cluster={cluster!r}."
        )
    clean = {
        task_type: _parse_addresses(task_type, addresses)
        for task_type, addresses in cluster.items()
    }
    _check_unique(clean)
    if len(clean.get("chief", ())) > 1:
        raise TFConfigError(
            "TF_CONFIG cluster may have at most one 'chief'. "
            f"Received: chief={clean['chief']!r}."
        )
    if not any(clean.get(t) for t in _TRAINING_TYPES):
        raise TFConfigError(
            "TF_CONFIG cluster has no 'worker' or 'chief' task. "
            f"Received: cluster={json.dumps(cluster)}."
        )
    return clean


def _parse_addresses(task_type: Any, addresses: Any) -> list[str]:
    """One task type's address list, each checked as `host:port`."""
    if task_type not in _KNOWN_TYPES:
        raise TFConfigError(
            f"TF_CONFIG cluster has an unknown task type {task_type!r}. "
            f"Expected some of {list(_KNOWN_TYPES)}."
        )
    if isinstance(addresses, str) or not isinstance(addresses, (list, tuple)):
        raise TFConfigError(
            f"TF_CONFIG cluster[{task_type!r}] must be a list of "
            f"'host:port' strings. Received: {addresses!r}."
        )
    for i, address in enumerate(addresses):
        _check_address(address, f"cluster[{task_type!r}][{i}]")
    return list(addresses)


def _check_unique(cluster: dict[str, list[str]]) -> None:
    """Every task has its own address."""
    seen: dict[str, str] = {}
    for task_type, addresses in cluster.items():
        for i, address in enumerate(addresses):
            where = f"{task_type}:{i}"
            if address in seen:
                raise TFConfigError(
                    f"TF_CONFIG gives the same address {address!r} to "
                    f"{seen[address]} and {where}. Every task needs its own "
                    "host:port."
                )
            seen[address] = where


def _parse_task(task: Any, cluster: dict[str, list[str]]) -> tuple[str, int]:
    """This task's (type, index), checked against the cluster."""
    if not isinstance(task, dict) or "type" not in task:
        raise TFConfigError(
            "TF_CONFIG has no 'task' with a 'type' and an 'index'. "
            f"Received: task={task!r}. Expected e.g. "
            '{"type": "worker", "index": 0}.'
        )
    task_type = task["type"]
    index = task.get("index", 0)
    if task_type not in cluster:
        raise TFConfigError(
            f"TF_CONFIG task type {task_type!r} is not in the cluster, "
            f"which has {sorted(cluster)}."
        )
    if isinstance(index, bool) or not isinstance(index, int):
        raise TFConfigError(
            f"TF_CONFIG task index must be an integer. Received: "
            f"index={index!r}."
        )
    if not 0 <= index < len(cluster[task_type]):
        raise TFConfigError(
            f"TF_CONFIG task index {index} is out of range: cluster has "
            f"{len(cluster[task_type])} {task_type!r} task(s), so the index "
            f"must be in [0, {len(cluster[task_type]) - 1}]."
        )
    return task_type, index


def _check_address(address: Any, where: str) -> None:
    ok = isinstance(address, str) and ":" in address
    if ok:
        host, _, port = address.rpartition(":")
        ok = bool(host) and port.isdigit() and 0 < int(port) < 65536
    if not ok:
        raise TFConfigError(
            f"TF_CONFIG {where} is not a 'host:port' address. "
            f"Received: {address!r}. Expected e.g. '10.0.0.2:2222'."
        )


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Finds `n` distinct TCP ports that are free on `host` right now.

    The sockets are held open until all `n` are found so the same port is
    never returned twice. Another process may still take a port before it is
    used; the launcher handles that by restarting the group.

    Args:
        n: int. How many ports.
        host: str. Interface to bind. Defaults to `"127.0.0.1"`.

    Returns:
        list of int.

    Example:

    >>> len(set(free_ports(3)))
    3
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_tf_config(
    workers: int | Sequence[str],
    task_index: int,
    *,
    task_type: str = "worker",
    chief: str | None = None,
    host: str = "127.0.0.1",
) -> dict:
    """Builds a valid `TF_CONFIG` dict.

    Args:
        workers: int or list of str. The worker addresses, or a count, in
            which case that many free ports on `host` are picked.
        task_index: int. This task's index among tasks of `task_type`.
        task_type: str. `"worker"` or `"chief"`. Defaults to `"worker"`.
        chief: str or None. Address of a separate chief task. Defaults to
            None (worker 0 acts as chief).
        host: str. Host used when `workers` is a count. Defaults to
            `"127.0.0.1"`.

    Returns:
        dict, ready for `os.environ["TF_CONFIG"] = json.dumps(...)`.

    Raises:
        TFConfigError: if the result would be invalid (e.g. index out of
            range, duplicate addresses).

    Example:

    >>> cfg = make_tf_config(["127.0.0.1:2222", "127.0.0.1:2223"], 1)
    >>> cfg["task"]
    {'type': 'worker', 'index': 1}
    """
    if isinstance(workers, int):
        if workers < 1:
            raise TFConfigError(
                f"Invalid value for argument `workers`. Received: "
                f"workers={workers}. Expected a positive count or a list of "
                "'host:port' addresses."
            )
        workers = [f"{host}:{p}" for p in free_ports(workers, host)]
    cluster: dict[str, list[str]] = {"worker": list(workers)}
    if chief is not None:
        cluster["chief"] = [chief]
    config = {
        "cluster": cluster,
        "task": {"type": task_type, "index": task_index},
    }
    parse(config)  # Validate now rather than in TF's gRPC server.
    return config

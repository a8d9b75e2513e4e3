"""Kubernetes: the cluster of an Indexed Job or JobSet pod.

An Indexed Job (and each Job of a JobSet) gives every pod
`JOB_COMPLETION_INDEX` and a stable host name: `<job>-<index>` for a plain
Indexed Job, `<jobset>-<replicated job>-<job index>-<index>` under JobSet.
With the pod template's `subdomain` set to a headless Service, each pod is
reachable at `<hostname>.<subdomain>`. The pod does not know how many pods
its Job has, so kerasdist's manifests (`deploy/kubernetes/`) put it in
`KERASDIST_NUM_WORKERS`, next to `KERASDIST_K8S_SUBDOMAIN` (the headless
Service) and optionally `KERASDIST_K8S_PORT`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

from kerasdist._validate import env_int
from kerasdist.cluster.tf_config import ClusterConfigError, TaskInfo

# The count is the same variable kerasdist-run sets in its workers.
from kerasdist.launch.protocol import ENV_NUM_WORKERS

__all__ = [
    "DEFAULT_PORT",
    "ENV_NUM_WORKERS",
    "ENV_PORT",
    "ENV_SUBDOMAIN",
    "from_kubernetes",
]

ENV_SUBDOMAIN = "KERASDIST_K8S_SUBDOMAIN"
ENV_PORT = "KERASDIST_K8S_PORT"
DEFAULT_PORT = 2222
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _int_var(environ: Mapping[str, str], name: str, minimum: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        raise ClusterConfigError(
            f"{name} is not set, but JOB_COMPLETION_INDEX is: this pod is "
            "part of an Indexed Job, which does not tell a pod how many "
            f"pods it has. Set {name} in the pod template to the Job's "
            "`completions` (deploy/kubernetes/ does)."
        )
    return env_int(name, minimum=minimum, environ=environ,
                   error=ClusterConfigError)


def _peer_prefix(hostname: str, index: int) -> str:
    """`trainer-workers-0-3` with index 3 -> `trainer-workers-0`."""
    suffix = f"-{index}"
    if not hostname.endswith(suffix) or len(hostname) == len(suffix):
        raise ClusterConfigError(
            f"The pod host name {hostname!r} does not end with "
            f"'-{index}' (JOB_COMPLETION_INDEX={index}). kerasdist expects "
            "an Indexed Job's stable pod host names, '<job>-<index>' "
            "(JobSet: '<jobset>-<job>-<job index>-<index>'); do not set "
            "`hostname` in the pod template, or set TF_CONFIG yourself."
        )
    return hostname[: -len(suffix)]


def from_kubernetes(
    environ: Mapping[str, str] | None = None,
) -> TaskInfo | None:
    """The cluster of this Indexed Job / JobSet pod, or None elsewhere.

    Args:
        environ: mapping or None. Environment to read; defaults to
            `os.environ`. The pod's host name is `HOSTNAME` (set in every
            container), else `socket.gethostname()`.

    Returns:
        A `TaskInfo` with `source="kubernetes"`: worker i at
        `<job prefix>-<i>.<subdomain>:<port>`, task index =
        `JOB_COMPLETION_INDEX`; or None when `JOB_COMPLETION_INDEX` is not
        set.

    Raises:
        ClusterConfigError: if `KERASDIST_NUM_WORKERS` or
            `KERASDIST_K8S_SUBDOMAIN` is missing (with more than one
            worker), a value is malformed, the index is out of range, or
            the host name does not match the index.

    Example:

    >>> info = from_kubernetes({
    ...     "JOB_COMPLETION_INDEX": "1", "HOSTNAME": "train-workers-0-1",
    ...     "KERASDIST_NUM_WORKERS": "2", "KERASDIST_K8S_SUBDOMAIN": "train"})
    >>> info.cluster["worker"]
    ['train-workers-0-0.train:2222', 'train-workers-0-1.train:2222']
    """
    environ = os.environ if environ is None else environ
    index = env_int("JOB_COMPLETION_INDEX", environ=environ,
                    error=ClusterConfigError)
    if index is None:
        return None
    count = _int_var(environ, ENV_NUM_WORKERS, minimum=1)
    if index >= count:
        raise ClusterConfigError(
            f"JOB_COMPLETION_INDEX={index} is out of range for "
            f"{ENV_NUM_WORKERS}={count}: expected 0 to {count - 1}. Set "
            f"{ENV_NUM_WORKERS} to the Job's `completions`."
        )
    if count == 1:
        return TaskInfo("worker", 0, {}, source="kubernetes")
    port = _port(environ)
    subdomain = environ.get(ENV_SUBDOMAIN, "").strip()
    if not _DNS_LABEL.fullmatch(subdomain):
        raise ClusterConfigError(
            f"{ENV_SUBDOMAIN} must name the headless Service that is the pod "
            f"template's `subdomain` (a DNS label). Received: "
            f"{ENV_SUBDOMAIN}={subdomain!r}."
        )
    hostname = (
        environ.get("HOSTNAME", "").strip() or socket.gethostname()
    ).split(".")[0]
    prefix = _peer_prefix(hostname, index)
    workers = [f"{prefix}-{i}.{subdomain}:{port}" for i in range(count)]
    return TaskInfo("worker", index, {"worker": workers}, source="kubernetes")


def _port(environ: Mapping[str, str]) -> int:
    raw = environ.get(ENV_PORT, "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ClusterConfigError(
            f"{ENV_PORT} must be a port number in [1, 65535]. Received: "
            f"{ENV_PORT}={raw!r}."
        )
    return int(raw)

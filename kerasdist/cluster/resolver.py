"""`resolve()`: one answer to "where am I?" over every source."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

from absl import logging

from kerasdist.cluster import kubernetes, ray, slurm, tf_config
from kerasdist.cluster.tf_config import TaskInfo

__all__ = ["SOURCES", "is_chief", "resolve"]

# The order in which `resolve()` looks; the first that applies wins.
SOURCES = ("tf_config", "slurm", "kubernetes", "ray")
_logged: set[tuple] = set()
# TF_CONFIG values `resolve()` exported -> the source they came from, so a
# later `resolve()` reading them back reports (and logs) that source, once.
_exported: dict[str, str] = {}


def resolve(
    environ: Mapping[str, str] | None = None, *, export: bool = True
) -> TaskInfo:
    """Finds this process's place in the cluster, from the first source set.

    Looks, in order, at:

    1. `TF_CONFIG` (set by `kerasdist-run`, TFJob, Ray's TensorFlow backend
       or by hand); inside a Ray Train worker it is checked against Ray's
       world rank and size and reported as `"ray"`;
    2. SLURM job-step variables (`SLURM_PROCID` inside `srun`);
    3. a Kubernetes Indexed Job / JobSet pod (`JOB_COMPLETION_INDEX`);
    4. a Ray Train worker without `TF_CONFIG` (one worker only);

    and otherwise returns one worker alone (`source="single"`). The chief
    logs which source it used.

    Args:
        environ: mapping or None. Environment to read; defaults to
            `os.environ`.
        export: bool. When the cluster came from SLURM or Kubernetes and
            has several workers, also write it to `os.environ["TF_CONFIG"]`
            (only when `environ` is None), so TensorFlow and every other
            reader of `TF_CONFIG` agree. Defaults to True.

    Returns:
        A `TaskInfo`; its `source` says where it came from.

    Raises:
        kerasdist.cluster.ClusterConfigError: naming the variable, when the
            source found is malformed or contradicts itself
            (`TFConfigError` for `TF_CONFIG`).

    Example:

    >>> info = resolve({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
    ...                 "SLURM_STEP_NODELIST": "node9",
    ...                 "SLURM_STEP_TASKS_PER_NODE": "2",
    ...                 "KERASDIST_PORT_BASE": "12345"})
    >>> info.source, info.address
    ('slurm', 'node9:12346')
    """
    use_os = environ is None
    environ = os.environ if use_os else environ
    info = _find(environ)
    origin = _exported.get(environ.get("TF_CONFIG", ""))
    if info.source == "tf_config" and origin is not None:
        info = dataclasses.replace(info, source=origin)
    if export and use_os and info.source in ("slurm", "kubernetes") and (
        info.is_multi_worker
    ):
        exported = json.dumps(info.to_tf_config())
        _exported[exported] = info.source
        os.environ["TF_CONFIG"] = exported
    _log_once(info)
    return info


def _find(environ: Mapping[str, str]) -> TaskInfo:
    from_tf_config = None
    if environ.get("TF_CONFIG", "").strip():
        from_tf_config = tf_config.from_env(environ)
    in_ray = ray.from_ray(from_tf_config)
    if in_ray is not None:
        return in_ray
    if from_tf_config is not None:
        return from_tf_config
    for find in (slurm.from_slurm, kubernetes.from_kubernetes):
        info = find(environ)
        if info is not None:
            return info
    return TaskInfo()


def _log_once(info: TaskInfo) -> None:
    key = (info.source, info.worker_rank, info.num_workers)
    if not info.is_chief or key in _logged:
        return
    _logged.add(key)
    logging.info(
        "kerasdist: cluster from %s: %d worker(s), this is worker %d",
        info.source, info.num_workers, info.worker_rank,
    )


def is_chief(environ: Mapping[str, str] | None = None) -> bool:
    """True if this process is the chief (see `TaskInfo.is_chief`).

    Uses `resolve()`, so it is right under SLURM and Kubernetes too.

    Args:
        environ: mapping or None. Environment to read; defaults to
            `os.environ`.

    Returns:
        bool. True when running alone.

    Raises:
        kerasdist.cluster.ClusterConfigError: as for `resolve()`.

    Example:

    >>> is_chief({})
    True
    """
    return resolve(environ, export=False).is_chief

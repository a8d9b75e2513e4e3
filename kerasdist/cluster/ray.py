"""Ray Train: this worker's rank and the group's size.

Inside a Ray Train worker, `ray.train.get_context()` knows the world rank
and size, but not the other workers' addresses: Ray's TensorFlow backend
(`ray.train.tensorflow.TensorflowTrainer`, used by
`kerasdist.integrations.ray`) writes them into `TF_CONFIG` before the
training function starts. So under Ray, `TF_CONFIG` is the source of the
addresses and this module checks it against Ray's view; a multi-worker Ray
group without `TF_CONFIG` is an error that says how to get one.

Ray is imported only when the process already imported it (a Ray worker
has), so kerasdist does not need Ray installed.
"""

from __future__ import annotations

import sys

from kerasdist.cluster.tf_config import ClusterConfigError, TaskInfo

__all__ = ["from_ray", "ray_world"]


def ray_world() -> tuple[int, int] | None:
    """(world rank, world size) inside a Ray Train worker, else None.

    Returns:
        tuple of int, or None outside a Ray Train training function.

    Example:

    >>> ray_world() is None  # not inside a Ray Train worker
    True
    """
    if "ray" not in sys.modules or "ray.train" not in sys.modules:
        return None
    try:
        from ray import train
    except ImportError:
        return None
    try:
        context = train.get_context()
        return context.get_world_rank(), context.get_world_size()
    except Exception:  # noqa: BLE001 (not in a session: Ray raises its own kinds)
        return None


def from_ray(tf_config_info: TaskInfo | None = None) -> TaskInfo | None:
    """The cluster of this Ray Train worker, or None outside Ray Train.

    Args:
        tf_config_info: `TaskInfo` or None. What `TF_CONFIG` says, if set;
            it must agree with Ray's rank and size.

    Returns:
        A `TaskInfo` with `source="ray"`, or None outside a Ray Train
        worker.

    Raises:
        ClusterConfigError: if the group has several workers but no
            `TF_CONFIG`, or `TF_CONFIG` disagrees with Ray's rank or size.

    Example:

    >>> from_ray() is None  # not inside a Ray Train worker
    True
    """
    world = ray_world()
    if world is None:
        return None
    rank, size = world
    if tf_config_info is None or not tf_config_info.cluster:
        if size == 1:
            return TaskInfo("worker", 0, {}, source="ray")
        raise ClusterConfigError(
            f"This Ray Train worker (world rank {rank} of {size}) has no "
            "TF_CONFIG, so its peers' addresses are unknown. Run the "
            "training function with kerasdist.integrations.ray.KerasTrainer "
            "or ray.train.tensorflow.TensorflowTrainer, which set TF_CONFIG."
        )
    info = tf_config_info
    if info.num_workers != size or info.worker_rank != rank:
        raise ClusterConfigError(
            f"TF_CONFIG says this is worker {info.worker_rank} of "
            f"{info.num_workers}, but Ray Train says world rank {rank} of "
            f"{size}. Do not set TF_CONFIG yourself under Ray Train; its "
            "TensorFlow backend sets it."
        )
    return TaskInfo(info.task_type, info.task_index, info.cluster,
                    source="ray")

"""Ray Train: run kerasdist training functions on a Ray cluster.

Ray's own `ray.train.tensorflow.TensorflowTrainer` starts one worker per
slot and writes `TF_CONFIG` in each; with `kd.MultiWorkerMirroredStrategy`
in the training function, Keras 3 `fit` then works (Ray's documented
example fails with `tf.distribute.MultiWorkerMirroredStrategy` and Keras 3:
ray-project/ray#47464). This module adds what is missing:

- `BackupAndRestore`: kerasdist's step-exact backup that also *reports* each
  backup to Ray as a `ray.train.Checkpoint` (the chief attaches the files,
  every worker calls `ray.train.report` at the same step) and, when Ray
  restarts the group (`FailureConfig(max_failures)`), restores from
  `ray.train.get_checkpoint()` if the backup directory lost it. It replaces
  Ray's `ReportCheckpointCallback`, whose legacy H5 files break subclassed
  models (ray-project/ray#44804).
- `KerasTrainer`: `TensorflowTrainer` that first checks the cluster has
  the resources `ScalingConfig` asks for, so a too-small cluster is an
  error rather than a run that waits forever; and, for Ray Train's elastic
  mode (`ScalingConfig(num_workers=(min, max))`), that the global batch
  divides over every group size Ray may choose.

Elastic training. With `num_workers=(min, max)` Ray Train (V2, the default
in Ray 2.55) starts the group with as many workers as the cluster can hold
(at least `min`), restarts it with fewer when a node is lost (a failure,
counted in `FailureConfig(max_failures)`), and, while it runs, checks every
`ScalingConfig(elastic_resize_monitor_interval_s)` whether more workers
would fit; if so it stops the group and starts a bigger one (not counted as
a failure). Each start resumes from the last reported checkpoint, which
`BackupAndRestore` turns into a step-exact resume. The training math stays
that of an unfailed run when the training function batches its data by a
fixed *global* batch (`kd.data.distribute(ds, strategy,
global_batch_size=...)`: each replica then gets global / replicas); Ray's
own example, which batches by `per_worker_batch_size * world_size`, would
change the batch, and so the training, with every resize. In elastic mode
`KerasTrainer` also sets `KERASDIST_MIN_WORKERS`, `KERASDIST_MAX_WORKERS`
and `KERASDIST_NUM_WORKERS` in each worker, the variables kerasdist's
elastic launcher sets, so the worker side treats a Ray resize like one of
its own.

"Saved, restart me" (`kerasdist.launch.protocol.exit_for_restart`) raises
`RestartRequested` in a Ray Train worker; Ray counts it as a failure and
restarts the group from the last reported checkpoint.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from kerasdist import elastic
from kerasdist._validate import check_int
from kerasdist.callbacks import BackupAndRestore as _BackupAndRestore
from kerasdist.callbacks import _backup_store as store
from kerasdist.errors import PermanentError
from kerasdist.launch import protocol

try:
    import ray
    from ray import train as ray_train
    from ray.train.tensorflow import TensorflowTrainer
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError(
        "kerasdist.integrations.ray needs Ray Train: pip install "
        "'kerasdist[ray]' (or 'ray[train]')."
    ) from e

__all__ = [
    "BackupAndRestore",
    "KerasTrainer",
    "RayResourcesError",
    "RayScalingError",
    "check_global_batch",
    "check_resources",
]

class RayResourcesError(PermanentError, ValueError):
    """The Ray cluster cannot hold the workers `ScalingConfig` asks for.

    A `PermanentError`: retrying cannot add nodes.

    Example:

    >>> issubclass(RayResourcesError, ValueError)
    True
    """


class RayScalingError(PermanentError, ValueError):
    """`ScalingConfig` asks for group sizes kerasdist cannot train exactly.

    Raised by `KerasTrainer` before any worker starts: a global batch that
    does not divide over the replicas of some group size Ray may choose, or
    an elastic `num_workers=(min, max)` under Ray Train V1, which has no
    elastic mode. A `PermanentError`: retrying cannot fix it.

    Example:

    >>> issubclass(RayScalingError, ValueError)
    True
    """


def _worker_range(scaling_config: Any) -> tuple[int, int]:
    """(min, max) group sizes; (n, n) for a fixed `num_workers`."""
    workers = scaling_config.num_workers
    if isinstance(workers, (tuple, list)):  # elastic (min, max)
        return int(workers[0]), int(workers[1])
    return int(workers), int(workers)


def _is_elastic(scaling_config: Any) -> bool:
    return isinstance(scaling_config.num_workers, (tuple, list))


def _replicas_per_worker(scaling_config: Any) -> int:
    """Replicas `kd.MultiWorkerMirroredStrategy` makes in one Ray worker:
    one per GPU Ray gives it (Ray sets CUDA_VISIBLE_DEVICES), else one."""
    resources = scaling_config.resources_per_worker or {}
    gpus = resources.get("GPU", 1 if scaling_config.use_gpu else 0)
    return max(int(gpus), 1)


def _needs(scaling_config: Any) -> tuple[int, dict[str, float]]:
    workers = _worker_range(scaling_config)[0]
    per_worker = dict(
        scaling_config.resources_per_worker
        or {"GPU" if scaling_config.use_gpu else "CPU": 1}
    )
    return int(workers), per_worker


def check_global_batch(scaling_config: Any, global_batch_size: int) -> None:
    """Raises unless the global batch divides over every allowed group size.

    Ray may run any number of workers in `num_workers=(min, max)` (and
    resizes between them); each worker holds `_replicas_per_worker`
    replicas (one per GPU, else one), and each replica trains global /
    replicas examples per step. So the global batch must divide by the
    replica count of every size in the range.

    Args:
        scaling_config: `ray.train.ScalingConfig`, fixed or elastic.
        global_batch_size: int. Examples per step over all replicas.

    Raises:
        RayScalingError: naming the batch, the sizes it does not divide
            over, and the fix.
        ValueError: if `global_batch_size` is not a positive integer.

    Example:

    ```python
    check_global_batch(ScalingConfig(num_workers=(1, 4)), 48)  # fine
    check_global_batch(ScalingConfig(num_workers=(1, 3)), 16)  # raises
    ```
    """
    global_batch_size = check_int("global_batch_size", global_batch_size)
    low, high = _worker_range(scaling_config)
    per_worker = _replicas_per_worker(scaling_config)
    bad, multiple = elastic.unsplittable_sizes(
        global_batch_size, low, high, per_worker
    )
    if not bad:
        return
    lower = global_batch_size // multiple * multiple
    suggestions = " or ".join(
        str(v) for v in (lower, lower + multiple) if v > 0
    )
    raise RayScalingError(
        "Invalid value for argument `global_batch_size`. Received: "
        f"global_batch_size={global_batch_size} with ScalingConfig("
        f"num_workers={scaling_config.num_workers!r}), {per_worker} "
        f"replica(s) per worker: it does not divide over the replicas of "
        f"{len(bad)} group size(s) Ray may choose: "
        + ", ".join(f"{n} worker(s) = {n * per_worker} replicas"
                    for n in bad)
        + f". Expected a multiple of {multiple} (e.g. {suggestions}), or a "
        "`num_workers` range whose sizes all divide it."
    )


def _with_elastic_env(fn: Callable, low: int, high: int) -> Callable:
    """`fn` that first sets the elastic launcher's variables in the worker.

    Ray calls the training function with `config` only if it takes an
    argument, so the wrapper takes the same number.
    """

    def set_env() -> None:
        os.environ[protocol.ENV_MIN_WORKERS] = str(low)
        os.environ[protocol.ENV_MAX_WORKERS] = str(high)
        os.environ[protocol.ENV_NUM_WORKERS] = str(
            ray_train.get_context().get_world_size()
        )

    if inspect.signature(fn).parameters:
        def run(config):
            set_env()
            return fn(config)
    else:
        def run():
            set_env()
            return fn()

    return functools.update_wrapper(run, fn)


def check_resources(
    scaling_config: Any, resources: Mapping[str, float] | None = None,
    nodes: list[Mapping[str, float]] | None = None,
) -> None:
    """Raises if the Ray cluster cannot run the workers asked for.

    Args:
        scaling_config: `ray.train.ScalingConfig`. `num_workers` (the
            minimum, if elastic) times `resources_per_worker` (default one
            CPU, or one GPU with `use_gpu`).
        resources: mapping or None. Total resources; defaults to
            `ray.cluster_resources()`.
        nodes: list of mappings or None. Each alive node's resources;
            defaults to `ray.nodes()`.

    Raises:
        RayResourcesError: naming the resource, what is needed and what the
            cluster has, and the fix.

    Example:

    ```python
    check_resources(ScalingConfig(num_workers=2))
    ```
    """
    workers, per_worker = _needs(scaling_config)
    if resources is None:
        resources = ray.cluster_resources()
    if nodes is None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for name, amount in per_worker.items():
        if not amount:
            continue
        fits = sum(int(node.get(name, 0) // amount) for node in nodes)
        if resources.get(name, 0) < workers * amount or fits < workers:
            raise RayResourcesError(
                "The Ray cluster is too small for ScalingConfig("
                f"num_workers={scaling_config.num_workers!r}, "
                f"resources_per_worker={per_worker!r}): {workers} worker(s) "
                f"need {workers * amount:g} {name} ({amount:g} each), but "
                f"the cluster has {resources.get(name, 0):g} {name} and room "
                f"for {fits} such worker(s). Lower num_workers or "
                "resources_per_worker, or add nodes."
            )


class KerasTrainer(TensorflowTrainer):
    """Ray's `TensorflowTrainer`, checking resources and batch sizes first.

    Takes `TensorflowTrainer`'s arguments, plus `global_batch_size`. In the
    training function use `kd.MultiWorkerMirroredStrategy()` (it reads the
    `TF_CONFIG` Ray sets), a dataset batched by the global batch
    (`kd.data.distribute(ds, strategy, global_batch_size=...)`) and
    `kerasdist.integrations.ray.BackupAndRestore`.

    Elastic `ScalingConfig(num_workers=(min, max))` (Ray Train V2): Ray
    starts, shrinks and grows the group between `min` and `max` workers,
    each time resuming from the last reported checkpoint. `KerasTrainer`
    then sets `KERASDIST_MIN_WORKERS`, `KERASDIST_MAX_WORKERS` and
    `KERASDIST_NUM_WORKERS` in every worker (the elastic launcher's
    variables), warns when `FailureConfig(max_failures)` is 0 (the first
    lost node would end the run), and raises under Ray Train V1, which
    has no elastic mode.

    Args:
        train_loop_per_worker: callable. The training function.
        global_batch_size: int or None. The global batch the training
            function batches its data by. If given, it is checked against
            every group size `num_workers` allows (`check_global_batch`)
            before any worker starts. Defaults to None (not checked).
        **kwargs: `TensorflowTrainer`'s keyword arguments
            (`scaling_config`, `run_config`, `train_loop_config`, ...).

    Raises:
        RayScalingError: if `global_batch_size` does not divide over some
            allowed group size, or `num_workers` is a range under Ray Train
            V1.

    Example:

    ```python
    trainer = KerasTrainer(
        train_func, global_batch_size=64,
        scaling_config=ray.train.ScalingConfig(num_workers=(1, 4)),
        run_config=ray.train.RunConfig(
            failure_config=ray.train.FailureConfig(max_failures=3)))
    result = trainer.fit()
    ```
    """

    def __init__(
        self,
        train_loop_per_worker: Callable,
        *,
        global_batch_size: int | None = None,
        **kwargs: Any,
    ):
        scaling = kwargs.get("scaling_config")
        self._kerasdist_scaling = scaling
        if scaling is not None and _is_elastic(scaling):
            _check_elastic_supported(scaling, kwargs.get("run_config"))
            train_loop_per_worker = _with_elastic_env(
                train_loop_per_worker, *_worker_range(scaling)
            )
        if global_batch_size is not None:
            check_global_batch(
                scaling if scaling is not None
                else ray_train.ScalingConfig(),
                global_batch_size,
            )
        super().__init__(train_loop_per_worker, **kwargs)

    def fit(self):
        """Checks resources (`check_resources`), then trains.

        Returns:
            `ray.train.Result`.

        Raises:
            RayResourcesError: if the cluster is too small.

        Example:

        ```python
        result = trainer.fit()
        ```
        """
        if self._kerasdist_scaling is not None:
            check_resources(self._kerasdist_scaling)
        return super().fit()


def _check_elastic_supported(scaling_config: Any, run_config: Any) -> None:
    # Ray Train V1's ScalingConfig accepts a tuple `num_workers` without a
    # word (ray/air/config.py) but has no elastic mode; V2's has
    # `elasticity_enabled` (ray/train/v2/api/config.py).
    if not hasattr(scaling_config, "elasticity_enabled"):
        raise RayScalingError(
            "Invalid value for argument `scaling_config`. Received: "
            f"ScalingConfig(num_workers={scaling_config.num_workers!r}) "
            "under Ray Train V1 (RAY_TRAIN_V2_ENABLED=0), which has no "
            "elastic mode. Expected a fixed num_workers, or Ray Train V2: "
            "unset RAY_TRAIN_V2_ENABLED (V2 is the default in Ray 2.55) "
            "before importing ray.train."
        )
    failure = getattr(run_config, "failure_config", None)
    if not getattr(failure, "max_failures", 0):
        warnings.warn(
            f"ScalingConfig(num_workers={scaling_config.num_workers!r}) is "
            "elastic, but FailureConfig(max_failures) is 0, so the first "
            "lost node ends the run instead of shrinking the group. Pass "
            "run_config=RunConfig(failure_config=FailureConfig("
            "max_failures=N)).",
            stacklevel=3,
        )


def _backup_files(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        n for n in names
        if not n.startswith(".")
        and os.path.isfile(os.path.join(directory, n))
    )


class BackupAndRestore(_BackupAndRestore):
    """`kd.callbacks.BackupAndRestore` that reports backups to Ray Train.

    Every backup is also reported with `ray.train.report`, from the
    `on_backup_saved` hook: exactly the saves that happened, at their
    step (`global_step` in the metrics), including the save on a
    preemption signal and the final one. All workers call it at the same
    save, the chief with the backup files as a `ray.train.Checkpoint`, the
    others without. When Ray
    restarts the group, each worker makes its `backup_dir` match
    `ray.train.get_checkpoint()` (copying what a fresh node lacks, dropping
    backups Ray never registered), and training resumes at the exact step
    of that checkpoint.

    Args:
        backup_dir: str. As for `kd.callbacks.BackupAndRestore`; need not be
            shared between nodes (Ray's checkpoint carries the files).
        save_freq: `"epoch"`, `"auto"` or int. Defaults to `"epoch"`.
        **kwargs: the other arguments of `kd.callbacks.BackupAndRestore`.

    Example:

    ```python
    model.fit(ds, epochs=3, callbacks=[
        kerasdist.integrations.ray.BackupAndRestore("/tmp/backup", 20)])
    ```
    """

    def on_train_begin(self, logs=None):
        self._restore_from_ray()
        super().on_train_begin(logs)

    def on_backup_saved(self, backup) -> None:
        """Reports the backup just committed to Ray (every worker, at the
        same save), then calls the base class's hook."""
        self._report(backup)
        super().on_backup_saved(backup)

    def _restore_from_ray(self) -> None:
        """Makes `backup_dir` hold exactly Ray's newest checkpoint's backups.

        Files the checkpoint has and the directory lacks are copied in;
        backups newer than the checkpoint's newest are removed: the group
        failed before every worker reported them (Ray registers a checkpoint
        only when all workers have reported it), so a worker on another
        node may not have them, and all workers must resume from the same
        backup.
        """
        checkpoint = ray_train.get_checkpoint()
        if checkpoint is None:
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        with checkpoint.as_directory() as source:
            wanted = _backup_files(source)
            have = set(_backup_files(self.backup_dir))
            for name in wanted:
                if name in have:
                    continue
                # Atomic: another worker on this node may copy the same file.
                tmp = os.path.join(
                    self.backup_dir, f".ray-{os.getpid()}-{name}"
                )
                shutil.copyfile(os.path.join(source, name), tmp)
                os.replace(tmp, os.path.join(self.backup_dir, name))
        newest = max(wanted, default="")
        for name in have - set(wanted):
            if name.startswith(store.PREFIX) and name > newest:
                try:
                    os.unlink(os.path.join(self.backup_dir, name))
                except FileNotFoundError:  # a peer on this node did it
                    pass

    def _report(self, backup) -> None:
        metrics = {"global_step": backup.global_step}
        for key, value in backup.logs.items():
            try:
                metrics[key] = float(value)
            except (TypeError, ValueError):
                continue
        if ray_train.get_context().get_world_rank() != 0:
            ray_train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as staging:
            for name in _backup_files(self.backup_dir):
                if name == store.PROGRESS_FILE:  # this run's, not a backup
                    continue
                shutil.copyfile(
                    os.path.join(self.backup_dir, name),
                    os.path.join(staging, name),
                )
            ray_train.report(
                metrics,
                checkpoint=ray_train.Checkpoint.from_directory(staging),
            )

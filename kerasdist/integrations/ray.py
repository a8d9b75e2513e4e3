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
  error rather than a run that waits forever.

"Saved, restart me" (`kerasdist.launch.protocol.exit_for_restart`) raises
`RestartRequested` in a Ray Train worker; Ray counts it as a failure and
restarts the group from the last reported checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from kerasdist.callbacks import BackupAndRestore as _BackupAndRestore
from kerasdist.errors import PermanentError

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
    "check_resources",
]


class RayResourcesError(PermanentError, ValueError):
    """The Ray cluster cannot hold the workers `ScalingConfig` asks for.

    A `PermanentError`: retrying cannot add nodes.

    Example:

    >>> issubclass(RayResourcesError, ValueError)
    True
    """


def _needs(scaling_config: Any) -> tuple[int, dict[str, float]]:
    workers = scaling_config.num_workers
    if isinstance(workers, (tuple, list)):  # elastic (min, max)
        workers = workers[0]
    per_worker = dict(
        scaling_config.resources_per_worker
        or {"GPU" if scaling_config.use_gpu else "CPU": 1}
    )
    return int(workers), per_worker


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
    """Ray's `TensorflowTrainer`, checking the cluster's resources first.

    Takes exactly `TensorflowTrainer`'s arguments. In the training function
    use `kd.MultiWorkerMirroredStrategy()` (it reads the `TF_CONFIG` Ray
    sets) and `kerasdist.integrations.ray.BackupAndRestore`.

    Args:
        train_loop_per_worker: callable. The training function.
        **kwargs: `TensorflowTrainer`'s keyword arguments
            (`scaling_config`, `run_config`, `train_loop_config`, ...).

    Example:

    ```python
    trainer = KerasTrainer(train_func,
                           scaling_config=ray.train.ScalingConfig(2))
    result = trainer.fit()
    ```
    """

    def __init__(self, train_loop_per_worker, **kwargs):
        self._kerasdist_scaling = kwargs.get("scaling_config")
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

    Every backup is also reported with `ray.train.report`: all workers call
    it at the same step (after the same save), the chief with the backup
    files as a `ray.train.Checkpoint`, the others without. When Ray
    restarts the group, each worker makes its `backup_dir` match
    `ray.train.get_checkpoint()` (copying what a fresh node lacks, dropping
    backups Ray never registered), and training resumes at the exact step
    of that checkpoint.

    Args:
        backup_dir: str. As for `kd.callbacks.BackupAndRestore`; need not be
            shared between nodes (Ray's checkpoint carries the files).
        save_freq: `"epoch"` or int. Defaults to `"epoch"`.
        **kwargs: the other arguments of `kd.callbacks.BackupAndRestore`.

    Example:

    ```python
    model.fit(ds, epochs=3, callbacks=[
        kerasdist.integrations.ray.BackupAndRestore("/tmp/backup", 20)])
    ```
    """

    def __init__(self, backup_dir, save_freq="epoch", **kwargs):
        super().__init__(backup_dir, save_freq, **kwargs)
        self._reported_step = None

    def on_train_begin(self, logs=None):
        self._restore_from_ray()
        super().on_train_begin(logs)
        self._reported_step = self._global_step_now()

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if isinstance(self.save_freq, int):
            step = self._global_step_now()
            if step // self.save_freq > self._reported_step // self.save_freq:
                self._report(step, logs)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.save_freq == "epoch":
            self._report(self._global_step_now(), logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        step = self._global_step_now()
        if step != self._reported_step:
            self._report(step, logs)

    def _global_step_now(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

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
            if name > newest:
                try:
                    os.unlink(os.path.join(self.backup_dir, name))
                except FileNotFoundError:  # a peer on this node did it
                    pass

    def _report(self, step: int, logs) -> None:
        self._reported_step = step
        metrics = {"global_step": step}
        for key, value in (logs or {}).items():
            try:
                metrics[key] = float(value)
            except (TypeError, ValueError):
                continue
        if ray_train.get_context().get_world_rank() != 0:
            ray_train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as staging:
            for name in _backup_files(self.backup_dir):
                shutil.copyfile(
                    os.path.join(self.backup_dir, name),
                    os.path.join(staging, name),
                )
            ray_train.report(
                metrics,
                checkpoint=ray_train.Checkpoint.from_directory(staging),
            )

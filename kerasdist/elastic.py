"""Elastic training on the worker side: the math that must not change.

An elastic launcher restarts the worker group at another size when a host
is lost or comes back (TensorFlow cannot resize a running group:
tensorflow/community#249 was closed unmerged). kerasdist keeps training
exactly as if nothing happened:

- **The global batch is fixed.** The user writes the global batch
  (`kd.data.distribute(ds, strategy, global_batch_size=B)` or
  `fit(x, y, batch_size=B)`); each replica's batch is `B / replicas`.
  Facts (TF 2.21, Keras 3.15, `tests/test_elastic_resize.py`): under
  `MultiWorkerMirroredStrategy` a dataset batched by the global batch with
  the `DATA` auto-shard policy is read whole by every worker, which keeps
  its replicas' slices of *each* global batch, so global batch `k` holds
  the same examples at 1, 2 or 3 workers (the per-step id fingerprints are
  equal). `FILE` sharding gives each worker other files, so batch `k`
  depends on the number of workers: under an elastic launcher
  `shard_policy="auto"` picks `DATA` and `"file"` is refused.
- **The data position is world-size independent.** The cursor saved by
  `kd.callbacks.BackupAndRestore` counts global batches and samples, and
  records the global batch and the replica count of the run that saved;
  a run resumed at another size skips exactly the batches already
  trained. A resume with another global batch is refused
  (`BackupMismatchError`).
- **Every allowed size must be able to split the batch.** Before the first
  step, the global batch must divide by the replicas of every group size
  the launcher can restart at (`KERASDIST_WORKER_SIZES`, else every size
  from `KERASDIST_MIN_WORKERS` to `KERASDIST_MAX_WORKERS`; times this
  worker's devices), else `ElasticConfigError`.

Environment (set by the elastic launcher, see
`kerasdist.launch.protocol`): `KERASDIST_MIN_WORKERS`,
`KERASDIST_MAX_WORKERS` (default `KERASDIST_NUM_WORKERS`), and from
`kerasdist-run` `KERASDIST_WORKER_SIZES`: a group runs every slot of the
hosts it has, so with 8 hosts of 2 slots and `--min_workers 14` only 14
and 16 workers can happen ("14,16"). The run is elastic when the minimum
is set and below the maximum; otherwise nothing here changes kerasdist's
behaviour.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from kerasdist._validate import check_int, env_int
from kerasdist.errors import PermanentError
from kerasdist.launch import protocol

__all__ = [
    "BatchPlan",
    "ElasticConfigError",
    "allowed_sizes",
    "allowed_workers",
    "batch_plan",
    "check_global_batch",
    "unsplittable_sizes",
    "is_elastic",
]


class ElasticConfigError(PermanentError, ValueError):
    """A configuration that cannot train the same at every allowed size.

    A global batch that some allowed group size cannot split evenly, file
    sharding under an elastic launcher, or malformed
    `KERASDIST_MIN_WORKERS` / `KERASDIST_MAX_WORKERS`. Restarting cannot
    fix it: under `kerasdist-run` the worker exits with
    `kerasdist.launch.protocol.PERMANENT_EXIT_CODE` (78) and the launcher
    stops.

    Example:

    >>> issubclass(ElasticConfigError, ValueError)
    True
    """


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    return env_int(name, minimum=1, environ=environ,
                   error=ElasticConfigError, expected="a number of workers")


def allowed_workers(
    environ: Mapping[str, str] | None = None,
) -> tuple[int, int] | None:
    """The range of group sizes an elastic launcher may restart at.

    Args:
        environ: mapping or None. Defaults to `os.environ`.

    Returns:
        `(min_workers, max_workers)` from `KERASDIST_MIN_WORKERS` and
        `KERASDIST_MAX_WORKERS` (default `KERASDIST_NUM_WORKERS`), or None
        when the run is not elastic (no minimum, or minimum == maximum).

    Raises:
        ElasticConfigError: if a variable is not a positive integer or the
            minimum is above the maximum.

    Example:

    >>> allowed_workers({"KERASDIST_MIN_WORKERS": "2",
    ...                  "KERASDIST_MAX_WORKERS": "3"})
    (2, 3)
    """
    environ = os.environ if environ is None else environ
    low = _env_int(environ, protocol.ENV_MIN_WORKERS)
    if low is None:
        return None
    high = _env_int(environ, protocol.ENV_MAX_WORKERS)
    if high is None:
        high = _env_int(environ, protocol.ENV_NUM_WORKERS) or low
    if low > high:
        raise ElasticConfigError(
            f"Invalid value for {protocol.ENV_MIN_WORKERS}. Received: "
            f"{protocol.ENV_MIN_WORKERS}={low} above "
            f"{protocol.ENV_MAX_WORKERS}={high}. Expected a minimum group "
            "size no larger than the maximum (kerasdist-run --min_workers "
            "<= --num_workers)."
        )
    return (low, high) if low < high else None


def allowed_sizes(
    environ: Mapping[str, str] | None = None,
) -> list[int] | None:
    """The group sizes an elastic launcher may restart at.

    Args:
        environ: mapping or None. Defaults to `os.environ`.

    Returns:
        list of int, increasing: `KERASDIST_WORKER_SIZES` when the
        launcher set it (`kerasdist-run` over hosts: the sums of the hosts'
        slots), else every size from `KERASDIST_MIN_WORKERS` to
        `KERASDIST_MAX_WORKERS`; None when the run is not elastic.

    Raises:
        ElasticConfigError: if a variable is malformed, or a size is
            outside the minimum and maximum.

    Example:

    >>> allowed_sizes({"KERASDIST_MIN_WORKERS": "14",
    ...                "KERASDIST_MAX_WORKERS": "16",
    ...                "KERASDIST_WORKER_SIZES": "14,16"})
    [14, 16]
    """
    environ = os.environ if environ is None else environ
    bounds = allowed_workers(environ)
    if bounds is None:
        return None
    low, high = bounds
    text = environ.get(protocol.ENV_WORKER_SIZES, "").strip()
    if not text:
        return list(range(low, high + 1))
    try:
        sizes = sorted({int(s) for s in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < low or sizes[-1] > high:
        raise ElasticConfigError(
            f"Invalid value for {protocol.ENV_WORKER_SIZES}. Received: "
            f"{protocol.ENV_WORKER_SIZES}={text!r}. Expected "
            f"comma-separated group sizes from {protocol.ENV_MIN_WORKERS}="
            f"{low} to {protocol.ENV_MAX_WORKERS}={high}, e.g. "
            f"'{low},{high}' (kerasdist-run sets it; unset it to check "
            "every size in between)."
        )
    return sizes


def is_elastic(environ: Mapping[str, str] | None = None) -> bool:
    """True when the launcher may restart this group at another size.

    Args:
        environ: mapping or None. Defaults to `os.environ`.

    Returns:
        bool. `KERASDIST_MIN_WORKERS` is set and below the maximum.

    Raises:
        ElasticConfigError: if the variables are malformed.

    Example:

    >>> is_elastic({})
    False
    """
    return allowed_workers(environ) is not None


def _local_replicas(strategy: Any) -> int:
    from kerasdist import _internals

    workers = max(_internals.num_workers(strategy), 1)
    return max(strategy.num_replicas_in_sync // workers, 1)


def check_global_batch(
    global_batch_size: int,
    strategy: Any = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Refuses a global batch that some allowed group size cannot split.

    Under an elastic launcher the group may run with any size
    `allowed_sizes` gives (the sizes the hosts' slots add up to, or every
    number of workers in `[KERASDIST_MIN_WORKERS, KERASDIST_MAX_WORKERS]`),
    each worker with this worker's number of local replicas; the global
    batch must divide by the replicas of every one of those sizes, or
    training after a resize would differ. Does nothing outside an elastic
    run. kerasdist calls it before the first step (`kd.data.distribute`,
    `fit` with arrays and `kd.callbacks.BackupAndRestore`).

    Args:
        global_batch_size: int. Examples per optimizer step over all
            replicas.
        strategy: `tf.distribute.Strategy` or None (the current one).
            Gives the local replicas per worker.
        environ: mapping or None. Defaults to `os.environ`.

    Raises:
        ElasticConfigError: naming the batch, the group sizes that cannot
            split it and the fix (a multiple of their least common
            multiple, or a narrower `--min_workers`).

    Example:

    >>> check_global_batch(12, environ={"KERASDIST_MIN_WORKERS": "2",
    ...                                 "KERASDIST_MAX_WORKERS": "3"})
    """
    sizes = allowed_sizes(environ)
    if sizes is None:
        return
    if strategy is None:
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
    local = _local_replicas(strategy)
    low, high = sizes[0], sizes[-1]
    failing, lcm = unsplittable_sizes(global_batch_size, low, high, local,
                                      sizes=sizes)
    if not failing:
        return
    working = [w for w in sizes if w not in failing]
    # The narrowest fix that keeps the maximum: the smallest minimum whose
    # sizes all split the batch.
    narrower = next((m for m in sizes[1:]
                     if all(w not in failing for w in sizes if w >= m)),
                    None)
    sizes_text = ", ".join(
        f"{w} worker(s) = {w * local} replicas" for w in failing)
    raise ElasticConfigError(
        "Invalid value for argument `global_batch_size`. Received: "
        f"global_batch_size={global_batch_size}, which the elastic group "
        f"(from {low} to {high} workers, {local} replica(s) each) cannot "
        f"split evenly at {sizes_text}; training after a resize to "
        "that size would differ. Expected a global batch that is a "
        f"multiple of {lcm} (e.g. {_multiple_near(global_batch_size, lcm)})"
        + (f", or a narrower --min_workers {narrower}" if narrower else "")
        + (f" (sizes that work: {working})" if working else "")
        + "."
    )


def unsplittable_sizes(global_batch_size: int, low: int, high: int,
                       replicas_per_worker: int = 1,
                       sizes: Sequence[int] | None = None,
                       ) -> tuple[list[int], int]:
    """The group sizes in `[low, high]` whose replicas cannot split the
    global batch, and the least common multiple of all sizes' replicas.

    The one rule behind `check_global_batch` and Ray's
    `kerasdist.integrations.ray.check_global_batch`.

    Args:
        global_batch_size: int. Examples per optimizer update.
        low: int. Smallest number of workers.
        high: int. Largest number of workers.
        replicas_per_worker: int. Replicas each worker holds.
        sizes: list of int or None. The sizes to check (see
            `allowed_sizes`); None: every size from `low` to `high`.

    Returns:
        (list of int, int): the failing worker counts (empty when every
        size works) and a global batch multiple that works at every size.

    Example:

    >>> unsplittable_sizes(16, 1, 3)
    ([3], 6)
    """
    if sizes is None:
        sizes = range(max(low, 1), high + 1)
    failing = [w for w in sizes
               if global_batch_size % (w * replicas_per_worker)]
    return failing, math.lcm(*(w * replicas_per_worker for w in sizes))


def _multiple_near(value: int, step: int) -> int:
    return max(round(value / step), 1) * step


class BatchPlan(NamedTuple):
    """How this world size trains the global batch (see `batch_plan`).

    Attributes:
        global_batch_size: int. Examples per optimizer update.
        replica_batch_size: int. Examples each replica computes on at once.
        accumulation_steps: int. Training steps per optimizer update.
        step_batch_size: int. Examples per training step over all
            replicas: the dataset's batch.

    Example:

    >>> BatchPlan(12, 3, 2, 6).step_batch_size
    6
    """

    global_batch_size: int
    replica_batch_size: int
    accumulation_steps: int
    step_batch_size: int


def batch_plan(
    global_batch_size: int,
    max_replica_batch_size: int | None = None,
    strategy: Any = None,
) -> BatchPlan:
    """Splits the global batch over this world size, within a memory cap.

    `replicas x replica_batch_size x accumulation_steps ==
    global_batch_size`, with the fewest accumulation steps that keep each
    replica's batch within `max_replica_batch_size`. When an elastic
    launcher shrinks the group, each replica's share grows; accumulating
    gradients over several steps keeps the global batch (and so the
    training) the same. Apply it with `kd.data.distribute(...,
    global_batch_size=plan.global_batch_size,
    accumulation_steps=plan.accumulation_steps)` and, when
    `plan.accumulation_steps > 1`, `kd.accumulate_gradients(optimizer,
    plan.accumulation_steps)`.

    Args:
        global_batch_size: int. Examples per optimizer update over all
            replicas.
        max_replica_batch_size: int or None. The largest batch a replica
            can compute on at once (its memory). None: no cap, no
            accumulation. Defaults to None.
        strategy: `tf.distribute.Strategy` or None (the current one).

    Returns:
        `BatchPlan`.

    Raises:
        ElasticConfigError: if `global_batch_size` does not divide by the
            replicas (no accumulation can fix that).
        ValueError: if an argument is not a positive integer.

    Example:

    >>> batch_plan(12, max_replica_batch_size=4)
    BatchPlan(global_batch_size=12, replica_batch_size=4, \
accumulation_steps=3, step_batch_size=4)
    """
    global_batch_size = check_int("global_batch_size", global_batch_size)
    if max_replica_batch_size is not None:
        max_replica_batch_size = check_int(
            "max_replica_batch_size", max_replica_batch_size)
    if strategy is None:
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ElasticConfigError(
            "Invalid value for argument `global_batch_size`. Received: "
            f"global_batch_size={global_batch_size}, which does not divide "
            f"over the {replicas} replicas in sync; gradient accumulation "
            "cannot fix that. Expected a multiple of "
            f"{replicas}, e.g. {_multiple_near(global_batch_size, replicas)}."
        )
    share = global_batch_size // replicas
    steps = 1
    if max_replica_batch_size is not None:
        steps = next(s for s in range(1, share + 1)
                     if share % s == 0 and share // s
                     <= max_replica_batch_size)
    return BatchPlan(global_batch_size, share // steps, steps,
                     global_batch_size // steps)

"""Input pipelines for data parallelism: global batch, sharding.

Keras under `tf.distribute` treats every batch of a `tf.data.Dataset` as a
*global* batch and splits it across replicas. `distribute` batches a dataset
of single examples to the global batch, checks that the batch divides over
the replicas, and sets the auto-shard policy explicitly so that each worker
reads its part without TensorFlow's "unshardable source" warning. Before
`fit`'s first step, kerasdist's strategies check that the training data's
batches (the last partial one included) split evenly, reading the sizes
from the dataset once instead of checking each batch as it is read.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import tensorflow as tf

from kerasdist import _internals, elastic
from kerasdist._validate import check_int
from kerasdist.errors import ConfigError, PermanentError
from kerasdist.launch import protocol

__all__ = [
    "SHARD_POLICIES",
    "UnevenBatchError",
    "check_keras_batches",
    "distribute",
    "batch_sizes_of",
    "per_replica_batch_size",
    "reads_no_files",
    "shuffles_differently",
    "unseeded_shuffles",
    "warn_if_unseeded_shuffle",
]

SHARD_POLICIES = ("auto", "file", "data", "off")
_READER_OPS = (
    "TFRecordDataset",
    "TFRecordDatasetV2",
    "TextLineDataset",
    "FixedLengthRecordDatasetV2",
    "FixedLengthRecordDataset",
    "ArrayRecordDataset",
)


class UnevenBatchError(PermanentError, ValueError):
    """A global batch that does not split evenly over the replicas.

    Keras scales each replica's mean loss by `1 / num_replicas_in_sync`,
    which equals the one-device mean only when every replica gets the same
    number of examples. A batch of 3 on 2 replicas (2 + 1), or of 1 (1 + 0),
    would train differently from one device, and across workers TensorFlow's
    collectives fail on it ("Shape mismatch in the collective instance") or
    crash a worker. kerasdist refuses such a batch before it is trained on.
    Restarting cannot fix it, so it is a `PermanentError`.

    Example:

    >>> issubclass(UnevenBatchError, ValueError)
    True
    """


def _replicas_text(strategy: tf.distribute.Strategy) -> str:
    replicas = strategy.num_replicas_in_sync
    workers = _internals.num_workers(strategy)
    if workers > 1:
        return (f"{replicas} replicas in sync ({workers} workers x "
                f"{replicas // workers} device(s))")
    return f"{replicas} replicas in sync"


def _multiples(value: int, replicas: int) -> str:
    lower = value // replicas * replicas
    return (f"{lower} or {lower + replicas}" if lower
            else f"{replicas}")


def _group_sizes(strategy: tf.distribute.Strategy) -> tuple[list[int], int]:
    """(numbers of workers, replicas per worker) to check.

    The current group, or every size an elastic launcher may restart at
    (`kd.elastic.allowed_sizes`).
    """
    workers = max(_internals.num_workers(strategy), 1)
    local = max(strategy.num_replicas_in_sync // workers, 1)
    return elastic.allowed_sizes() or [workers], local


def _check_partial(
    partial: int,
    strategy: tf.distribute.Strategy,
    *,
    received: str,
    examples: int | None,
    data: str,
    fix: str,
) -> None:
    """Refuses a last partial batch some allowed group cannot split evenly.

    Keras scales each replica's mean loss by `1 / num_replicas_in_sync`,
    exact only for equal shares; evaluation and prediction are exact for
    any split, so only training data is checked. Under
    an elastic launcher every allowed group size is checked, so a valid job
    cannot fail after a resize.
    """
    sizes, local = _group_sizes(strategy)
    low, high = sizes[0], sizes[-1]
    failing, lcm = elastic.unsplittable_sizes(partial, low, high, local,
                                              sizes=sizes)
    if not partial or not failing:
        return
    if low == high:
        where = f"the {_replicas_text(strategy)}"
    else:
        where = ("the replicas of the elastic group (from "
                 f"{low} to {high} workers, {local} replica(s) each) at "
                 + ", ".join(f"{w} worker(s) = {w * local} replicas"
                             for w in failing))
    keep = examples - partial % lcm if examples else None
    raise UnevenBatchError(
        f"Invalid value for argument {received} with "
        + (f"{examples} {data} examples" if examples else f"the {data} data")
        + f", which leaves a last batch of {partial} example(s) in every "
        f"epoch; it does not divide over {where}, so that training step "
        "would differ from one device. Use a number of examples whose "
        f"remainder modulo the batch size is a multiple of {lcm}"
        + (f" (e.g. the first {keep} examples)" if keep else "")
        + f", or {fix}."
    )


_DROP_FIX = ("pass a tf.data.Dataset batched with drop_remainder=True "
             "(kd.data.distribute(..., drop_remainder=True))")


def check_keras_batches(
    batch_size: int | None,
    partial_batch_size: int | None,
    strategy: tf.distribute.Strategy,
    num_examples: int | None = None,
) -> None:
    """Refuses training batches that would not split evenly over replicas.

    Called by kerasdist's strategies when Keras's `fit` distributes its
    training data, before the first step. Evaluation, validation and
    prediction data are not checked: Keras's results for them are exact
    for any split (its metrics weight each replica by its examples).

    Args:
        batch_size: int or None. The `batch_size` passed to Keras (the
            global batch); None when unknown.
        partial_batch_size: int or None. Size of the last, partial batch of
            each epoch, or None if there is none.
        strategy: `tf.distribute.Strategy`.
        num_examples: int or None. Number of examples, for the message.
            Defaults to None.

    Raises:
        UnevenBatchError: if `batch_size` or the partial last batch does
            not divide by `strategy.num_replicas_in_sync` (under an
            elastic launcher: by the replicas of every allowed group size).
        kerasdist.elastic.ElasticConfigError: under an elastic launcher,
            if some allowed group size cannot split `batch_size`.

    Example:

    >>> check_keras_batches(4, None, tf.distribute.get_strategy())
    """
    if batch_size is None:
        return
    elastic.check_global_batch(batch_size, strategy)
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise UnevenBatchError(
            "Invalid value for argument `batch_size`. Received: "
            f"batch_size={batch_size}, a global batch that does not divide "
            f"over the {_replicas_text(strategy)}, so the replicas would "
            "train on different numbers of examples and the result would "
            "differ from one device. Expected a multiple of "
            f"{replicas}: use e.g. batch_size="
            f"{_multiples(batch_size, replicas)}."
        )
    if partial_batch_size:
        _check_partial(
            partial_batch_size, strategy,
            received=f"`batch_size`. Received: batch_size={batch_size}",
            examples=num_examples, data="training", fix=_DROP_FIX)


def assert_even_batches(
    dataset: tf.data.Dataset, strategy: tf.distribute.Strategy
) -> tf.data.Dataset:
    """`dataset` of training batches, checked to split evenly.

    Checked once, before the first step, at no cost per step: the batch
    size is read from the dataset's shapes, else from its `batch` op, and
    the last partial batch from the number of examples batched. Only a
    dataset whose size is unknown (e.g. after `filter`) is checked as each
    batch is read, which costs a little per step; under an elastic
    launcher such a dataset is refused instead, since some group size
    could fail at the end of an epoch.

    Args:
        dataset: `tf.data.Dataset` of global batches.
        strategy: `tf.distribute.Strategy`.

    Returns:
        `tf.data.Dataset`: `dataset`, or (size unknown) `dataset` with a
        check mapped over it.

    Raises:
        UnevenBatchError: if the batch size or the last partial batch does
            not divide over the replicas (of every allowed elastic group
            size), or, under an elastic launcher, if the number of
            examples is unknown. A size only known when read raises
            `tf.errors.InvalidArgumentError` with the same advice then.

    Example:

    ```python
    ds = assert_even_batches(ds.batch(4, drop_remainder=True), strategy)
    ```
    """
    leaves = [spec for spec in tf.nest.flatten(dataset.element_spec)
              if isinstance(spec, tf.TensorSpec) and spec.shape.rank]
    if not leaves:
        return dataset
    static = leaves[0].shape[0]
    if static is not None:
        check_keras_batches(int(static), None, strategy)
        return dataset
    batching = _internals.dataset_batching(dataset)
    if (batching is not None and batching.same_batches
            and batching.examples != tf.data.UNKNOWN_CARDINALITY):
        examples = max(batching.examples, 0)
        partial = (0 if batching.drop_remainder
                   else examples % batching.batch_size)
        check_keras_batches(batching.batch_size, partial, strategy,
                            examples or None)
        return dataset
    if elastic.is_elastic():
        sizes, _ = _group_sizes(strategy)
        low, high = sizes[0], sizes[-1]
        raise UnevenBatchError(
            "Invalid training dataset for an elastic run: its number of "
            "examples is unknown (e.g. after `filter`) and it is batched "
            "without drop_remainder=True, so its last batch may not divide "
            f"over the replicas of some allowed group size ({low} to "
            f"{high} workers) and training would fail at the end of an "
            "epoch. Batch it with drop_remainder=True "
            "(kd.data.distribute(..., drop_remainder=True)), or give it a "
            "known size (`dataset.apply(tf.data.experimental."
            "assert_cardinality(n))`)."
        )
    if strategy.num_replicas_in_sync == 1:
        return dataset
    return _checked_as_read(dataset, strategy)


def _checked_as_read(dataset, strategy):
    """`dataset` with each batch's size checked as it is read."""
    replicas = strategy.num_replicas_in_sync
    message = (
        "Invalid value for argument `batch_size`: a global batch of the "
        f"training dataset does not divide over the "
        f"{_replicas_text(strategy)} (its size is printed below), so the "
        "replicas would train on different numbers of examples. Batch the "
        f"dataset to a multiple of {replicas} with drop_remainder=True, "
        "e.g. kd.data.distribute(ds, strategy, global_batch_size=..., "
        "drop_remainder=True)."
    )

    def check(*element):
        structure = element[0] if len(element) == 1 else element
        first = next(t for t in tf.nest.flatten(structure)
                     if isinstance(t, tf.Tensor) and t.shape.rank)
        size = tf.shape(first, out_type=tf.int64)[0]
        with tf.control_dependencies([tf.debugging.Assert(
                tf.equal(size % replicas, 0),
                [message, "Global batch size:", size])]):
            return tf.nest.map_structure(
                lambda t: tf.identity(t) if isinstance(t, tf.Tensor) else t,
                structure)

    return dataset.map(check)


def per_replica_batch_size(
    global_batch_size: int, strategy: tf.distribute.Strategy
) -> int:
    """The batch each replica computes on, given the global batch.

    Args:
        global_batch_size: int. Examples per training step over all
            replicas of all workers.
        strategy: `tf.distribute.Strategy`.

    Returns:
        int: `global_batch_size // strategy.num_replicas_in_sync`.

    Raises:
        kerasdist.errors.ConfigError: if `global_batch_size` is not a
            positive integer divisible by the number of replicas.

    Example:

    >>> per_replica_batch_size(64, tf.distribute.get_strategy())
    64
    """
    replicas = strategy.num_replicas_in_sync
    global_batch_size = check_int("global_batch_size", global_batch_size)
    if global_batch_size % replicas:
        lower = global_batch_size // replicas * replicas
        raise ConfigError(
            "Invalid value for argument `global_batch_size`. Received: "
            f"global_batch_size={global_batch_size}, which does not divide "
            f"over the {replicas} replicas in sync. Use a multiple of "
            f"{replicas}, e.g. {lower or replicas} or {lower + replicas}."
        )
    return global_batch_size // replicas


def _dataset_nodes(dataset: tf.data.Dataset) -> list:
    """The ops of `dataset`'s graph, those of its functions included."""
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(_internals.serialized_dataset_graph(dataset))
    nodes = list(graph.node)
    for f in graph.library.function:
        nodes.extend(f.node_def)
    return nodes


_SHUFFLE_OPS = ("ShuffleDataset", "ShuffleDatasetV3",
                "ShuffleAndRepeatDataset", "ShuffleAndRepeatDatasetV2")


def unseeded_shuffles(dataset: tf.data.Dataset) -> int:
    """How many `shuffle`s in `dataset` have no seed (op- or global-level).

    Args:
        dataset: `tf.data.Dataset`.

    Returns:
        int. Shuffles whose seeds are both 0 in the dataset's graph: TF
        draws a new random order for each process.

    Example:

    >>> unseeded_shuffles(tf.data.Dataset.range(4).shuffle(4, seed=1))
    0
    """
    nodes = _dataset_nodes(dataset)
    by_name = {n.name: n for n in nodes}
    count = 0
    for node in nodes:
        if node.op not in _SHUFFLE_OPS:
            continue
        seeds = [by_name.get(name.split(":")[0]) for name in node.input[2:4]]
        if all(seed is not None and seed.op == "Const"
               and not tf.make_ndarray(seed.attr["value"].tensor).any()
               for seed in seeds):
            count += 1
    return count


def shuffles_differently(dataset: Any, workers: int) -> bool:
    """Whether `workers` workers would each shuffle `dataset` their own way.

    True for a `tf.data.Dataset` with an unseeded `shuffle` that more than
    one worker shards by data (TF's `AUTO` falls back to `DATA` for
    datasets that do not read files): each worker then draws its own
    order, so the workers' parts of a global batch overlap and a resumed
    run reads other batches.

    Args:
        dataset: the `fit` input; anything but a `tf.data.Dataset` is
            False (unknown).
        workers: int. Number of workers.

    Returns:
        bool.

    Example:

    >>> shuffles_differently(tf.data.Dataset.range(4).shuffle(4), 2)
    True
    """
    if workers < 2 or not isinstance(dataset, tf.data.Dataset):
        return False
    policy = dataset.options().experimental_distribute.auto_shard_policy
    if policy in (tf.data.experimental.AutoShardPolicy.FILE,
                  tf.data.experimental.AutoShardPolicy.OFF):
        return False
    return unseeded_shuffles(dataset) > 0


def warn_if_unseeded_shuffle(
    dataset: tf.data.Dataset, strategy: tf.distribute.Strategy
) -> bool:
    """Warns when workers sharding by data would shuffle differently.

    Called by kerasdist's strategies before `fit`'s first step. Under
    `DATA` sharding every worker reads all the examples and keeps its part
    of each global batch; an unseeded `shuffle` gives each worker its own
    order, so some examples are read by several workers and others by
    none (TF's multi-worker tutorial: 251 of 1,024 each way per epoch),
    and a resumed run reads other batches.

    Args:
        dataset: `tf.data.Dataset` about to be trained on.
        strategy: `tf.distribute.Strategy`.

    Returns:
        bool: True if a warning was issued.

    Example:

    ```python
    warn_if_unseeded_shuffle(dataset, strategy)
    ```
    """
    workers = _internals.num_workers(strategy)
    if not shuffles_differently(dataset, workers):
        return False
    warnings.warn(
        "The training dataset shuffles without a seed and is sharded by "
        f"data over {workers} workers: each worker reads every example in "
        "its own random order and keeps its part of each global batch, so "
        "some examples are trained on by several workers and others by "
        "none, and kd.callbacks.BackupAndRestore cannot resume on the same "
        "batches. Pass a seed, e.g. dataset.shuffle(buffer_size, seed=1) "
        "(the order still changes every epoch, the same on every worker), "
        "or call tf.random.set_seed(...) first.",
        UserWarning,
        stacklevel=5,
    )
    return True


def _input_files(dataset: tf.data.Dataset) -> list[str] | None:
    """Files read by `dataset` if it reads files, else None."""
    nodes = _dataset_nodes(dataset)
    if not any(n.op in _READER_OPS for n in nodes):
        return None
    files = []
    for n in nodes:
        if n.op != "Const" or "value" not in n.attr:
            continue
        tensor = n.attr["value"].tensor
        if tensor.dtype != tf.string.as_datatype_enum:
            continue
        # tf.make_ndarray cannot decode packed string `tensor_content`.
        value = tf.io.parse_tensor(tensor.SerializeToString(), tf.string)
        for s in tf.reshape(value, [-1]).numpy():
            path = s.decode("utf-8", "replace")
            if os.path.isfile(path):
                files.append(path)
    return files


def reads_no_files(dataset: tf.data.Dataset) -> bool:
    """True when `dataset` has no file reader (TFRecord, text lines, ...).

    `AutoShardPolicy.AUTO` then shards by `DATA`.

    Example:

    >>> reads_no_files(tf.data.Dataset.range(4))
    True
    """
    return _input_files(dataset) is None


def _choose_policy(
    dataset: tf.data.Dataset, shard_policy: str, num_workers: int
) -> tf.data.experimental.AutoShardPolicy:
    policy = tf.data.experimental.AutoShardPolicy
    if shard_policy == "off":
        return policy.OFF
    if elastic.is_elastic():
        # FILE sharding gives each worker other files, so which examples
        # form global batch k depends on the number of workers; DATA keeps
        # every global batch the same at every size (kerasdist.elastic).
        if shard_policy == "file":
            low = os.environ.get(protocol.ENV_MIN_WORKERS)
            raise elastic.ElasticConfigError(
                "Invalid value for argument `shard_policy`. Received: "
                "shard_policy='file' under an elastic launcher ("
                f"{protocol.ENV_MIN_WORKERS}={low}): with file sharding the "
                "examples of each global batch depend on the number of "
                "workers, so a resized run would train on other batches. "
                "Expected shard_policy='data' or 'auto' (which picks "
                "'data' in elastic runs)."
            )
        return policy.OFF if num_workers == 1 else policy.DATA
    if num_workers == 1:
        return policy.OFF
    if shard_policy == "data":
        return policy.DATA
    files = _input_files(dataset)
    if shard_policy == "file":
        if files is not None and 0 < len(files) < num_workers:
            raise ConfigError(
                f"shard_policy='file' needs at least one input file per "
                f"worker, but the dataset reads {len(files)} file(s) and there "
                f"are {num_workers} workers. Use shard_policy='data' or "
                "split the data into more files."
            )
        return policy.FILE
    # "auto": FILE when every worker gets at least one file, else DATA.
    if files and len(files) >= num_workers:
        return policy.FILE
    return policy.DATA


def distribute(
    dataset: tf.data.Dataset,
    strategy: tf.distribute.Strategy,
    *,
    global_batch_size: int | None,
    shard_policy: str = "auto",
    drop_remainder: bool = False,
    prefetch: bool = True,
    accumulation_steps: int = 1,
) -> tf.data.Dataset:
    """Prepares a dataset of examples for data-parallel `fit`.

    Batches to the global batch (split over replicas by the strategy), sets
    the auto-shard policy and prefetches. Pass the result to `model.fit`,
    `evaluate` or `predict`. The order of examples within each global batch
    is kept, so with a deterministic pipeline every step sees the same
    examples as on a single device.

    Args:
        dataset: `tf.data.Dataset` of single examples (not batched), or of
            global batches when `global_batch_size=None`.
        strategy: `tf.distribute.Strategy` the model is built under.
        global_batch_size: int or None. Examples per step over all replicas;
            must divide by `strategy.num_replicas_in_sync`. None if
            `dataset` is already batched to the global batch.
        shard_policy: str. How workers split the input:
            - `"auto"` (default): `"file"` when the dataset reads at least
              one file per worker (TFRecord, text lines, fixed-length
              records), else `"data"`; always `"data"` under an elastic
              launcher (`kerasdist.elastic`).
            - `"file"`: each worker reads its own subset of the files
              (refused under an elastic launcher: the batches would
              depend on the number of workers).
            - `"data"`: every worker reads all data and keeps its part of
              each global batch.
            - `"off"`: no sharding (each worker must feed different data
              itself).
            Single-worker strategies never shard.
        drop_remainder: bool. Drop a last partial global batch. Defaults to
            False.
        prefetch: bool. Append `prefetch(AUTOTUNE)`. Defaults to True.
        accumulation_steps: int. Training steps per optimizer update (the
            optimizer must accumulate as many, `kd.accumulate_gradients`):
            the dataset is batched by `global_batch_size /
            accumulation_steps`. Use `kd.elastic.batch_plan` to choose it.
            Defaults to 1.

    Returns:
        `tf.data.Dataset` of global batches (of their parts, with
        `accumulation_steps > 1`).

    A last partial batch is allowed here: evaluation and prediction are
    exact for any split. When `fit` trains on the dataset, kerasdist
    checks, before the first step, that its last batch divides over the
    replicas (of every allowed group size under an elastic launcher) and
    raises `UnevenBatchError` otherwise.

    Raises:
        kerasdist.errors.ConfigError: (a `ValueError`, permanent: exit 78
            under `kerasdist-run`) if `global_batch_size` does not divide
            over the replicas, `shard_policy` is unknown, or, with
            `shard_policy="file"`, the dataset has fewer global batches
            than there are workers.
        kerasdist.elastic.ElasticConfigError: under an elastic launcher,
            if some allowed group size cannot split `global_batch_size`,
            or `shard_policy="file"`.

    Example:

    ```python
    strategy = kd.get_strategy()
    train = kd.data.distribute(
        tf.data.Dataset.from_tensor_slices((x, y)).shuffle(1000, seed=1),
        strategy, global_batch_size=256)
    model.fit(train, epochs=3)
    ```
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            "Invalid value for argument `dataset`. Received: "
            f"{type(dataset).__name__}. Expected a tf.data.Dataset (wrap "
            "arrays with tf.data.Dataset.from_tensor_slices((x, y)))."
        )
    if shard_policy not in SHARD_POLICIES:
        raise ConfigError(
            "Invalid value for argument `shard_policy`. Received: "
            f"shard_policy={shard_policy!r}. Expected one of "
            f"{list(SHARD_POLICIES)}."
        )
    num_workers = _internals.num_workers(strategy)
    accumulation_steps = check_int("accumulation_steps", accumulation_steps)
    step_batch = None
    if global_batch_size is not None:
        global_batch_size = check_int("global_batch_size", global_batch_size)
        elastic.check_global_batch(global_batch_size, strategy)
        if global_batch_size % accumulation_steps:
            raise ConfigError(
                "Invalid value for argument `accumulation_steps`. Received: "
                f"accumulation_steps={accumulation_steps} with "
                f"global_batch_size={global_batch_size}. Expected a divisor "
                "of the global batch; kd.elastic.batch_plan chooses one."
            )
        step_batch = global_batch_size // accumulation_steps
        per_replica_batch_size(step_batch, strategy)
        dataset = dataset.batch(step_batch, drop_remainder=drop_remainder)
    batches = int(dataset.cardinality())
    if batches >= 0 and global_batch_size is None and num_workers > 1:
        warnings.warn(
            "kd.data.distribute(global_batch_size=None): the dataset is "
            "taken to be batched to the global batch already.",
            stacklevel=2,
        )
    policy = _choose_policy(dataset, shard_policy, num_workers)
    # Under DATA sharding every worker keeps its part of each global batch,
    # so any number of batches feeds every worker; only FILE
    # sharding can leave a worker without data.
    if policy == tf.data.experimental.AutoShardPolicy.FILE and (
            0 <= batches < num_workers):
        raise ConfigError(
            f"The dataset has {batches} global batch(es) but there are "
            f"{num_workers} workers reading their own files "
            "(shard_policy='file'), so some worker would have nothing to "
            "train on. Use shard_policy='data', more data, a smaller "
            "`global_batch_size`, or `.repeat()` with `steps_per_epoch`."
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    dataset = dataset.with_options(options)
    if prefetch:
        dataset = dataset.prefetch(tf.data.AUTOTUNE)
    if global_batch_size is not None:
        # Read by kd.callbacks.BackupAndRestore (the cursor records them)
        # through `batch_sizes_of`.
        dataset._kerasdist_batch_sizes = (  # noqa: SLF001 (our own mark)
            int(global_batch_size), step_batch)
    return dataset


def batch_sizes_of(dataset: object) -> tuple[int | None, int | None]:
    """The global batch and the dataset batch of a `fit` input, if known.

    Args:
        dataset: a dataset returned by `distribute` (which records both),
            or any `tf.data.Dataset` whose batch dimension is static (then
            both are that size).

    Returns:
        `(global_batch_size, step_batch_size)`: examples per optimizer
        update and per dataset batch (smaller with gradient accumulation);
        `(None, None)` when unknown.

    Example:

    >>> batch_sizes_of(tf.data.Dataset.range(8).batch(
    ...     4, drop_remainder=True))
    (4, 4)
    """
    recorded = getattr(dataset, "_kerasdist_batch_sizes", None)
    if recorded is not None:
        return recorded
    if not isinstance(dataset, tf.data.Dataset):
        return None, None
    leaves = [spec for spec in tf.nest.flatten(dataset.element_spec)
              if isinstance(spec, tf.TensorSpec) and spec.shape.rank]
    if leaves and leaves[0].shape[0] is not None:
        size = int(leaves[0].shape[0])
        return size, size
    return None, None

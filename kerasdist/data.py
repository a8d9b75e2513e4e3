"""Input pipelines for data parallelism: global batch, sharding.

Keras under `tf.distribute` treats every batch of a `tf.data.Dataset` as a
*global* batch and splits it across replicas. `distribute` batches a dataset
of single examples to the global batch, checks that the batch divides over
the replicas, and sets the auto-shard policy explicitly so that each worker
reads its part without TensorFlow's "unshardable source" warning.
"""

from __future__ import annotations

import os
import warnings

import tensorflow as tf

from kerasdist import _internals, elastic
from kerasdist._validate import check_int
from kerasdist.errors import PermanentError
from kerasdist.launch import protocol

__all__ = [
    "SHARD_POLICIES",
    "UnevenBatchError",
    "check_keras_batches",
    "distribute",
    "batch_sizes_of",
    "per_replica_batch_size",
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


def check_keras_batches(
    batch_size: int | None,
    partial_batch_size: int | None,
    strategy: tf.distribute.Strategy,
    num_examples: int | None = None,
) -> None:
    """Refuses batches that would not split evenly over the replicas.

    Called by kerasdist's strategies when Keras's `fit`, `evaluate` or
    `predict` distributes NumPy / tensor inputs, before the first step.

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
            not divide by `strategy.num_replicas_in_sync`.
        kerasdist.elastic.ElasticConfigError: under an elastic launcher,
            if some allowed group size cannot split `batch_size`.

    Example:

    >>> check_keras_batches(4, None, tf.distribute.get_strategy())
    """
    replicas = strategy.num_replicas_in_sync
    if batch_size is not None:
        elastic.check_global_batch(batch_size, strategy)
    if replicas == 1 or batch_size is None:
        return
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
    if partial_batch_size and partial_batch_size % replicas:
        total = f"{num_examples} examples" if num_examples else "the data"
        keep = (num_examples - partial_batch_size if num_examples else None)
        raise UnevenBatchError(
            "Invalid value for argument `batch_size`. Received: "
            f"batch_size={batch_size} with {total}, which leaves a last "
            f"batch of {partial_batch_size} example(s) in every epoch; it "
            f"does not divide over the {_replicas_text(strategy)}, so that "
            "step would differ from one device. Use a number of examples "
            f"whose remainder modulo batch_size is a multiple of {replicas}"
            + (f" (e.g. the first {keep} examples)" if keep else "")
            + ", or pass a tf.data.Dataset batched with drop_remainder=True "
            "(kd.data.distribute(..., drop_remainder=True))."
        )


def assert_even_batches(
    dataset: tf.data.Dataset, strategy: tf.distribute.Strategy
) -> tf.data.Dataset:
    """`dataset` whose global batches are checked to split evenly.

    A batch size known from the dataset's shapes is checked at once; an
    unknown one (e.g. a last partial batch) is checked as each batch is
    read, before the step that would train on it.

    Args:
        dataset: `tf.data.Dataset` of global batches.
        strategy: `tf.distribute.Strategy`.

    Returns:
        `tf.data.Dataset`: `dataset`, or `dataset` with a check mapped over
        it.

    Raises:
        UnevenBatchError: if the static batch size does not divide over
            the replicas. A dynamic one raises `tf.errors.
            InvalidArgumentError` with the same advice when it is read.

    Example:

    ```python
    ds = assert_even_batches(ds.batch(4, drop_remainder=True), strategy)
    ```
    """
    replicas = strategy.num_replicas_in_sync
    leaves = [spec for spec in tf.nest.flatten(dataset.element_spec)
              if isinstance(spec, tf.TensorSpec) and spec.shape.rank]
    if replicas == 1 or not leaves:
        return dataset
    static = leaves[0].shape[0]
    if static is not None:
        check_keras_batches(int(static), None, strategy)
        return dataset
    message = (
        "Invalid value for argument `batch_size`: a global batch of the "
        f"dataset does not divide over the {_replicas_text(strategy)} (its "
        "size is printed below), so the replicas would train on different "
        "numbers of examples. Batch the dataset to a multiple of "
        f"{replicas} with drop_remainder=True, e.g. kd.data.distribute(ds, "
        "strategy, global_batch_size=..., drop_remainder=True)."
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


def _check_last_batch(dataset, strategy, global_batch_size, drop_remainder):
    """Refuses a partial last batch that would split unevenly."""
    examples = int(dataset.cardinality())
    replicas = strategy.num_replicas_in_sync
    last = examples % global_batch_size if examples > 0 else 0
    if drop_remainder or not last % replicas:
        return
    raise UnevenBatchError(
        "Invalid value for argument `drop_remainder`. Received: "
        f"drop_remainder=False with {examples} examples and "
        f"global_batch_size={global_batch_size}, which leaves a last batch "
        f"of {last} example(s); it does not divide over the "
        f"{_replicas_text(strategy)}. Pass drop_remainder=True, or use "
        f"{examples - last % replicas} examples."
    )


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
        ValueError: if `global_batch_size` is not a positive integer divisible
            by the number of replicas.

    Example:

    >>> per_replica_batch_size(64, tf.distribute.get_strategy())
    64
    """
    replicas = strategy.num_replicas_in_sync
    global_batch_size = check_int("global_batch_size", global_batch_size)
    if global_batch_size % replicas:
        lower = global_batch_size // replicas * replicas
        raise ValueError(
            "Invalid value for argument `global_batch_size`. Received: "
            f"global_batch_size={global_batch_size}, which does not divide "
            f"over the {replicas} replicas in sync. Use a multiple of "
            f"{replicas}, e.g. {lower or replicas} or {lower + replicas}."
        )
    return global_batch_size // replicas


def _input_files(dataset: tf.data.Dataset) -> list[str] | None:
    """Files read by `dataset` if it reads files, else None."""
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(_internals.serialized_dataset_graph(dataset))
    nodes = list(graph.node)
    for f in graph.library.function:
        nodes.extend(f.node_def)
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
            raise ValueError(
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

    Raises:
        ValueError: if `global_batch_size` does not divide over the replicas,
            `shard_policy` is unknown, or the dataset has fewer global
            batches than there are workers (some worker would have no data).
        kerasdist.elastic.ElasticConfigError: under an elastic launcher,
            if some allowed group size cannot split `global_batch_size`,
            or `shard_policy="file"`.
        UnevenBatchError: if the number of examples is known and would
            leave a last batch that does not divide over the replicas
            (unless `drop_remainder=True`).

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
        raise ValueError(
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
            raise ValueError(
                "Invalid value for argument `accumulation_steps`. Received: "
                f"accumulation_steps={accumulation_steps} with "
                f"global_batch_size={global_batch_size}. Expected a divisor "
                "of the global batch; kd.elastic.batch_plan chooses one."
            )
        step_batch = global_batch_size // accumulation_steps
        per_replica_batch_size(step_batch, strategy)
        _check_last_batch(dataset, strategy, step_batch, drop_remainder)
        dataset = dataset.batch(step_batch, drop_remainder=drop_remainder)
    batches = int(dataset.cardinality())
    if 0 <= batches < num_workers:
        raise ValueError(
            f"The dataset has {batches} global batch(es) but there are "
            f"{num_workers} workers, so some worker would have nothing to "
            "train on. Use more data, a smaller `global_batch_size`, or "
            "`.repeat()` with `steps_per_epoch`."
        )
    if batches >= 0 and global_batch_size is None and num_workers > 1:
        warnings.warn(
            "kd.data.distribute(global_batch_size=None): the dataset is "
            "taken to be batched to the global batch already.",
            stacklevel=2,
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = _choose_policy(
        dataset, shard_policy, num_workers
    )
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

"""Averages the logs over workers so every worker decides the same.

Under `MultiWorkerMirroredStrategy`, Keras already averages the metrics it
computes in the train and test steps over all replicas. Values computed
outside the step differ per worker: a validation or a custom metric a
callback computes on the worker's own data, times, anything a callback puts
into `logs`. A callback that decides from such a value (`EarlyStopping`,
`ReduceLROnPlateau`, `ModelCheckpoint(save_best_only=True)`) then decides
differently on each worker: one worker stops while the others wait forever
in the next step's all-reduce.

`MetricAverage` replaces every numeric scalar in `logs` by its mean over
workers, in place, so every callback after it sees the same numbers on all
workers. Keras runs callbacks in list order and passes them the same `logs`
dict: put `MetricAverage` after the callbacks that add values to `logs`
and before those that read them (`EarlyStopping`, `ReduceLROnPlateau`,
`ModelCheckpoint`, `CSVLogger`, `TensorBoard`). Keras's own progress bar
and `History` run after all user callbacks.
"""

from __future__ import annotations

import zlib

import keras
import numpy as np
import tensorflow as tf

from kerasdist import _internals

__all__ = ["MetricAverage", "MetricAverageError", "average_over_workers"]


class MetricAverageError(RuntimeError):
    """Workers reported different log keys; no average is possible.

    Raised on every worker at the same step (the keys are compared through
    a collective first), so the group fails together instead of hanging.
    """


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return False
    try:
        dt = tf.as_dtype(dtype)
    except TypeError:
        return False
    return tuple(shape) == () and (dt.is_floating or dt.is_integer)


def _key_digest(keys: list[str]) -> tuple[float, float]:
    """Two small integers (exact in float64) identifying the key list."""
    raw = "\x00".join(keys).encode()
    return float(zlib.crc32(raw) & 0xFFFFF), float(zlib.adler32(raw) & 0xFFFFF)


def average_over_workers(
    values: np.ndarray, strategy: tf.distribute.Strategy
) -> np.ndarray:
    """Mean of a float vector over all workers (every worker must call it).

    Args:
        values: 1-D float array, the same length on every worker.
        strategy: `tf.distribute.Strategy` of the model.

    Returns:
        The element-wise mean over workers, as a float64 numpy array.

    Example:

    ```python
    avg = average_over_workers(np.array([loss]), model.distribute_strategy)
    ```
    """
    values = np.asarray(values, dtype=np.float64)
    workers = _internals.num_workers(strategy)
    if workers == 1:
        return values
    mean = getattr(strategy, "_kd_mean_over_workers", None)
    if mean is None:

        @tf.function(
            input_signature=[tf.TensorSpec([None], tf.float64)],
            autograph=False,
        )
        def mean(v):
            # Every replica of a worker holds the worker's value, so the mean
            # over replicas is the mean over workers (as many replicas on
            # each worker). A tf.function: eager MWMS collectives are slow.
            per_replica = strategy.run(tf.identity, args=(v,))
            return strategy.reduce(
                tf.distribute.ReduceOp.MEAN, per_replica, axis=None
            )

        # kerasdist's own cache on the strategy, not a TF attribute.
        strategy._kd_mean_over_workers = mean  # noqa: SLF001
    return np.asarray(mean(tf.constant(values)), dtype=np.float64)


class MetricAverage(keras.callbacks.Callback):
    """Replaces each numeric value in `logs` by its mean over workers.

    Runs at the end of every epoch (train and validation logs, plus values
    earlier callbacks put into `logs`), and optionally after every training
    batch. Non-numeric values are left alone. With one worker (no strategy,
    `MirroredStrategy`) it does nothing.

    All workers must call it at the same points, as they do in `fit`. Put
    it after the callbacks that add values to `logs` and before those that
    read them.

    Args:
        every_batch: bool. Also average batch logs in
            `on_train_batch_end` (one small all-reduce per step). Defaults
            to False.

    Raises:
        MetricAverageError: if workers' logs hold different keys (on every
            worker at once).

    Example:

    ```python
    model.fit(ds, epochs=50, validation_data=val, callbacks=[
        LocalValidation(),             # writes logs["local_val_loss"]
        kd.callbacks.MetricAverage(),
        keras.callbacks.EarlyStopping("local_val_loss", patience=3),
    ])
    ```
    """

    def __init__(self, every_batch: bool = False):
        super().__init__()
        if not isinstance(every_batch, bool):
            raise ValueError(
                "Invalid value for argument `every_batch`. Received: "
                f"every_batch={every_batch!r}. Expected True or False."
            )
        self.every_batch = every_batch

    def _strategy(self) -> tf.distribute.Strategy:
        return getattr(self.model, "distribute_strategy", None) or (
            tf.distribute.get_strategy()
        )

    def _average(self, logs, where: str) -> None:
        if not logs:
            return
        strategy = self._strategy()
        if _internals.num_workers(strategy) == 1:
            return
        keys = sorted(k for k, v in logs.items() if _is_number(v))
        digest = _key_digest(keys)
        head = np.array([len(keys), *digest], dtype=np.float64)
        mean = average_over_workers(head, strategy)
        if not np.allclose(mean, head, rtol=0, atol=1e-6):
            raise MetricAverageError(
                f"MetricAverage at {where}: workers have different numeric "
                f"log keys; this worker has {keys}. Make every worker put "
                "the same keys into logs (or add them before MetricAverage "
                "on all workers)."
            )
        if not keys:
            return
        values = np.array(
            [float(keras.ops.convert_to_numpy(logs[k])) for k in keys]
        )
        averaged = average_over_workers(values, strategy)
        for k, v in zip(keys, averaged, strict=True):
            logs[k] = float(v)

    def on_epoch_end(self, epoch, logs=None):
        self._average(logs, f"the end of epoch {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        if self.every_batch:
            self._average(logs, f"the end of batch {batch}")

    def get_config(self) -> dict:
        return {"every_batch": self.every_batch}

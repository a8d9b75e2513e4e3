"""Training throughput: examples per second, step time, scaling efficiency.

Scaling efficiency compares the distributed throughput with N times a
single-replica baseline measured by the user: 1.0 means perfect linear
scaling; the Horovod paper reports 0.88-0.90 for ResNet on 128+ GPUs.
"""

from __future__ import annotations

import statistics
import time

import keras
from absl import logging

from kerasdist import cluster as cluster_lib
from kerasdist._validate import check_int

__all__ = ["Throughput"]


class Throughput(keras.callbacks.Callback):
    """Measures examples/second and step time; writes them into `logs`.

    At every epoch end it adds to `logs` (so `CSVLogger`, `TensorBoard` and
    `History` record them; put `Throughput` before those callbacks):

    - `examples_per_sec`: global examples per second (all replicas);
    - `examples_per_sec_per_replica`: the same divided by the replicas;
    - `step_time`: median seconds per training step;
    - `scaling_efficiency` (with `baseline_examples_per_sec`):
      `examples_per_sec / (replicas * baseline_examples_per_sec)`.

    The first `skip_steps` steps of the first epoch (tracing, warm-up) are
    not timed. Step times are taken between `on_train_batch_begin` and
    `on_train_batch_end`; Keras's logs are fetched from the device at every
    step, so the time includes the step's completion. At the end of
    training the chief logs a summary, also kept in `summary`.

    Args:
        global_batch_size: int. Examples per step over all replicas (the
            batch size of the dataset given to `fit`).
        baseline_examples_per_sec: float or None. Throughput of one replica
            alone (measured by you with the same per-replica batch), for
            `scaling_efficiency`. Defaults to None.
        skip_steps: int. Steps not timed at the start of training. Defaults
            to 1.
        num_replicas: int or None. Defaults to the model's strategy's
            `num_replicas_in_sync`.

    Raises:
        ValueError: on a non-positive `global_batch_size`,
            `baseline_examples_per_sec` or negative `skip_steps`.

    Example:

    ```python
    model.fit(ds, epochs=3, callbacks=[
        kd.callbacks.Throughput(global_batch_size=256,
                                baseline_examples_per_sec=1200.0),
        keras.callbacks.CSVLogger("log.csv"),
    ])
    ```
    """

    def __init__(
        self,
        global_batch_size: int,
        baseline_examples_per_sec: float | None = None,
        skip_steps: int = 1,
        num_replicas: int | None = None,
    ):
        super().__init__()
        global_batch_size = check_int(
            "global_batch_size", global_batch_size,
            hint="It counts examples per step over all replicas.",
        )
        if baseline_examples_per_sec is not None and (
            isinstance(baseline_examples_per_sec, bool)
            or not isinstance(baseline_examples_per_sec, (int, float))
            or baseline_examples_per_sec <= 0
        ):
            raise ValueError(
                "Invalid value for argument `baseline_examples_per_sec`. "
                f"Received: baseline_examples_per_sec="
                f"{baseline_examples_per_sec!r}. Expected a positive number "
                "or None."
            )
        skip_steps = check_int("skip_steps", skip_steps, 0)
        self.global_batch_size = global_batch_size
        self.baseline_examples_per_sec = (
            None if baseline_examples_per_sec is None
            else float(baseline_examples_per_sec)
        )
        self.skip_steps = skip_steps
        self.num_replicas = num_replicas
        self.summary: dict = {}

    def _replicas(self) -> int:
        if self.num_replicas:
            return self.num_replicas
        strategy = getattr(self.model, "distribute_strategy", None)
        return int(getattr(strategy, "num_replicas_in_sync", 1))

    def on_train_begin(self, logs=None):
        self._seen = 0
        self._all_times: list[float] = []
        self._epoch_rows: list[dict] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._t0
        self._seen += 1
        if self._seen > self.skip_steps:
            self._times.append(elapsed)

    def _keys(self) -> list[str]:
        keys = ["examples_per_sec", "examples_per_sec_per_replica",
                "step_time"]
        if self.baseline_examples_per_sec is not None:
            keys.append("scaling_efficiency")
        return keys

    def _stats(self, times: list[float]) -> dict:
        replicas = self._replicas()
        total = sum(times)
        eps = self.global_batch_size * len(times) / total
        row = {
            "examples_per_sec": eps,
            "examples_per_sec_per_replica": eps / replicas,
            "step_time": statistics.median(times),
        }
        if self.baseline_examples_per_sec is not None:
            row["scaling_efficiency"] = eps / (
                replicas * self.baseline_examples_per_sec
            )
        return row

    def on_epoch_end(self, epoch, logs=None):
        if not self._times:
            # Keep the columns of CSVLogger & co. stable: no timed step yet.
            if logs is not None:
                logs.update({k: float("nan") for k in self._keys()})
            return
        row = self._stats(self._times)
        self._all_times.extend(self._times)
        self._epoch_rows.append(row)
        if logs is not None:
            logs.update(row)

    def on_train_end(self, logs=None):
        if not self._all_times:
            return
        self.summary = {
            **self._stats(self._all_times),
            "steps_timed": len(self._all_times),
            "replicas": self._replicas(),
            "global_batch_size": self.global_batch_size,
        }
        if cluster_lib.is_chief():
            s = self.summary
            logging.info(
                "Throughput: %.1f examples/s (%.1f per replica, %d "
                "replicas), median step %.4fs over %d steps%s",
                s["examples_per_sec"], s["examples_per_sec_per_replica"],
                s["replicas"], s["step_time"], s["steps_timed"],
                "" if "scaling_efficiency" not in s
                else f", scaling efficiency {s['scaling_efficiency']:.3f}",
            )

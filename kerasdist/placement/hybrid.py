"""Hybrid data × pipeline parallelism: R pipeline replicas of K stages.

`HybridPipelineModel` runs R copies of a `PipelineModel`, replica r's
stages on row r of a device grid (after `kd.placement.join_cluster()`,
R·K workers). The global batch is split into R contiguous parts, one per
replica, and each part into M micro-batches. The loss is computed once on
the whole global batch (as Keras computes it), so each replica's gradient
is its share of the global mean; the R shares of every variable are summed
on each replica's own stage worker (every worker gets the other replicas'
gradients of its stage: an all-gather, never through the chief), and each
copy applies the same update with its own optimizer slots. Training equals
the unsplit model trained on the same global batch, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from kerasdist.placement import pipeline
from kerasdist.placement import planning as plan_lib
from kerasdist.placement.pipeline import (
    _apply_on_devices,
    _device_of,
    _split_all,
    _sum_grads,
)

__all__ = ["HybridPipelineModel"]


class HybridPipelineModel(pipeline.PipelineModel):
    """R pipeline replicas of a model, each over its own K stage devices.

    Data parallelism across replicas, pipeline parallelism within each:
    `devices[r][k]` runs stage k of replica r. Replica 0 is the wrapped
    model itself (its layers, weights and variable paths); replicas 1 to
    R-1 are copies (`keras.models.clone_model`) with the same weights,
    each stage's variables and optimizer slots on its own device. Each
    training batch (the global batch) is split into R equal parts, one per
    replica, and each part into `num_microbatches` micro-batches; the loss
    is computed on the whole global batch, each stage's gradients are
    summed over the replicas on the replicas' stage devices, and every copy
    applies the same update, so the copies stay equal and training equals
    the unsplit model's on the same global batch.

    `evaluate` and `predict` run on replica 0. `save_weights` and
    `load_weights` cover every replica's weights, and
    `kd.callbacks.BackupAndRestore` every replica's variables and
    optimizer slots (`model.get_weights()` are replica 0's).
    BatchNormalization statistics are per micro-batch and per replica
    (each replica keeps its own moving statistics; evaluation uses
    replica 0's). `global_clipnorm` is not
    supported (use `clipnorm` or `clipvalue`).

    Args:
        model: keras.Model. A built Sequential or functional model.
        devices: list of R lists of K str. `devices[r]` are the stage
            devices of replica r, e.g. `[[w1, w2], [w3, w4]]` for 2
            replicas of 2 stages on the devices `join_cluster()` returned.
        num_microbatches: int. Micro-batches per replica per batch, ≥ 1.
            A training batch must hold a multiple of
            `len(devices) * num_microbatches` examples. Default 1.
        plan: kerasdist.placement.Plan or None. Default: parameters
            balanced over K stages.
        name: str or None. Model name. Default: `<model name>_hybrid`.

    Raises:
        ValueError: for `devices` that is not a non-empty list of equally
            long non-empty lists of device names, a device named twice,
            and everything `PipelineModel` rejects.

    Example:

    ```python
    kd.virtual_cpus(4)
    model = keras.Sequential([keras.Input((64,)),
                              keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(10)])
    hybrid = kd.placement.HybridPipelineModel(
        model, [["/cpu:0", "/cpu:1"], ["/cpu:2", "/cpu:3"]],
        num_microbatches=2)
    hybrid.compile(optimizer="adam",
                   loss=keras.losses.SparseCategoricalCrossentropy(True))
    hybrid.fit(x, y, batch_size=64)  # 2 replicas × 2 micro-batches of 16
    ```
    """

    def __init__(
        self,
        model: keras.Model,
        devices: Sequence[Sequence[str]],
        num_microbatches: int = 1,
        plan: plan_lib.Plan | None = None,
        name: str | None = None,
    ):
        grid = _check_grid(devices)
        super().__init__(
            model, grid[0], num_microbatches=num_microbatches, plan=plan,
            name=name or f"{model.name}_hybrid",
        )
        copies = []
        for r, row in enumerate(grid[1:], start=1):
            clone = keras.models.clone_model(model)
            clone.set_weights(model.get_weights())
            copies.append(pipeline.PipelineModel(
                clone, row, num_microbatches=num_microbatches,
                plan=self.plan, name=f"{self.name}_replica_{r}",
            ))
        # Tracked, so their variables are trained, saved and restored.
        self.replicas = copies

    @property
    def num_replicas(self) -> int:
        """R, the number of pipeline replicas."""
        return 1 + len(self.replicas)

    @property
    def device_grid(self) -> list[list[str]]:
        """Stage devices of each replica (`devices[r][k]`)."""
        return [p.devices for p in self.pipelines()]

    def pipelines(self) -> list[pipeline.PipelineModel]:
        """The R pipelines: this model (replica 0), then its copies.

        A method, not a property: Keras's weight files walk a model's
        attributes, and a list holding the model itself would never end.

        Returns:
            list of PipelineModel. Each one's `inner_model` holds that
            replica's layers and weights.
        """
        return [self, *self.replicas]

    @property
    def losses(self) -> list:
        """Replica 0's regularization losses (the copies' are equal)."""
        return self.inner_model.losses

    def compile(self, *args, **kwargs):
        """Configures training; see `keras.Model.compile`.

        Builds the optimizer over every replica's variables, each slot on
        its variable's device.

        Raises:
            ValueError: for an optimizer with `global_clipnorm`.
        """
        super().compile(*args, **kwargs)
        if getattr(self.optimizer, "global_clipnorm", None):
            raise ValueError(
                "HybridPipelineModel does not support `global_clipnorm` "
                "(its norm would count every replica's copy). Received: "
                f"global_clipnorm={self.optimizer.global_clipnorm}. "
                "Expected clipnorm= or clipvalue= instead."
            )

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        pipes = self.pipelines()
        # Each replica's stages (kerasdist's own PipelineModel internals).
        stages = [p._pipe for p in pipes]  # noqa: SLF001
        m = self.num_microbatches
        parts = _split_replicas(
            self._pipe.graph.flat_inputs(x), len(pipes), m
        )
        values, tapes = [], []
        for p, st, xs in zip(pipes, stages, parts, strict=True):
            vals = [
                dict(zip(st.graph.input_ids, mx, strict=True))
                for mx in _split_all(xs, m, strict=True)
            ]
            values.append(vals)
            tapes.append(p._forward(vals))  # noqa: SLF001
        # The loss sees every replica's outputs keyed by replica 0's ids.
        ids = [st.graph.output_ids for st in stages]
        keyed = [
            {t0: vals[t] for t0, t in zip(ids[0], ids[r], strict=True)}
            for r in range(len(pipes)) for vals in values[r]
        ]
        y_pred, grads, var_grads = self._loss_backward(
            x, y, sample_weight, keyed
        )
        for r, p in enumerate(pipes):
            mine = [
                {t: g[t0] for t0, t in zip(ids[0], ids[r], strict=True)
                 if t0 in g}
                for g in grads[r * m:(r + 1) * m]
            ]
            for stage in reversed(stages[r].stages):
                p._stage_backward(  # noqa: SLF001
                    stage, values[r], tapes[r], mine, var_grads
                )
        self._apply_replica_gradients(pipes, var_grads)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _apply_replica_gradients(self, pipes, var_grads) -> None:
        """Sums each variable's gradient over replicas on every copy's
        device (same parts, same order: equal sums), then applies them."""
        local = {}
        for p in pipes:
            for v in p.inner_model.trainable_variables:
                with tf.device(_device_of(v)):
                    local[id(v)] = _sum_grads(var_grads.get(id(v)), v)
        variables, summed = [], []
        copies = zip(
            *(p.inner_model.trainable_variables for p in pipes), strict=True
        )
        for group in copies:
            shares = [local[id(v)] for v in group]
            for v in group:
                with tf.device(_device_of(v)):
                    summed.append(_sum_grads(shares, v))
                variables.append(v)
        _apply_on_devices(self.optimizer, summed, variables)

    def _check_batches(self, x, batch_size, validation_split, steps_per_epoch):
        """Every training batch must split into R·M equal micro-batches."""
        r = self.num_replicas
        n = r * self.num_microbatches
        if isinstance(x, tf.data.Dataset):
            first = tf.nest.flatten(x.element_spec)[0]
            size = first.shape[0] if first.shape.rank else None
            if size is not None and size % n:
                raise ValueError(_batch_message(size, r, n))
            return
        flat = tf.nest.flatten(x)
        if not flat or not hasattr(flat[0], "shape") or not len(flat[0].shape):
            return  # a generator or PyDataset: checked at each step
        batch_size = 32 if batch_size is None else batch_size
        if batch_size % n:
            raise ValueError(
                "Invalid value for argument `batch_size`. Received: "
                f"batch_size={batch_size}, which {r} replicas × "
                f"num_microbatches={self.num_microbatches} = {n} does not "
                f"divide. Expected a multiple of {n}."
            )
        n_train = int(np.floor(int(flat[0].shape[0]) * (1 - validation_split)))
        last = n_train % batch_size
        if last % n and not steps_per_epoch:
            raise ValueError(
                f"The last training batch would hold {last} examples "
                f"({n_train} examples, batch_size={batch_size}), which {r} "
                f"replicas × num_microbatches={self.num_microbatches} = {n} "
                "does not divide. Drop the remainder or choose sizes that "
                "divide."
            )


def _check_grid(devices) -> list[list[str]]:
    """`devices` as R ≥ 1 equally long, non-empty rows of device names."""

    def bad(why):
        return ValueError(
            "Invalid value for argument `devices`. Received: "
            f"devices={devices!r} ({why}). Expected a list of R lists of "
            "K device names, one list per pipeline replica, e.g. "
            "[[w1, w2], [w3, w4]] for 2 replicas of 2 stages."
        )

    if isinstance(devices, str) or not isinstance(devices, Sequence):
        raise bad("not a list of lists")
    grid = []
    for row in devices:
        if isinstance(row, str) or not isinstance(row, Sequence):
            raise bad(f"row {row!r} is not a list")
        grid.append(list(row))
    if not grid or not grid[0]:
        raise bad("no device")
    lengths = [len(row) for row in grid]
    if len(set(lengths)) > 1:
        raise bad(f"ragged: rows of {lengths} devices")
    flat = [d for row in grid for d in row]
    twice = sorted({d for d in flat if flat.count(d) > 1})
    if twice:
        raise bad(f"{twice} named more than once")
    return grid


def _batch_message(size, r, n):
    return (
        f"Batch size {size} is not divisible by {r} replicas × "
        f"num_microbatches = {n}. Expected every training batch to hold a "
        f"multiple of {n} examples (choose batch_size accordingly and drop "
        "the remainder)."
    )


def _split_replicas(flat, r, m):
    """Splits each input into `r` equal parts, checking R·M divides."""
    flat = [tf.convert_to_tensor(t) for t in flat]
    static = flat[0].shape[0]
    if static is not None and static % (r * m):
        raise ValueError(_batch_message(static, r, r * m))
    if static is None:
        check = tf.debugging.assert_equal(
            tf.shape(flat[0])[0] % (r * m), 0,
            message=_batch_message("(dynamic)", r, r * m),
        )
        with tf.control_dependencies([check]):
            flat = [tf.identity(t) for t in flat]
    if r == 1:
        return [flat]
    return [list(ps) for ps in zip(*(tf.split(t, r) for t in flat),
                                   strict=True)]

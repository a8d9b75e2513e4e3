"""Local SGD and DiLoCo for Keras 3 `fit`: communicate every H steps.

`kd.callbacks.LocalSGD(sync_every=H)` makes every replica of a
`kd.MirroredStrategy` or `kd.MultiWorkerMirroredStrategy` train on its own
for H steps, with its own weights and its own optimizer state, without any
gradient all-reduce. Every H steps the replicas all-reduce once: the mean
pseudo-gradient `anchor - local weights` (and the mean of the non-trainable
weights, e.g. BatchNormalization statistics) is applied to the shared
anchor weights with an outer optimizer, and every replica restarts from the
new anchor. The default outer optimizer, `SGD(learning_rate=1.0)`, makes the
sync plain model averaging (local SGD, Stich 2019; Lin et al. 2020);
`keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)` gives DiLoCo
(Douillard et al. 2023).

How the replicas diverge. Under tf.distribute a model variable is a
`MirroredVariable`: one component variable per replica, which replica
context reads locally. Keras's TensorFlow optimizer all-reduces the
gradients (`TFOptimizer._all_reduce_sum_gradients`) and then updates every
component with the same reduced gradient. LocalSGD replaces that all-reduce
by the replica's own gradient (scaled back by the number of replicas, which
Keras divides every replica's loss by), so each component is updated with
its own gradient: the components are the per-replica copies, and the
optimizer slots, also mirrored, become per-replica optimizer states.

State and BackupAndRestore. The anchor weights, the outer optimizer's
variables, the step within the round and, for every model and optimizer
variable, the stacked per-replica values (gathered from all replicas when
read) are attached to the model's optimizer, so `kd.callbacks.
BackupAndRestore` saves and restores them with the optimizer and a run
interrupted mid-round resumes exactly.

`dynamic_steps=True` makes a round a wall-time budget instead of H steps
(see `_local_sgd_rounds`): a slow worker runs fewer steps and its
pseudo-gradient weighs less, instead of holding the others at each sync.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kerasdist import _internals
from kerasdist import cluster as cluster_lib
from kerasdist import compression as compression_lib
from kerasdist._validate import check_int
from kerasdist.callbacks import _local_sgd_rounds as rounds_lib

__all__ = ["AllReduceCounter", "LocalSGD", "diloco_risks"]

_STATE_ATTR = "_kd_local_sgd"
# From benchmarks/communication_efficiency.py's sweep (outer lr x momentum
# x H, inner AdamW and inner SGD + momentum 0.9, 16 and 64 outer steps): on
# an inner optimizer with momentum, outer Nesterov SGD matched plain
# averaging (within 0.5 pp) when lr / (1 - momentum) <= 1.4 (0.5 or 0.7
# with momentum 0.5) and fell behind above (1.0 with 0.5: -2 pp at H = 32;
# DiLoCo's 0.7 with 0.9, a gain of 7: -49 pp).
_MAX_GAIN_ON_MOMENTUM = 1.5
# Outer momentum needs about this many times its horizon 1 / (1 - mu) of
# outer steps: 0.9 needs 100 (DiLoCo ran hundreds; OpenDiLoCo 176).
_HORIZONS = 10


class AllReduceCounter:
    """Counts the all-reduces a strategy executes, and the bytes they send.

    Wraps the strategy's batch all-reduce (the collective Keras uses for
    gradients and LocalSGD uses for pseudo-gradients) with a counter that
    runs inside the traced training function, so it counts collectives
    executed, not traced. Reductions through `strategy.reduce` (logs,
    metric reads) are not counted. Create it before the model trains:
    functions traced earlier are not instrumented.

    Args:
        strategy: `tf.distribute.MirroredStrategy` or
            `tf.distribute.MultiWorkerMirroredStrategy` (or a kd subclass).

    Example:

    ```python
    counter = kd.callbacks.AllReduceCounter(strategy)
    model.fit(dataset, epochs=1)
    print(counter.calls, counter.bytes)
    ```
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        with tf.init_scope():
            self._calls = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="allreduce_calls")
            self._bytes = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="allreduce_bytes")
        self._strategy = strategy

        def count(pairs: list) -> None:
            nbytes = 0
            for value, _ in pairs:
                part = strategy.experimental_local_results(value)[0]
                if part.shape.is_fully_defined():
                    nbytes += part.shape.num_elements() * part.dtype.size
            self._calls.assign_add(1)
            self._bytes.assign_add(nbytes)

        _internals.instrument_batch_reduce(strategy, count)

    @property
    def calls(self) -> int:
        """Number of batch all-reduces executed so far."""
        return int(self._calls.numpy())

    @property
    def bytes(self) -> int:
        """Bytes each replica contributed to those all-reduces."""
        return int(self._bytes.numpy())

    def reset(self) -> None:
        """Sets both counts back to zero."""
        self._calls.assign(0)
        self._bytes.assign(0)


class _ReplicaLocalUpdates:
    """The gradient "all-reduce" of local training: none.

    Installed on an optimizer with `_internals.set_gradient_all_reduce`,
    it hands every replica its own gradient instead of the all-reduced
    sum, so each component of a `MirroredVariable` (and of each mirrored
    optimizer slot) follows its own replica.

    Args:
        scale_by_replicas: bool. Multiply each gradient by the number of
            replicas, undoing Keras's per-replica loss scaling; False for an
            optimizer fed already-averaged values (the outer optimizer).
    """

    def __init__(self, scale_by_replicas: bool):
        self.scale_by_replicas = scale_by_replicas

    def __call__(self, grads_and_vars):
        if tf.distribute.get_replica_context() is None:
            return list(grads_and_vars)
        n = tf.distribute.get_strategy().num_replicas_in_sync
        if not self.scale_by_replicas or n == 1:
            return list(grads_and_vars)
        # Keras divides each replica's loss by the number of replicas
        # (keras/src/losses/loss.py, scale_loss_for_distribution) so that
        # the all-reduced SUM is the mean gradient; alone, a replica's
        # gradient must be scaled back.
        return [
            (None if g is None else g * tf.cast(n, g.dtype), v)
            for g, v in grads_and_vars
        ]


class _ReplicaStack:
    """The values of one variable on every replica, as one array.

    Reads gather the component of every replica (an all-gather under
    multi-worker, which every worker joins); writes give each local
    component its row. Attached to the optimizer's variables so backups
    keep per-replica state.
    """

    def __init__(self, state, index, variable):
        self._state = state
        self._index = index
        self._variable = variable
        self.dtype = variable.dtype
        self.shape = (
            state.strategy.num_replicas_in_sync, *tuple(variable.shape))
        self.path = f"local_sgd/replicas/{variable.path}"
        self.name = self.path
        self.trainable = False

    def numpy(self) -> np.ndarray:
        return self._state.stacked_values()[self._index]

    def assign(self, value) -> None:
        value = np.asarray(value)
        parts = self._state.strategy.experimental_local_results(
            _internals.tf_variable(self._variable))
        for part, rid in zip(parts, self._state.replica_ids, strict=True):
            part.assign(value[rid])
        self._state.invalidate()

    def __repr__(self) -> str:
        return f"<ReplicaStack {self.path} shape={self.shape}>"


class _State:
    """What LocalSGD keeps for one model, attached to its optimizer."""

    def __init__(self, owner, model, outer):
        strategy = model.distribute_strategy
        optimizer = model.optimizer
        self.owner = owner
        self.strategy = strategy
        self.trainable = list(model.trainable_variables)
        self.averaged = [
            v for v in model.non_trainable_variables
            if v.dtype in ("float16", "bfloat16", "float32", "float64")
        ]
        inner_vars = list(optimizer.variables)
        with strategy.scope():
            self.anchor = [
                optimizer.add_variable_from_reference(
                    v, name="local_sgd_anchor")
                for v in self.trainable
            ]
            # int8 error feedback: what each replica's rounding lost.
            self.residual = [
                optimizer.add_variable_from_reference(
                    v, name="local_sgd_residual", initializer="zeros")
                for v in self.trainable
            ] if owner.compression == "int8" else []
            self.round_step = optimizer.add_variable(
                (), dtype="int64", aggregation="only_first_replica",
                name="local_sgd_round_step")
            # Keras's TF optimizer binds the strategy current at creation;
            # the user's outer optimizer is recreated from its config here.
            outer = type(outer).from_config(outer.get_config())
            outer.build(self.anchor)
        for a, v in zip(self.anchor, self.trainable, strict=True):
            a.assign(v)
        self.outer = outer
        _internals.set_gradient_all_reduce(outer, _ReplicaLocalUpdates(False))
        for v in outer.variables:
            _internals.track_optimizer_state(optimizer, v)
        self.replica_ids = _local_replica_ids(strategy)
        self.stacked = [
            v for v in list(model.variables) + inner_vars + self.residual
            if _internals.is_mirrored(v)
        ]
        for i, v in enumerate(self.stacked):
            _internals.track_optimizer_state(
                optimizer, _ReplicaStack(self, i, v))
        self._cache: list | None = None
        # Set by LocalSGD(dynamic_steps=True) while workers are apart.
        self.mid_dynamic_round = False
        self._gather = tf.function(self._gather_all, autograph=False)
        self.sync = tf.function(self._sync, autograph=False)

    def _gather_all(self):
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            return [
                ctx.all_gather(tf.expand_dims(
                    tf.convert_to_tensor(_internals.tf_variable(v)), 0),
                    axis=0)
                for v in self.stacked
            ]

        result = self.strategy.run(replica_fn)
        return [self.strategy.experimental_local_results(r)[0]
                for r in result]

    def stacked_values(self) -> list:
        """Every stacked variable's per-replica values (cached)."""
        if self._cache is None:
            if self.mid_dynamic_round:
                raise ValueError(
                    "kd.callbacks.LocalSGD(dynamic_steps=True) cannot save "
                    "or read per-replica state mid-round: the workers are "
                    "at different steps and would not meet at the "
                    "collective. Back up with BackupAndRestore("
                    "save_freq='epoch'); an epoch ends on a common sync."
                )
            self._cache = [np.asarray(t) for t in self._gather()]
        return self._cache

    def invalidate(self) -> None:
        self._cache = None

    def _sync(self, compression, report=None):
        """All-reduces the pseudo-gradients and moves every replica on.

        Args:
            compression: str or None.
            report: float32 tensor (`_local_sgd_rounds.RoundClock.report`)
                or None. With
                dynamic steps, this worker's row: it is all-gathered and
                each pseudo-gradient is weighted by its steps.

        Returns:
            The all-gathered rows (one per replica), or an empty tensor.
        """
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            rows = tf.zeros((0, rounds_lib.ROW))
            deltas = [
                tf.convert_to_tensor(_internals.tf_variable(a))
                - tf.convert_to_tensor(_internals.tf_variable(w))
                for a, w in zip(self.anchor, self.trainable, strict=True)
            ]
            if report is not None:
                # Weighted by samples: steps / mean steps over replicas.
                rows = ctx.all_gather(report[None], axis=0)
                weight = report[0] / tf.reduce_mean(rows[:, 0])
                deltas = [d * tf.cast(weight, d.dtype) for d in deltas]
            # Reads of non-trainable weights carry no device; all values
            # of one batch all-reduce must sit on the replica's device.
            device = deltas[0].device if deltas else ""
            with tf.device(device):
                stats = [
                    tf.identity(_internals.tf_variable(v))
                    for v in self.averaged
                ]
            residuals = []
            if compression == "int8":
                mean, residuals = self._int8_mean(ctx, deltas)
                reduced = mean + _all_reduce_mean(ctx, stats, None)
            else:
                reduced = _all_reduce_mean(ctx, deltas + stats, compression)
            n = len(deltas)
            self.outer.apply(reduced[:n], self.anchor)
            new = [
                tf.convert_to_tensor(_internals.tf_variable(a))
                for a in self.anchor
            ]
            targets = [
                _internals.tf_variable(v)
                for v in self.trainable + self.averaged + self.residual
            ]
            ctx.merge_call(_assign_all, args=(
                targets, new + reduced[n:] + residuals))
            return rows

        return self.strategy.experimental_local_results(
            self.strategy.run(replica_fn))[0]

    def _int8_mean(self, ctx, deltas):
        """Mean of `deltas` over replicas, one byte per value on the wire.

        Returns:
            (means, this replica's new residuals).
        """
        if not deltas:
            return [], []
        replicas = self.strategy.num_replicas_in_sync
        levels = compression_lib.int8_levels(replicas)
        values = [
            d + tf.convert_to_tensor(_internals.tf_variable(e))
            for d, e in zip(deltas, self.residual, strict=True)
        ]
        maxima = tf.stack([tf.reduce_max(tf.abs(v)) for v in values])
        # One scale per tensor, the same on every replica.
        scales = tf.reduce_max(
            ctx.all_gather(maxima[None], axis=0), axis=0) / levels
        # All values of one batch all-reduce must sit on the replica's
        # device (the constants in pack_int8 would not).
        with tf.device(deltas[0].device):
            quantized = [
                compression_lib.quantize_int8(v, scales[i], levels)
                for i, v in enumerate(values)
            ]
            packed = tf.concat(
                [compression_lib.pack_int8(q) for q, _ in quantized], 0)
        # One int32 tensor for all: MirroredStrategy sends int32 through a
        # new ReductionToOneDevice per value and then refuses a batch of
        # several (mirrored_strategy.py, _get_cross_device_ops).
        summed = tf.split(
            ctx.all_reduce(tf.distribute.ReduceOp.SUM, [packed])[0],
            [-(-v.shape.num_elements() // 4) for v in values])
        means = [
            tf.cast(compression_lib.unpack_int8(s, tf.shape(v)), v.dtype)
            * scales[i] / replicas
            for i, (s, v) in enumerate(zip(summed, values, strict=True))
        ]
        return means, [r for _, r in quantized]


def _assign_all(strategy, variables, values):
    for var, value in zip(variables, values, strict=True):
        strategy.extended.update(
            var, lambda v, x: v.assign(tf.cast(x, v.dtype)), args=(value,),
            group=False)


def _all_reduce_mean(ctx, values, compression):
    if not values:
        return []
    if compression is None:
        return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, values)

    def merge(strategy, values):
        return compression_lib.batch_reduce(
            strategy.extended.batch_reduce_to, compression,
            tf.distribute.ReduceOp.MEAN, [(v, v) for v in values], None)

    return ctx.merge_call(merge, args=(values,))


def _local_replica_ids(strategy) -> list[int]:
    def replica_fn():
        ctx = tf.distribute.get_replica_context()
        return tf.identity(ctx.replica_id_in_sync_group)

    ids = tf.function(lambda: strategy.run(replica_fn))()
    return [int(i) for i in strategy.experimental_local_results(ids)]


def _momentum(optimizer: Any) -> float:
    value = getattr(optimizer, "momentum", 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def diloco_risks(
    outer_optimizer: keras.optimizers.Optimizer,
    inner_optimizer: keras.optimizers.Optimizer,
    outer_steps: int | None = None,
) -> list[str]:
    """What makes an outer optimizer likely to fall behind plain averaging.

    `LocalSGD` warns with these before the first step. Two known risks of
    an outer SGD with momentum mu (DiLoCo's is SGD(0.7, momentum=0.9,
    nesterov=True)), each measured by `benchmarks/communication_efficiency`:

    - on an inner optimizer that has momentum of its own (SGD or RMSprop
      with `momentum` > 0): both accumulate the same direction and each
      averaged delta is applied up to lr / (1 - mu) times (7x for DiLoCo's);
      above 1.5x the sweep fell behind averaging. DiLoCo assumes an inner
      AdamW;
    - too few outer steps for mu: momentum needs about 10 / (1 - mu) outer
      steps (100 for 0.9) to pay back its start.

    Args:
        outer_optimizer: the `outer_optimizer` given to `LocalSGD`.
        inner_optimizer: the model's optimizer.
        outer_steps: int or None. Syncs the run will make (epochs x steps
            per epoch / sync_every), if known.

    Returns:
        list of str, one message per risk, each saying what to change;
        empty when none applies (plain averaging never has any).

    Example:

    >>> risks = diloco_risks(
    ...     keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True),
    ...     keras.optimizers.SGD(0.05, momentum=0.9), outer_steps=16)
    >>> len(risks)
    2
    """
    mu = _momentum(outer_optimizer)
    if not isinstance(outer_optimizer, keras.optimizers.SGD) or mu <= 0:
        return []
    lr = float(np.asarray(outer_optimizer.learning_rate))
    inner = _momentum(inner_optimizer)
    risks = []
    gain = lr / (1 - mu)
    if inner > 0 and gain > _MAX_GAIN_ON_MOMENTUM:
        risks.append(
            f"outer momentum {mu:g} on an inner "
            f"{type(inner_optimizer).__name__} with momentum {inner:g}: "
            "each averaged delta is applied up to learning_rate / (1 - "
            f"momentum) = {gain:.1f}x and training can diverge. Use an "
            f"outer learning_rate / (1 - momentum) <= "
            f"{_MAX_GAIN_ON_MOMENTUM:g} (e.g. keras.optimizers.SGD(0.7, "
            "momentum=0.5, nesterov=True)), plain averaging "
            "(outer_optimizer=None), or an inner AdamW."
        )
    needed = int(round(_HORIZONS / (1 - mu)))
    if outer_steps is not None and outer_steps < needed:
        fits = 1 - _HORIZONS / max(outer_steps, 1)
        advice = (f"an outer momentum <= {fits:.2f}" if fits > 0
                  else "plain averaging (outer_optimizer=None)")
        risks.append(
            f"only {outer_steps} outer step(s) (syncs) for outer momentum "
            f"{mu:g}, which needs about {needed}. Use {advice}, a smaller "
            "sync_every, or more steps."
        )
    return risks


class LocalSGD(keras.callbacks.Callback):
    """Trains each replica on its own and averages every `sync_every` steps.

    Between syncs no gradient is all-reduced: each replica of the
    `MirroredStrategy` / `MultiWorkerMirroredStrategy` applies its own
    gradients to its own copy of the weights with its own optimizer state.
    Every `sync_every` steps the replicas all-reduce the pseudo-gradient
    (anchor weights minus local weights) once; the outer optimizer applies
    its mean to the anchor, non-trainable weights (BatchNormalization
    statistics) are averaged, and every replica continues from the new
    anchor. Training also syncs when `fit` ends, so the model holds the
    averaged weights.

    With `sync_every=1` and the default outer optimizer, training with an
    inner `SGD` equals synchronous training. Per-replica batch and learning
    rate keep their meaning: each replica's local step uses the gradient of
    its own per-replica batch.

    Works with `kd.callbacks.BackupAndRestore`: the anchor, the outer
    optimizer state, the step within the round and every replica's own
    weights and optimizer state are saved with the optimizer, so a run
    interrupted mid-round resumes exactly.

    Validation during `fit` evaluates each replica's current local weights;
    choose `sync_every` dividing the steps per epoch to validate averaged
    weights.

    Args:
        sync_every: int. Local steps between two syncs (H); a multiple of
            the model's `steps_per_execution`.
        outer_optimizer: `keras.optimizers.Optimizer` or None. Applies the
            mean pseudo-gradient to the anchor. Defaults to None, i.e.
            `keras.optimizers.SGD(learning_rate=1.0)` (model averaging).
            `keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)` gives
            DiLoCo.
        compression: str or None. `"fp16"` or `"bf16"` all-reduces the
            pseudo-gradients in 16 bits; `"int8"` in 8 bits with error
            feedback (what rounding lost is sent at the next sync; see
            `kerasdist.compression`). Defaults to None (the strategy's own
            setting applies).
        dynamic_steps: bool. Straggler-tolerant rounds (dynamic local
            updates, Liu et al. 2024): after a first round of `sync_every`
            steps, a round lasts the time the fastest worker needs for
            `sync_every` steps, or 3 times the last syncs' time if longer
            (a sync runs at the slowest worker's pace); each worker runs
            as many steps as fit in it, and the sync weights each
            worker's pseudo-gradient by its steps (samples), so a slow
            worker no longer holds the others.
            Training ends at the sync where the fastest worker has run
            `steps_per_epoch` steps. Needs `fit(dataset.repeat(), epochs=1,
            steps_per_epoch=N)` and `steps_per_execution=1`; a rerun does
            not repeat the same rounds (they follow wall time), and backups
            are only possible at the end of the epoch
            (`BackupAndRestore(save_freq="epoch")`). `local_steps` lists
            this worker's steps in each round. Defaults to False.

    Raises:
        ValueError: if `sync_every` is not a positive integer, the outer
            optimizer is not a Keras optimizer, `compression` is unknown
            or `dynamic_steps` not a bool; when training starts, if
            `sync_every` is not a multiple of `steps_per_execution`, the
            model's optimizer cannot train locally, or (`dynamic_steps`)
            `fit` is not one epoch of known steps.

    Example:

    ```python
    with strategy.scope():
        model = build_model()
        model.compile(optimizer="adamw", loss="mse")
    model.fit(dataset, epochs=10, callbacks=[
        kd.callbacks.LocalSGD(sync_every=16, outer_optimizer=(
            keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True))),
    ])
    ```
    """

    def __init__(
        self,
        sync_every: int,
        outer_optimizer: keras.optimizers.Optimizer | None = None,
        compression: str | None = None,
        dynamic_steps: bool = False,
    ):
        super().__init__()
        self.sync_every = check_int("sync_every", sync_every)
        if not isinstance(dynamic_steps, bool):
            raise ValueError(
                "Invalid value for argument `dynamic_steps`. Received: "
                f"dynamic_steps={dynamic_steps!r}. Expected True or False."
            )
        self.dynamic_steps = dynamic_steps
        self._clock: rounds_lib.RoundClock | None = None
        if outer_optimizer is None:
            outer_optimizer = keras.optimizers.SGD(learning_rate=1.0)
        if not isinstance(outer_optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "Invalid value for argument `outer_optimizer`. Received: "
                f"outer_optimizer={outer_optimizer!r}. Expected a "
                "keras.optimizers.Optimizer instance (e.g. "
                "keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)) "
                "or None for plain averaging."
            )
        if outer_optimizer.built:
            raise ValueError(
                "Invalid value for argument `outer_optimizer`. Received: "
                f"outer_optimizer={outer_optimizer.name!r}, already built "
                "(used elsewhere). Pass a new optimizer instance."
            )
        self.outer_optimizer = outer_optimizer
        self.compression = compression_lib.check_compression(
            compression, error_feedback=True)
        self._state: _State | None = None
        self._round: int | None = None
        self._batch_begin = 0
        self.syncs = 0

    # ------------------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        if getattr(model, "built", False) and getattr(
            model, "optimizer", None
        ) is not None:
            self._attach()

    def _attach(self) -> _State:
        model = self.model
        optimizer = model.optimizer
        state = getattr(optimizer, _STATE_ATTR, None)
        if state is not None:
            if state.owner is not self:
                raise ValueError(
                    f"The optimizer {optimizer.name!r} of model "
                    f"{model.name!r} already trains with another LocalSGD "
                    "callback. Pass the same kd.callbacks.LocalSGD instance "
                    "to every fit() of this model."
                )
            self._state = state
            return state
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "kd.callbacks.LocalSGD needs a model compiled with a Keras "
                f"optimizer. Received: optimizer={optimizer!r}."
            )
        if optimizer is self.outer_optimizer:
            raise ValueError(
                "Invalid value for argument `outer_optimizer`: it is the "
                "model's own (inner) optimizer. Pass a separate optimizer "
                "instance."
            )
        if optimizer.gradient_accumulation_steps:
            raise ValueError(
                "kd.callbacks.LocalSGD does not combine with gradient "
                "accumulation. Received: an optimizer with "
                "gradient_accumulation_steps="
                f"{optimizer.gradient_accumulation_steps}. Use a larger "
                "`sync_every` instead."
            )
        if not model.built:
            raise ValueError(
                "kd.callbacks.LocalSGD needs a built model. Model "
                f"{model.name!r} is not built; build it (e.g. with "
                "`keras.Input`) before `fit`."
            )
        if not optimizer.built:
            with model.distribute_strategy.scope():
                optimizer.build(model.trainable_variables)
        state = _State(self, model, self.outer_optimizer)
        setattr(optimizer, _STATE_ATTR, state)
        self._state = state
        return state

    def on_train_begin(self, logs=None):
        model = self.model
        spe = getattr(model, "steps_per_execution", 1) or 1
        spe = int(spe.numpy()) if hasattr(spe, "numpy") else int(spe)
        if self.sync_every % spe:
            raise ValueError(
                "Invalid value for argument `sync_every`. Received: "
                f"sync_every={self.sync_every} with the model's "
                f"steps_per_execution={spe}. Expected a multiple of "
                "steps_per_execution (callbacks run once per execution)."
            )
        if self.dynamic_steps:
            rounds_lib.check_fit(self.params or {}, spe)
        state = self._attach()
        self._warn_risks()
        _internals.set_gradient_all_reduce(
            model.optimizer, _ReplicaLocalUpdates(True))
        # Functions traced before run the synchronous update.
        model.make_train_function(force=True)
        self._round = None
        if self.dynamic_steps:
            model.train_function = rounds_lib.local_train_function(model)
            self._clock = rounds_lib.RoundClock(self.sync_every)
            # Traced now rather than at the first sync, where every worker
            # would wait for the slowest one to trace it.
            state.sync.get_concrete_function(
                self.compression,
                tf.TensorSpec((rounds_lib.ROW,), tf.float32))
        if int(state.round_step.numpy()) == 0:
            # A fresh round: the anchor is the current (identical) weights.
            for a, v in zip(state.anchor, state.trainable, strict=True):
                a.assign(v)
        if cluster_lib.from_env().is_chief:
            logging.info(
                "kerasdist: local SGD, %d replica(s) sync every %d steps",
                model.distribute_strategy.num_replicas_in_sync,
                self.sync_every,
            )

    def _warn_risks(self) -> None:
        params = self.params or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        outer_steps = (epochs * steps // self.sync_every
                       if steps and epochs else None)
        for risk in diloco_risks(
            self.outer_optimizer, self.model.optimizer, outer_steps
        ):
            warnings.warn(f"kd.callbacks.LocalSGD: {risk}", stacklevel=3)

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_begin = batch
        if self._clock is not None:
            self._state.mid_dynamic_round = True
            self._clock.begin_step()

    def on_train_batch_end(self, batch, logs=None):
        state = self._state
        state.invalidate()
        if self._round is None:  # Possibly restored by BackupAndRestore.
            self._round = int(state.round_step.numpy())
        self._round += batch - self._batch_begin + 1
        if self._clock is not None:
            self._clock.end_step(self._round, first=batch == 0)
            last = batch + 1 >= self.params["steps"]
            if last or self._clock.due():
                self._dynamic_sync(last)
        elif self._round >= self.sync_every:
            self._sync()
        state.round_step.assign(self._round)
        state.mid_dynamic_round = self._clock is not None and self._round > 0

    def on_train_end(self, logs=None):
        if self._state is None:
            return
        if self._round:
            self._sync()
            self._state.round_step.assign(0)
        _internals.set_gradient_all_reduce(self.model.optimizer, None)
        self.model.train_function = None

    def _sync(self) -> None:
        self._state.sync(self.compression)
        self._state.invalidate()
        self._round = 0
        self.syncs += 1

    def _dynamic_sync(self, last: bool) -> None:
        clock = self._clock
        start = time.monotonic()
        rows = np.asarray(self._state.sync(
            self.compression, tf.constant(clock.report(last))))
        if clock.agree(rows, time.monotonic() - start):
            self.model.stop_training = True
        self._state.invalidate()
        self._round = 0
        self.syncs += 1
        clock.restart()

    @property
    def local_steps(self) -> list[int]:
        """This worker's local steps in each round of the last `fit`.

        Every round is `sync_every` steps, except with `dynamic_steps`,
        where a slower worker runs fewer.
        """
        if self._clock is not None:
            return list(self._clock.rounds)
        return [self.sync_every] * self.syncs

    @property
    def round_timings(self) -> list[tuple[float, float]]:
        """With `dynamic_steps`: per round, this worker's (seconds in
        steps, seconds in the sync) in the last `fit`; else empty."""
        return [] if self._clock is None else list(self._clock.timings)

    @property
    def round_seconds(self) -> float | None:
        """With `dynamic_steps`: the agreed wall-time budget of a round."""
        return None if self._clock is None else self._clock.budget

    def get_state(self) -> dict[str, Any]:
        """JSON-able state for backups (the arrays live in the optimizer).

        Returns:
            dict with `sync_every`, `round_step`, `syncs` and
            `local_steps` (this worker's steps in each round).

        Example:

        >>> LocalSGD(sync_every=8).get_state()["sync_every"]
        8
        """
        round_step = self._round
        if round_step is None and self._state is not None:
            round_step = int(self._state.round_step.numpy())
        return {
            "sync_every": self.sync_every,
            "round_step": int(round_step or 0),
            "syncs": self.syncs,
            "local_steps": self.local_steps,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores what `get_state` returned.

        Args:
            state: dict from `get_state`.

        Raises:
            ValueError: if the backup was made with another `sync_every`.

        Example:

        >>> cb = LocalSGD(sync_every=8)
        >>> cb.set_state({"sync_every": 8, "round_step": 3, "syncs": 2})
        >>> cb.syncs
        2
        """
        if int(state.get("sync_every", self.sync_every)) != self.sync_every:
            raise ValueError(
                "The backup was made with LocalSGD(sync_every="
                f"{state['sync_every']}), this run uses sync_every="
                f"{self.sync_every}. Use the same value to resume, or a "
                "new backup directory."
            )
        self.syncs = int(state.get("syncs", 0))
        self._round = int(state.get("round_step", 0))
        if self._state is not None:
            self._state.round_step.assign(self._round)

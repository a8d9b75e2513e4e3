"""Gradient accumulation that works under tf.distribute strategies.

Keras 3 optimizers take `gradient_accumulation_steps=k`, but under a
`MirroredStrategy` or `MultiWorkerMirroredStrategy` training fails while
tracing: `BaseOptimizer._backend_apply_gradients` chooses between "apply"
and "accumulate" with `ops.cond` in replica context, and the apply branch
all-reduces the gradients through `merge_call`, which tf.distribute does not
allow inside control flow ("`merge_call` called while defining a new graph
or a tf.function", keras-team/keras#20582, open; same cause as
keras-team/keras#17429 and tensorflow/tensorflow#59487 with tf.keras).

`kd.accumulate_gradients(optimizer, k)` makes the same option correct under
those strategies. It keeps Keras's own accumulator variables, config and
`iterations` semantics (one optimizer step per k batches) and moves the
branch to the cross-replica context, where control flow around collectives
is allowed (every worker takes the same branch: the step counter is the
same everywhere):

1. each replica adds its local gradient to its own copy of the accumulator
   (no communication on accumulate-only steps, like Horovod's
   `backward_passes_per_step`);
2. every k-th step the accumulated sums are all-reduced once (through the
   strategy, so gradient compression applies), divided by k, and applied.

The result equals training with a k-times larger global batch (for
optimizers whose update depends only on the mean gradient).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kerasdist import _internals
from kerasdist._validate import check_int

__all__ = ["accumulate_gradients"]

_STRATEGIES = (
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
)


def accumulate_gradients(
    optimizer: keras.optimizers.Optimizer, steps: int
) -> keras.optimizers.Optimizer:
    """Makes `optimizer` apply the mean gradient of every `steps` batches.

    Equivalent to `keras.optimizers.X(..., gradient_accumulation_steps=
    steps)`, but also correct under `MirroredStrategy` and
    `MultiWorkerMirroredStrategy` (where Keras's own implementation fails,
    keras-team/keras#20582). Without a strategy Keras's implementation runs
    unchanged. Call it before the optimizer is built (before `fit`).

    Args:
        optimizer: `keras.optimizers.Optimizer`, not yet built. It is changed
            in place and returned.
        steps: int >= 2. Batches per optimizer update.

    Returns:
        `optimizer`.

    Raises:
        ValueError: if `steps` is not an integer >= 2, the optimizer is
            already built, or it uses EMA (`use_ema=True`, not supported
            together with accumulation under a strategy).

    Example:

    ```python
    with strategy.scope():
        model = build_model()
        opt = kd.accumulate_gradients(keras.optimizers.SGD(0.1), steps=4)
        model.compile(optimizer=opt, loss="mse")
    ```
    """
    steps = check_int("steps", steps, 2)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "Invalid value for argument `optimizer`. Received: "
            f"optimizer={optimizer!r}. Expected a keras.optimizers.Optimizer."
        )
    if optimizer.built:
        raise ValueError(
            "accumulate_gradients() needs an optimizer that is not built "
            f"yet. Received: optimizer={optimizer.name!r}, already built. "
            "Call it before compile()/fit()."
        )
    if optimizer.use_ema:
        raise ValueError(
            "accumulate_gradients() does not support use_ema=True. "
            f"Received: optimizer={optimizer.name!r} with use_ema=True."
        )
    optimizer.gradient_accumulation_steps = steps
    base = type(optimizer)
    if not getattr(base, "_kd_accumulating", False):
        optimizer.__class__ = type(
            base.__name__, (_DistributedAccumulation, base),
            {"_kd_accumulating": True, "__module__": base.__module__},
        )
    return optimizer


class _DistributedAccumulation:
    """Mixin: `_backend_apply_gradients` with cross-replica branching."""

    def _backend_apply_gradients(self, grads, trainable_variables):
        strategy = tf.distribute.get_strategy()
        ctx = tf.distribute.get_replica_context()
        if (
            not self.gradient_accumulation_steps
            or not isinstance(strategy, _STRATEGIES)
            or ctx is None
        ):
            return super()._backend_apply_gradients(grads, trainable_variables)
        acc = _internals.accumulators(self, trainable_variables)
        tf_vars = [_tf_var(v) for v in trainable_variables]
        ctx.merge_call(
            self._kd_merge_apply, args=(list(grads),),
            kwargs={"tf_vars": tf_vars, "acc": [_tf_var(a) for a in acc]},
        )

    def _kd_merge_apply(self, distribution, grads, tf_vars, acc):
        steps = self.gradient_accumulation_steps
        is_update_step = tf.equal(
            (_internals.iterations_variable(self) + 1) % steps, 0
        )

        def accumulate():
            for g, a in zip(grads, acc, strict=True):
                distribution.extended.update(
                    a, lambda var, g: var.assign_add(tf.cast(g, var.dtype)),
                    args=(g,), group=False,
                )
            return tf.constant(False)

        def apply():
            # Per replica: local sum of the k gradients, clipped as Keras
            # clips (before the all-reduce), then one all-reduce.
            n = len(distribution.extended.worker_devices)
            local = [[] for _ in grads]
            for r in range(n):
                parts = []
                for g, a in zip(grads, acc, strict=True):
                    gr = distribution.experimental_local_results(g)[r]
                    ar = a.values[r] if hasattr(a, "values") else a
                    with tf.device(gr.device):
                        parts.append(
                            (tf.cast(gr, ar.dtype) + ar.read_value()) / steps
                        )
                parts = _internals.clip_gradients(self, parts)
                for i, p in enumerate(parts):
                    local[i].append(p)
            per_replica = [_internals.make_per_replica(tuple(p)) for p in local]
            reduced = distribution.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM,
                [(p, p) for p in per_replica],
            )
            if self.weight_decay is not None:
                for var in tf_vars:
                    if _internals.uses_weight_decay(self, var):
                        distribution.extended.update(
                            var, self._kd_weight_decay, group=False
                        )
            _internals.distributed_update_step(
                self, distribution, list(zip(reduced, tf_vars, strict=True)),
                self.learning_rate,
            )
            for a in acc:
                distribution.extended.update(
                    a, lambda var: var.assign(tf.zeros_like(var)),
                    group=False,
                )
            return tf.constant(True)

        tf.cond(is_update_step, apply, accumulate)

    def _kd_weight_decay(self, variable):
        lr = tf.cast(self.learning_rate, variable.dtype)
        wd = tf.cast(self.weight_decay, variable.dtype)
        variable.assign_sub(variable * wd * lr)


def _tf_var(v):
    return v.value if isinstance(v, keras.Variable) else v

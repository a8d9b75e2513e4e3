"""GPipe-style pipeline parallelism for Keras models on TensorFlow.

`PipelineModel` runs a Sequential or functional model as a chain of stages,
stage k on device k. Each batch is split into M micro-batches; the forward
passes of all (stage, micro-batch) pairs, the loss on the whole batch, and
the backward passes in reverse are written into one traced train step, each
under `tf.device` of its stage. Stage k's work on micro-batch i and stage
k+1's work on micro-batch i-1 share no data, so TensorFlow's executor runs
them at the same time on their devices: the GPipe fill/drain schedule falls
out of the dataflow. Gradients are summed over micro-batches and applied
once per batch, so training equals the unpipelined model's (up to float
rounding): the loss is computed on the whole batch's predictions, exactly as
Keras does, and its gradient with respect to each micro-batch's predictions
starts that micro-batch's backward pass.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kerasdist import _internals, cluster
from kerasdist._validate import check_int
from kerasdist.placement import graph as graph_lib
from kerasdist.placement import planning as plan_lib
from kerasdist.placement import stage_devices

__all__ = ["PipelineModel"]


class PipelineModel(keras.Model):
    """A model whose stages run on several devices, GPipe-style.

    The wrapped model's layers are shared, not copied: weights, layer names
    and variable paths stay the same, and each stage's variables are moved
    to its device (check with `variable.value.device`). `compile`, `fit`,
    `evaluate`, `predict`, `save_weights` and `load_weights` work as for any
    Keras model (`model.save` does not: save the wrapped model instead).

    In training, a batch whose size `num_microbatches` does not divide is an
    error; `evaluate` and `predict` accept any batch (the last micro-batch
    is then smaller).

    Limitations: BatchNormalization statistics are per micro-batch (as in
    GPipe); with `recompute=True`, random layers such as Dropout draw new
    masks when recomputing; layers that call `add_loss` in `call()` or have
    an `activity_regularizer` are not supported (weight regularizers are).

    Args:
        model: keras.Model. A built Sequential or functional model.
        devices: list of str or None. Device of each stage, e.g.
            `["/gpu:0", "/gpu:1"]`. Default: the plan's devices.
        num_microbatches: int. Micro-batches per batch, ≥ 1. Default 1
            (no pipelining: stages run one after another).
        plan: kerasdist.placement.Plan or None. Default: a plan balancing
            parameters over `len(devices)` stages.
        recompute: bool. Keep only stage boundaries in the forward pass and
            recompute each stage's activations during its backward pass
            (memory for compute, like `tf.recompute_grad`). Default False.
        name: str or None. Model name. Default: `<model name>_pipeline`.

    Raises:
        ValueError: for a model that cannot be split, a device that does
            not exist, more stages than devices, a plan made for another
            model, or a bad `num_microbatches` or `recompute`.

    Example:

    ```python
    kd.virtual_cpus(2)
    model = keras.Sequential([keras.Input((64,)),
                              keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(10)])
    pipe = kd.placement.PipelineModel(
        model, ["/cpu:0", "/cpu:1"], num_microbatches=4)
    pipe.compile(optimizer="adam",
                 loss=keras.losses.SparseCategoricalCrossentropy(True))
    pipe.fit(x, y, batch_size=64)
    ```
    """

    def __init__(
        self,
        model: keras.Model,
        devices: Sequence[str] | None = None,
        num_microbatches: int = 1,
        plan: plan_lib.Plan | None = None,
        recompute: bool = False,
        name: str | None = None,
    ):
        num_microbatches = check_int("num_microbatches", num_microbatches)
        if not isinstance(recompute, bool):
            raise ValueError(
                "Invalid value for argument `recompute`. "
                f"Received: recompute={recompute!r}. Expected True or False."
            )
        graph = graph_lib.LayerGraph(model)
        _check_layers(graph)
        plan, devices = _resolve_plan(model, graph, devices, plan)
        stages = graph.stages(plan.assignment)
        super().__init__(name=name or f"{model.name}_pipeline")
        self.inner_model = model
        self.num_microbatches = num_microbatches
        self.recompute = recompute
        self.plan = plan
        # A plain object, so Keras and TF tracking leave the graph alone.
        self._pipe = _Stages(graph, stages, devices)
        _move_variables(self._pipe)
        self.built = True

    @property
    def layers(self) -> list:
        """The wrapped model's layers (so `get_layer` finds them by name)."""
        return self.inner_model.layers

    @property
    def devices(self) -> list[str]:
        """Device of each stage."""
        return list(self._pipe.devices)

    def get_config(self):
        raise NotImplementedError(
            "PipelineModel cannot be serialized with model.save(); save the "
            "wrapped model (pipeline.inner_model.save(...)) or use "
            "save_weights()."
        )

    def compile(self, *args, **kwargs):
        """Configures training; see `keras.Model.compile`.

        Also builds the optimizer so that each slot variable (e.g. Adam's
        moments) lives on the device of the variable it belongs to.
        """
        super().compile(*args, **kwargs)
        _build_optimizer_on_devices(self.optimizer, self.trainable_variables)
        _move_optimizer_scalars(self.optimizer, self._pipe.devices)

    def compute_output_spec(self, inputs, training=None, mask=None):
        return self.inner_model.compute_output_spec(inputs)

    def call(self, inputs, training=None):
        pipe = self._pipe
        micro = _split_all(
            pipe.graph.flat_inputs(inputs), self.num_microbatches, strict=False
        )
        values = [
            dict(zip(pipe.graph.input_ids, xs, strict=False)) for xs in micro
        ]
        for stage in pipe.stages:
            with tf.device(pipe.devices[stage.index]):
                for vals in values:
                    graph_lib.run_nodes(stage.nodes, vals, training)
        return pipe.graph.pack_outputs(self._concat_outputs(values))

    def _concat_outputs(self, values):
        pipe = self._pipe
        flat = []
        for t in pipe.graph.output_ids:
            with tf.device(pipe.devices[pipe.producer[t]]):
                parts = [vals[t] for vals in values]
                flat.append(
                    parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)
                )
        return flat

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        pipe = self._pipe
        micro = _split_all(
            pipe.graph.flat_inputs(x), self.num_microbatches, strict=True
        )
        values = [
            dict(zip(pipe.graph.input_ids, xs, strict=False)) for xs in micro
        ]
        tapes = self._forward(values)
        y_pred, grad_values, var_grads = self._loss_backward(
            x, y, sample_weight, values
        )
        for stage in reversed(pipe.stages):
            self._stage_backward(stage, values, tapes, grad_values, var_grads)
        self._apply_gradients(var_grads)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _forward(self, values):
        """Runs every (stage, micro-batch); returns their tapes.

        The dataflow lets stage k+1 work on micro-batch i-1 while stage k
        works on micro-batch i. With `recompute`, no tape is kept.
        """
        pipe = self._pipe
        tapes = {}
        for stage in pipe.stages:
            with tf.device(pipe.devices[stage.index]):
                for i, vals in enumerate(values):
                    if self.recompute:
                        graph_lib.run_nodes(stage.nodes, vals, True)
                        continue
                    with tf.GradientTape() as tape:
                        for t in pipe.float_inputs[stage.index]:
                            tape.watch(vals[t])
                        graph_lib.run_nodes(stage.nodes, vals, True)
                    tapes[stage.index, i] = tape
        return tapes

    def _loss_backward(self, x, y, sample_weight, values):
        """Loss on the whole batch, as keras.Model.train_step computes it.

        Returns:
            (y_pred, grad_values, var_grads): the predictions; per
            micro-batch, the loss gradient of each model output; per
            variable id, the list of its gradient parts so far (the
            regularization losses').
        """
        # len(values): HybridPipelineModel passes every replica's parts.
        pipe, m = self._pipe, len(values)
        with tf.device(pipe.devices[-1]):
            with tf.GradientTape() as loss_tape:
                parts = [
                    [vals[t] for vals in values] for t in pipe.graph.output_ids
                ]
                for p in (p for ps in parts for p in ps):
                    loss_tape.watch(p)
                flat = [
                    ps[0] if m == 1 else tf.concat(ps, axis=0) for ps in parts
                ]
                y_pred = pipe.graph.pack_outputs(flat)
                loss = _internals.compute_loss(
                    self,
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=True,
                )
                _internals.loss_tracker(self).update_state(
                    _internals.unscale_loss_for_distribution(loss),
                    sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
                )
                if self.optimizer is not None:
                    loss = self.optimizer.scale_loss(loss)
            trainable = self.trainable_variables
            sources = [p for ps in parts for p in ps]
            grads = loss_tape.gradient(
                loss,
                sources + trainable,
                unconnected_gradients=tf.UnconnectedGradients.NONE,
            )
        grad_values = [dict() for _ in range(m)]
        k = 0
        for t in pipe.graph.output_ids:
            for i in range(m):
                _add_grad(grad_values[i], t, grads[k])
                k += 1
        var_grads = {
            id(v): [g]
            for v, g in zip(trainable, grads[k:], strict=False)
            if g is not None
        }
        return y_pred, grad_values, var_grads

    def _stage_backward(self, stage, values, tapes, grad_values, var_grads):
        """One stage's backward pass, micro-batches in reverse.

        Adds the stage's variable gradients to `var_grads` and its input
        gradients to `grad_values` (for the stage before it).
        """
        pipe = self._pipe
        s = stage.index
        stage_vars = [v for v in pipe.variables[s] if v.trainable]
        ins = pipe.float_inputs[s]
        with tf.device(pipe.devices[s]):
            done = []  # ops the next micro-batch's backward waits on
            for i in reversed(range(self.num_microbatches)):
                vals = values[i]
                outs = [t for t in stage.outputs if _is_float(vals[t])]
                out_grads = [grad_values[i].get(t) for t in outs]
                if all(g is None for g in out_grads):
                    continue
                out_grads = [
                    tf.zeros_like(vals[t]) if g is None else g
                    for t, g in zip(outs, out_grads, strict=False)
                ]
                if self.recompute:
                    tape, local = self._recompute(stage, vals, out_grads)
                else:
                    tape, local = tapes[s, i], vals
                with tf.control_dependencies(done):
                    g = tape.gradient(
                        [local[t] for t in outs],
                        stage_vars + [local[t] for t in ins],
                        output_gradients=out_grads,
                        unconnected_gradients=tf.UnconnectedGradients.NONE,
                    )
                done = [
                    _accumulate(var_grads, id(v), gv)
                    for v, gv in zip(stage_vars, g[: len(stage_vars)],
                                     strict=False)
                    if gv is not None
                ]
                for t, gi in zip(ins, g[len(stage_vars) :], strict=False):
                    _add_grad(grad_values[i], t, gi)

    def _apply_gradients(self, var_grads):
        """Sums over micro-batches on each variable's device; applies once."""
        pipe = self._pipe
        trainable = self.trainable_variables
        summed = []
        for v in trainable:
            with tf.device(pipe.device_of_variable.get(id(v))):
                summed.append(_sum_grads(var_grads.get(id(v)), v))
        _apply_on_devices(self.optimizer, summed, trainable)

    def _recompute(self, stage, vals, out_grads):
        """Re-runs a stage's forward pass once its output gradients exist."""
        pipe = self._pipe
        # The control dependency keeps the recomputation in the backward
        # pass and stops grappler from merging it with the forward pass.
        with tf.control_dependencies(out_grads):
            local = {t: tf.identity(vals[t]) for t in stage.inputs}
        with tf.GradientTape() as tape:
            for t in pipe.float_inputs[stage.index]:
                tape.watch(local[t])
            graph_lib.run_nodes(stage.nodes, local, True)
        return tape, local

    def fit(self, *args, **kwargs):
        """Trains the model; see `keras.Model.fit`.

        Checks first that every training batch divides into
        `num_microbatches` micro-batches, when the sizes are known.
        """
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        a = bound.arguments
        self._check_batches(
            a.get("x"),
            a.get("batch_size"),
            a.get("validation_split", 0.0) or 0.0,
            a.get("steps_per_epoch"),
        )
        return super().fit(*args, **kwargs)

    def _check_batches(self, x, batch_size, validation_split, steps_per_epoch):
        m = self.num_microbatches
        if m == 1 or x is None:
            return
        if isinstance(x, tf.data.Dataset):
            first = tf.nest.flatten(x.element_spec)[0]
            size = first.shape[0] if first.shape.rank else None
            if size is not None and size % m:
                raise ValueError(_batch_message(size, m))
            return
        flat = tf.nest.flatten(x)
        if not flat or not hasattr(flat[0], "shape") or not len(flat[0].shape):
            return  # a generator or PyDataset: checked at each step
        batch_size = 32 if batch_size is None else batch_size
        n = int(flat[0].shape[0])
        n_train = int(np.floor(n * (1.0 - validation_split)))
        if batch_size % m:
            raise ValueError(
                "Invalid value for argument `batch_size`. "
                f"Received: batch_size={batch_size}, which "
                f"num_microbatches={m} does not divide. Expected a "
                f"multiple of {m}."
            )
        last = n_train % batch_size
        if last % m and not steps_per_epoch:
            raise ValueError(
                f"The last training batch would hold {last} examples "
                f"({n_train} examples, batch_size={batch_size}), which "
                f"num_microbatches={m} does not divide. Expected a number "
                f"of examples that is a multiple of {m} in every batch: "
                "drop the remainder or choose sizes that divide."
            )


def _check_layers(graph: graph_lib.LayerGraph) -> None:
    """Rejects layers whose losses PipelineModel cannot collect."""
    for layer in graph.layers:
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                f"Layer {layer.name!r} has an activity_regularizer, "
                "which PipelineModel does not support (its loss is "
                "added inside call()). Use a weight regularizer "
                "(kernel_regularizer=...) or remove it."
            )


def _resolve_plan(model, graph, devices, plan):
    """The plan to run and one checked device per stage.

    Returns:
        (Plan, list of str): `plan` (or a parameter-balanced plan over
        `devices`) and the fully qualified device of each stage.
    """
    if plan is None:
        devices = _checked_device_list(devices)
        plan = plan_lib.plan(
            model, min(len(devices), len(graph.operations)), devices=devices
        )
    elif not isinstance(plan, plan_lib.Plan):
        raise ValueError(
            "Invalid value for argument `plan`. "
            f"Received: plan={plan!r}. Expected a "
            "kerasdist.placement.Plan (from kd.placement.plan)."
        )
    elif plan.model_name != model.name:
        raise ValueError(
            f"Invalid value for argument `plan`: it was made for model "
            f"{plan.model_name!r}, not {model.name!r}."
        )
    if devices is None:
        devices = plan.devices
        if None in devices:
            raise ValueError(
                "Invalid value for argument `devices`. Received: "
                f"devices=None, and the plan names no device for some "
                f"stages ({devices}). Expected a list of device names."
            )
    devices = list(devices)
    if plan.num_stages > len(devices):
        raise ValueError(
            "Invalid value for argument `devices`. "
            f"Received: devices={devices} ({len(devices)} device(s)) "
            f"for a plan with {plan.num_stages} stages. Expected at "
            "least one device per stage."
        )
    return plan, stage_devices.check_devices(devices[: plan.num_stages])


def _checked_device_list(devices) -> list[str]:
    """`devices` as a non-empty list of existing devices (no plan given)."""
    if devices is None:
        raise ValueError(
            "Invalid value for argument `devices`. Received: "
            "devices=None and plan=None. Expected a list of device "
            "names (one stage per device), or a plan with devices."
        )
    devices = list(devices)
    if not devices:
        raise ValueError(
            "Invalid value for argument `devices`. Received: "
            "devices=[]. Expected at least one device name."
        )
    stage_devices.check_devices(devices)
    return devices


class _Stages:
    """The stages a PipelineModel runs (kept out of Keras tracking)."""

    def __init__(self, graph, stages, devices):
        self.graph = graph
        self.stages = stages
        self.devices = devices
        self.producer = {t: s.index for s in stages for t in s.outputs}
        # Stage inputs that need a gradient: float tensors from an earlier
        # stage (not the model's inputs, whose gradient nobody uses).
        model_inputs = set(graph.input_ids)
        self.float_inputs = [
            [
                t
                for t in s.inputs
                if t not in model_inputs and _is_float(graph.tensors[t])
            ]
            for s in stages
        ]
        self.variables = []
        self.device_of_variable = {}
        for s in stages:
            variables = []
            for op in s.operations:
                # `variables`, not `weights`: also Dropout's seed state.
                for v in getattr(op, "variables", []):
                    if id(v) not in self.device_of_variable:
                        self.device_of_variable[id(v)] = devices[s.index]
                        variables.append(v)
            self.variables.append(variables)


def _move_variables(pipe: _Stages) -> None:
    """Re-creates each stage's variables on the stage's device."""
    moved = 0
    for s, variables in enumerate(pipe.variables):
        device = pipe.devices[s]
        for v in variables:
            if tf.DeviceSpec.from_string(v.value.device) == (
                tf.DeviceSpec.from_string(device)
            ):
                continue
            # Keras 3 has no API to move a variable (see _internals).
            with tf.init_scope(), tf.device(device):
                _internals.reinitialize_variable(v, tf.identity(v.value))
            moved += 1
    if cluster.is_chief():
        logging.info(
            "Moved %d variable(s) to %d stage device(s).",
            moved,
            len(pipe.devices),
        )


def _build_optimizer_on_devices(optimizer, variables) -> None:
    """Builds `optimizer`, creating each slot on its variable's device.

    Keras creates slots eagerly, where its colocation request
    (`colocate_vars_with` in keras/src/backend/tensorflow/optimizer.py) has
    no effect, so they land on the default device (as reported in
    tensorflow/tensorflow#26244). Wrapping `add_variable_from_reference`
    for the duration of `build` places each slot explicitly.
    """
    if optimizer is None or optimizer.built:
        return
    targets = [optimizer]
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:  # LossScaleOptimizer builds its inner optimizer
        targets.append(inner)

    def wrap(original):
        def add_variable_from_reference(reference_variable, *args, **kw):
            value = getattr(reference_variable, "value", reference_variable)
            with tf.init_scope(), tf.device(value.device):
                return original(reference_variable, *args, **kw)

        return add_variable_from_reference

    for opt in targets:
        opt.add_variable_from_reference = wrap(opt.add_variable_from_reference)
    try:
        optimizer.build(variables)
    finally:
        for opt in targets:
            del opt.add_variable_from_reference


@contextlib.contextmanager
def _updates_on_variable_devices(optimizer):
    """Runs the optimizer's per-variable math on each variable's device.

    Keras's TF optimizer updates each variable through the default
    strategy's `extended.update`, which sets no device
    (keras/src/backend/tensorflow/optimizer.py), so the update's math
    would run on the calling task and every stage's gradients and slots
    would cross the network. `update_step` (the documented per-variable
    override point) is wrapped with the variable's device for the call.
    `clipnorm`/`clipvalue` are applied beforehand on each variable's
    device (`_clip_on_devices`) and switched off meanwhile.
    """
    original = optimizer.update_step
    clipnorm, clipvalue = optimizer.clipnorm, optimizer.clipvalue
    last = {}  # device -> the previous update's result on it

    def update_step(gradient, variable, learning_rate):
        # One variable's update at a time per device: each update makes
        # temporaries the size of its variable (Adam: 3-4), and the
        # executor would otherwise run several at once on a stage worker.
        device = _device_of(variable)
        with tf.device(device), tf.control_dependencies(last.get(device, [])):
            result = original(gradient, variable, learning_rate)
            if tf.inside_function():
                last[device] = [tf.convert_to_tensor(variable)]
            return result

    optimizer.update_step = update_step
    try:
        yield
    finally:
        del optimizer.update_step
        optimizer.clipnorm, optimizer.clipvalue = clipnorm, clipvalue


def _apply_on_devices(optimizer, grads, variables) -> None:
    """Clips and applies `grads`, each variable's math on its device.

    The one update of a step, for `PipelineModel` and
    `HybridPipelineModel` alike (no-op without variables).
    """
    if not variables:
        return
    with _updates_on_variable_devices(optimizer):
        grads = _clip_on_devices(optimizer, grads, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))


def _clip_on_devices(optimizer, grads, variables):
    """Per-variable clipping (clipnorm, clipvalue) on each variable's device.

    Returns the clipped gradients and switches the optimizer's own
    per-variable clipping off (restored by `_updates_on_variable_devices`).
    `global_clipnorm` needs every gradient at once: left to the optimizer.
    """
    if not (optimizer.clipnorm or optimizer.clipvalue):
        return grads
    out = []
    for g, v in zip(grads, variables, strict=True):
        with tf.device(_device_of(v)):
            out.append(_internals.clip_gradients(optimizer, [g])[0])
    optimizer.clipnorm = optimizer.clipvalue = None
    return out


def _device_of(variable) -> str:
    """Device of a `keras.Variable` or of the `tf.Variable` behind it."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.device


def _move_optimizer_scalars(optimizer, devices: list[str]) -> None:
    """Puts the step counter and learning rate on the first stage's device.

    Only when no stage runs on this process (stages on other tasks after
    `kd.placement.join_cluster()`): then nothing of the model or of its
    optimizer stays on the chief.
    """
    if optimizer is None or any(_is_local(d) for d in devices):
        return
    device = devices[0]
    scalars = [_internals.iterations_variable(optimizer)]
    rate = _internals.learning_rate_attribute(optimizer)
    if isinstance(rate, keras.Variable):
        scalars.append(rate)
    for v in scalars:
        with tf.init_scope(), tf.device(device):
            _internals.reinitialize_variable(v, tf.identity(v.value))


def _is_local(device: str) -> bool:
    here = tf.DeviceSpec.from_string(_internals.host_address_space())
    spec = tf.DeviceSpec.from_string(device)
    return (spec.job, spec.task or 0) == (here.job, here.task or 0)


def _is_float(t) -> bool:
    return tf.as_dtype(t.dtype).is_floating


def _add_grad(grads: dict, key, g) -> None:
    if g is None:
        return
    grads[key] = g if key not in grads else grads[key] + g


def _accumulate(var_grads: dict, key, g):
    """Adds a micro-batch's gradient `g` to the running sum at `key`.

    Summing as each micro-batch's backward pass ends (rather than after
    the last) keeps two gradients of a variable alive instead of M + 1;
    the next micro-batch's backward waits on the returned sum (a control
    dependency), so TensorFlow's executor cannot run ahead of it. The
    order of the additions is unchanged. Sparse gradients are kept as
    parts (`_sum_grads` concatenates them).

    Returns:
        The tensor the next backward pass waits on.
    """
    parts = var_grads.setdefault(key, [])
    dense = not isinstance(g, tf.IndexedSlices)
    if parts and dense and not isinstance(parts[-1], tf.IndexedSlices):
        parts[-1] = parts[-1] + g
    else:
        parts.append(g)
    return parts[-1].values if isinstance(parts[-1], tf.IndexedSlices) else (
        parts[-1]
    )


def _sum_grads(parts, variable):
    if not parts:
        return tf.zeros_like(variable)
    if any(isinstance(p, tf.IndexedSlices) for p in parts):
        slices = [
            p
            if isinstance(p, tf.IndexedSlices)
            else tf.IndexedSlices(
                p, tf.range(tf.shape(p)[0]), tf.shape(p, out_type=tf.int64)
            )
            for p in parts
        ]
        if len(slices) == 1:
            return slices[0]
        return tf.IndexedSlices(
            tf.concat([p.values for p in slices], axis=0),
            tf.concat([tf.cast(p.indices, tf.int64) for p in slices], 0),
            slices[0].dense_shape,
        )
    # A running sum, in the order the micro-batches' backward passes end,
    # keeps one partial sum alive instead of all M gradients.
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _batch_message(size, m):
    return (
        f"Batch size {size} is not divisible by num_microbatches={m}. "
        f"Expected every training batch to hold a multiple of {m} examples "
        "(choose batch_size accordingly and drop the remainder)."
    )


def _split_all(flat, m, strict):
    """Splits each input along the batch axis into `m` micro-batches.

    Returns:
        list (one per micro-batch) of lists (one per input).
    """
    flat = [tf.convert_to_tensor(t) for t in flat]
    if m == 1:
        return [flat]
    first = flat[0]
    static = first.shape[0]
    if strict:
        if static is not None:
            if static % m:
                raise ValueError(_batch_message(static, m))
            return [
                list(ps)
                for ps in zip(*(tf.split(t, m) for t in flat), strict=False)
            ]
        check = tf.debugging.assert_equal(
            tf.shape(first)[0] % m,
            0,
            message=_batch_message("(dynamic)", m),
        )
        with tf.control_dependencies([check]):
            flat = [tf.identity(t) for t in flat]
        return [
            list(ps)
            for ps in zip(*(tf.split(t, m) for t in flat), strict=False)
        ]
    if static is not None and static % m == 0:
        return [
            list(ps)
            for ps in zip(*(tf.split(t, m) for t in flat), strict=False)
        ]
    # Uneven split for evaluation/prediction: ceil-sized pieces, the last
    # ones smaller (possibly empty).
    n = tf.shape(first)[0]
    size = (n + m - 1) // m
    starts = tf.minimum(tf.range(m) * size, n)
    ends = tf.minimum(starts + size, n)
    sizes = ends - starts
    return [
        list(ps)
        for ps in zip(*(tf.split(t, sizes, num=m) for t in flat), strict=False)
    ]

"""Placement plans: which layers form each pipeline stage, on which device.

A plan splits a model's layers into contiguous stages, balanced by a cost
(parameter count, measured time, or a function of the layer), or follows a
manual mapping of layer-name patterns to devices. Printing a plan shows,
per stage, its device, layers, parameter count and an estimate of the memory
it needs (see `Stage` for how each figure is computed).
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from kerasdist import devices as devices_lib
from kerasdist._validate import check_int
from kerasdist.placement import graph as graph_lib
from kerasdist.placement import stage_devices, transfer

__all__ = ["Plan", "Stage", "plan"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a plan and its memory estimate.

    Attributes:
        index: int. Position in the chain, from 0.
        device: str or None. Device the stage runs on (None: not chosen
            yet; `place`/`PipelineModel` then take it from their `devices`).
        layers: tuple of str. Names of the stage's layers (and other
            operations such as `add`), in execution order.
        cost: float. The balancing cost of the stage.
        params: int. Number of parameters (all of the stage's weights).
        param_bytes: int. Bytes of those weights: Σ size × dtype size.
        slot_bytes: int. Bytes of optimizer slots: slots per trainable
            variable (found by building the optimizer on probe variables,
            e.g. 2 for Adam, 0 for plain SGD) × bytes of trainable weights.
        activation_bytes: int. Bytes of activations kept for the backward
            pass of one micro-batch: Σ over the stage's layer outputs of
            micro-batch size × elements per example × dtype size (unknown
            dimensions count as 1).
        cut_bytes: int. Bytes the stage sends to later stages per
            micro-batch (its outputs they read; the same again comes back
            as gradients). With stages on other workers
            (`kd.placement.join_cluster()`) this crosses the network.
        transfer_seconds: float. With a plan's `bandwidth`: seconds per
            batch the stage spends moving activations, received from
            earlier stages plus sent to later ones (bytes / bandwidth);
            included in `cost`. 0.0 without a bandwidth.

    Example:

    ```python
    p = kd.placement.plan(model, 2)
    for stage in p.stages:
        print(stage.index, stage.device, stage.params, stage.layers)
    ```
    """

    index: int
    device: str | None
    layers: tuple[str, ...]
    cost: float
    params: int
    param_bytes: int
    slot_bytes: int
    activation_bytes: int
    cut_bytes: int = 0
    transfer_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """A split of a model's layers into a chain of stages.

    Made by `kerasdist.placement.plan`; consumed by `place` and
    `PipelineModel`. `print(plan)` shows a table.

    Attributes:
        model_name: str. Name of the model the plan was made for.
        stages: tuple of Stage.
        microbatch_size: int. Examples per micro-batch used for the
            activation estimate.
        optimizer_slots: int. Optimizer slot variables per trainable
            variable used for the slot estimate.
        bandwidth: float or None. Bytes per second between stages that
            the balancing charged for activation transfers (None: none).

    Example:

    ```python
    p = kd.placement.plan(model, 2, devices=["/cpu:0", "/cpu:1"])
    print(p)  # stage, device, layers, parameters, memory estimates
    pipelined = kd.placement.PipelineModel(model, p.devices,
                                           num_microbatches=8, plan=p)
    ```
    """

    model_name: str
    stages: tuple[Stage, ...]
    microbatch_size: int
    optimizer_slots: int
    bandwidth: float | None = None

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.stages)

    @property
    def devices(self) -> list[str | None]:
        """Device of each stage (None where not chosen)."""
        return [s.device for s in self.stages]

    @property
    def assignment(self) -> dict[str, int]:
        """Mapping of layer (operation) name to stage index."""
        return {name: s.index for s in self.stages for name in s.layers}

    def __str__(self) -> str:
        head = (
            "stage",
            "device",
            "layers",
            "params",
            "param mem",
            "optimizer mem",
            "activations/micro-batch",
            "to next stages/micro-batch",
        )
        timed = self.bandwidth is not None
        if timed:
            head = (*head, "transfer/batch")
        rows = []
        for s in self.stages:
            row = (
                str(s.index),
                _short_device(s.device),
                _layer_summary(s.layers),
                f"{s.params:,}",
                format_bytes(s.param_bytes),
                format_bytes(s.slot_bytes),
                format_bytes(s.activation_bytes),
                format_bytes(s.cut_bytes),
            )
            rows.append((*row, _seconds(s.transfer_seconds)) if timed else row)
        widths = [
            max(len(r[c]) for r in [head, *rows]) for c in range(len(head))
        ]
        line = "  ".join("-" * w for w in widths)

        def fmt(row):
            return "  ".join(
                v.ljust(w) if c < 3 else v.rjust(w)
                for c, (v, w) in enumerate(zip(row, widths, strict=False))
            ).rstrip()

        title = (
            f"Plan for model {self.model_name!r}: {self.num_stages} "
            f"stage(s), micro-batch of {self.microbatch_size}, "
            f"{self.optimizer_slots} optimizer slot(s) per variable"
        )
        if timed:
            title += (
                f", transfers at {format_bytes(self.bandwidth)}/s "
                "counted in the balance"
            )
        return "\n".join([title, fmt(head), line, *map(fmt, rows)])


def format_bytes(n: float) -> str:
    """Formats a byte count with a binary unit, e.g. `1.5 KiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _seconds(t: float) -> str:
    if 0 < t < 1e-3:
        return f"{t * 1e6:.1f} us"
    return f"{t * 1e3:.2f} ms"


def _short_device(device):
    if device is None:
        return "-"
    spec = tf.DeviceSpec.from_string(device)
    if spec.device_type is None:
        return device
    short = f"{spec.device_type}:{spec.device_index or 0}"
    if spec.job not in (None, "localhost"):
        # A cluster task's device (kd.placement.join_cluster()).
        return f"{spec.job}:{spec.task or 0}/{short}"
    return short


def _layer_summary(names, limit=4):
    if len(names) <= limit:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]} ({len(names)})"


def plan(
    model: keras.Model,
    num_stages: int | Mapping[str, str],
    *,
    cost: str | Callable[[keras.Operation], float] = "params",
    devices: Sequence[str] | None = None,
    batch_size: int = 32,
    num_microbatches: int = 1,
    optimizer: str | keras.optimizers.Optimizer = "adam",
    sample_inputs=None,
    bandwidth: float | str | None = None,
) -> Plan:
    """Splits a model's layers into a chain of balanced stages.

    Stages are contiguous runs of the model's layers in execution order. The
    automatic split minimises the largest stage's cost, so the largest stage
    costs at most (total cost / `num_stages`) + (largest single layer's
    cost). Tensors crossing a cut (there may be several, e.g. a skip
    connection) are sent to the next stage that needs them.

    With `cost="time"`, each stage's cost also counts the time to move
    activations across its cuts: the bytes it receives from earlier stages
    plus the bytes it sends to later ones, for `batch_size` examples,
    divided by `bandwidth` (bytes/s). The forward pass is measured and
    balanced; the backward pass mirrors it (the same bytes come back as
    gradients). So a cut after a wide layer costs more than one after a
    narrow layer, and the split moves towards narrow cuts when the link
    is slow.

    For a manual plan, pass a mapping of layer-name regular expressions
    (matched with `re.fullmatch`) to devices in place of `num_stages`:
    stages follow the devices in order of first appearance. Every layer must
    be matched by exactly one pattern; operations that are not layers (e.g.
    `x + y` in a functional model) may be left unmatched and join the stage
    of their latest input.

    Args:
        model: keras.Model. A built Sequential or functional model.
        num_stages: int or dict. Number of stages (≥ 1, at most the number
            of layers), or a dict of layer-name regex → device for a
            manual plan.
        cost: str or callable. What to balance: `"params"` (default,
            parameter count), `"time"` (forward time of each layer measured
            on a sample batch), or a function from a layer to a float.
        devices: list of str or None. Device of each stage. Default: the
            first `num_stages` local devices if there are that many, else
            none (give them to `place`/`PipelineModel`). Ignored for manual
            plans.
        batch_size: int. Global batch size for the activation estimate and
            the `"time"` sample batch. Default 32.
        num_microbatches: int. Micro-batches per batch; the activation
            estimate is per micro-batch of `batch_size / num_microbatches`
            examples. Default 1.
        optimizer: str or keras.optimizers.Optimizer. Optimizer whose slot
            variables the estimate counts. Default `"adam"`.
        sample_inputs: array or structure of arrays, or None. Inputs for
            `cost="time"`; default: random data of `batch_size` examples
            shaped like the model's inputs.
        bandwidth: float, "measure" or None. Bytes per second between
            stages, charged for the activations at each cut (with
            `cost="time"` or a callable cost in seconds). `"measure"`:
            measured from the first to the second stage device
            (`kd.placement.measure_bandwidth`). Default None: measured
            when `cost="time"` and the devices belong to different
            workers of a joined cluster, else no transfer cost (local
            devices share memory).

    Returns:
        A `Plan`; `print(plan)` shows its table.

    Raises:
        ValueError: for a model whose graph cannot be split, a bad
            `num_stages`, `cost`, `batch_size`, `num_microbatches` or
            `bandwidth` (or one with `cost="params"`), a
            layer matched by two patterns or by none, or a manual plan
            whose stages are not a chain.

    Example:

    ```python
    model = keras.Sequential([keras.Input((784,)),
                              keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(10)])
    p = kd.placement.plan(model, 2, devices=["/cpu:0", "/cpu:1"])
    print(p)
    manual = kd.placement.plan(
        model, {"dense": "/cpu:0", "dense_[12]": "/cpu:1"})
    ```
    """
    graph = graph_lib.LayerGraph(model)
    batch_size, num_microbatches = _check_batching(batch_size,
                                                   num_microbatches)
    slots = optimizer_slots(optimizer)
    costs = _costs(graph, cost, batch_size, sample_inputs)
    manual = isinstance(num_stages, Mapping)
    if manual:
        assignment, stage_devices = _manual_assignment(graph, num_stages)
    else:
        _check_num_stages(graph, num_stages)
        stage_devices = _default_devices(devices, num_stages)
    bandwidth = _bandwidth(bandwidth, cost, stage_devices)
    extra = None
    if bandwidth is not None:
        extra = transfer.transfer_cost(graph, batch_size, bandwidth)
    if not manual:
        assignment = _balanced_assignment(graph, costs, num_stages, extra)
    micro = batch_size // num_microbatches
    stage_graphs = graph.stages(assignment)
    stages = []
    for sg in stage_graphs:
        stage = _stage_of(sg, stage_devices[sg.index], costs, micro, slots)
        moved = 0.0 if extra is None else extra(*_op_span(graph, sg))
        stages.append(dataclasses.replace(
            stage, cost=stage.cost + moved, transfer_seconds=moved,
            cut_bytes=_cut_bytes(graph, stage_graphs, sg, micro),
        ))
    return Plan(model.name, tuple(stages), micro, slots, bandwidth)


def _op_span(graph, sg) -> tuple[int, int]:
    """[i, j): the operation indices of stage graph `sg` (contiguous)."""
    index = {id(op): k for k, op in enumerate(graph.operations)}
    ks = [index[id(op)] for op in sg.operations]
    return min(ks), max(ks) + 1


def _bandwidth(bandwidth, cost, devices) -> float | None:
    """Bytes/s charged for transfers at cuts, or None (no charge)."""
    if bandwidth is None:
        tasks = {
            (spec.job, spec.task or 0)
            for spec in (tf.DeviceSpec.from_string(d) for d in devices if d)
            if spec.job not in (None, "localhost")
        }
        if cost != "time" or len(tasks) < 2:
            return None
        bandwidth = "measure"
    if cost == "params":
        raise ValueError(
            "Invalid value for argument `bandwidth`: transfer time cannot "
            f"be added to parameter counts. Received: bandwidth={bandwidth!r}"
            " with cost='params'. Expected cost='time' (or a cost function "
            "in seconds), or bandwidth=None."
        )
    if bandwidth == "measure":
        named = [d for d in devices if d]
        if len(named) < 2:
            raise ValueError(
                "Invalid value for argument `bandwidth`. Received: "
                "bandwidth='measure' without two stage devices "
                f"(devices={devices}). Expected `devices` to measure "
                "between, or a number of bytes per second."
            )
        return transfer.measure_bandwidth(named[0], named[1])
    if (
        isinstance(bandwidth, bool)
        or not isinstance(bandwidth, int | float)
        or not bandwidth > 0
        or math.isinf(bandwidth)
    ):
        raise ValueError(
            "Invalid value for argument `bandwidth`. Received: "
            f"bandwidth={bandwidth!r}. Expected a positive finite number "
            "of bytes per second, 'measure' or None."
        )
    return float(bandwidth)


def _cut_bytes(graph, stage_graphs, sg, micro) -> int:
    """Bytes of `sg`'s outputs that later stages read, per micro-batch."""
    later = {t for other in stage_graphs[sg.index + 1:] for t in other.inputs}
    return sum(
        micro * transfer.example_bytes(graph.tensors[t])
        for t in sg.outputs if t in later
    )


def _check_batching(batch_size, num_microbatches) -> tuple[int, int]:
    batch_size = check_int("batch_size", batch_size)
    num_microbatches = check_int("num_microbatches", num_microbatches)
    if batch_size % num_microbatches:
        raise ValueError(
            "Invalid value for argument `batch_size`. "
            f"Received: batch_size={batch_size}, which "
            f"num_microbatches={num_microbatches} does not divide. Expected "
            "a multiple of num_microbatches."
        )
    return batch_size, num_microbatches


def _balanced_assignment(
    graph, costs, num_stages, extra=None
) -> dict[str, int]:
    """{operation name: stage} for `num_stages` cost-balanced stages."""
    num_ops = len(graph.operations)
    cuts = partition(
        [costs[op.name] for op in graph.operations], num_stages, extra
    )
    assignment = {}
    for s, (lo, hi) in enumerate(
        zip([0, *cuts], [*cuts, num_ops], strict=False)
    ):
        for op in graph.operations[lo:hi]:
            assignment[op.name] = s
    return assignment


def _check_num_stages(graph, num_stages) -> None:
    num_ops = len(graph.operations)
    if (
        isinstance(num_stages, bool)
        or not isinstance(num_stages, int)
        or not 1 <= num_stages <= num_ops
    ):
        raise ValueError(
            "Invalid value for argument `num_stages`. "
            f"Received: num_stages={num_stages!r}. Expected an integer "
            f"from 1 to {num_ops} (the number of layers "
            f"of model {graph.model.name!r}), or a dict of layer-name regex "
            "to device."
        )


def _stage_of(sg, device, costs, micro, slots) -> Stage:
    """The `Stage` row of one stage graph: cost, parameters, memory."""
    weights = _unique(
        [w for op in sg.operations for w in getattr(op, "weights", [])]
    )
    trainable = _unique(
        [w for op in sg.operations
         for w in getattr(op, "trainable_weights", [])]
    )
    activation = sum(
        micro * transfer.example_bytes(t)
        for node in sg.nodes for t in node.outputs
    )
    return Stage(
        index=sg.index,
        device=device,
        layers=tuple(op.name for op in sg.operations),
        cost=float(sum(costs[op.name] for op in sg.operations)),
        params=sum(_size(w) for w in weights),
        param_bytes=sum(_bytes(w) for w in weights),
        slot_bytes=slots * sum(_bytes(w) for w in trainable),
        activation_bytes=activation,
    )


def partition(
    costs: Sequence[float],
    num_parts: int,
    extra: Callable[[int, int], float] | None = None,
) -> list[int]:
    """Splits `costs` into contiguous non-empty parts minimising the max sum.

    Ties are broken towards fewer items in the largest part.

    Args:
        costs: sequence of float, non-negative.
        num_parts: int, 1 ≤ num_parts ≤ len(costs).
        extra: function or None. `extra(i, j)` is added to the cost of
            the part `costs[i:j]` (e.g. its transfer time). Default none.

    Returns:
        list of int: the `num_parts - 1` cut indices.

    Example:

    >>> partition([1, 1, 1, 1], 2)
    [2]
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = (math.inf, math.inf)
    # best[k][j]: (max part cost, max part length) splitting costs[:j] into
    # k parts; cut[k][j]: start of the last part.
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = (0.0, 0)
    for k in range(1, num_parts + 1):
        for j in range(k, n - (num_parts - k) + 1):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev == inf:
                    continue
                part = prefix[j] - prefix[i]
                if extra is not None:
                    part += extra(i, j)
                value = (
                    max(prev[0], part),
                    max(prev[1], j - i),
                )
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    cuts, j = [], n
    for k in range(num_parts, 1, -1):
        j = cut[k][j]
        cuts.append(j)
    return sorted(cuts)


def optimizer_slots(optimizer) -> int:
    """Slot variables an optimizer keeps per trainable variable.

    Found by building a fresh copy of the optimizer on one and then two
    probe variables and counting the variables it creates.

    Args:
        optimizer: str or keras.optimizers.Optimizer.

    Returns:
        int, e.g. 2 for Adam, 1 for SGD with momentum, 0 for plain SGD.

    Raises:
        ValueError: if `optimizer` is not an optimizer or its name.

    Example:

    >>> optimizer_slots("adam")
    2
    """
    try:
        if isinstance(optimizer, keras.optimizers.Optimizer):

            def make():
                return type(optimizer).from_config(optimizer.get_config())
        else:
            keras.optimizers.get(optimizer)

            def make():
                return keras.optimizers.get(optimizer)

        counts = []
        for n in (1, 2):
            opt = make()
            with tf.init_scope():
                probe = [
                    keras.Variable(np.zeros((2,), "float32")) for _ in range(n)
                ]
                opt.build(probe)
            counts.append(len(opt.variables))
    except (ValueError, TypeError) as e:
        raise ValueError(
            "Invalid value for argument `optimizer`. "
            f"Received: optimizer={optimizer!r}. Expected a Keras optimizer "
            f"or its name, e.g. 'adam'. ({e})"
        ) from None
    return counts[1] - counts[0]


def _manual_assignment(graph, mapping):
    patterns = []
    for pattern, device in mapping.items():
        try:
            patterns.append((pattern, re.compile(pattern), device))
        except (re.error, TypeError) as e:
            raise ValueError(
                f"Invalid layer-name pattern {pattern!r} in the manual plan: "
                f"{e}. Expected a regular expression."
            ) from None
        if not isinstance(device, str):
            raise ValueError(
                f"Invalid device {device!r} for pattern {pattern!r}: "
                "expected a device name such as '/cpu:1'."
            )
    layer_ids = {id(layer) for layer in graph.layers}
    # Stages follow the devices in the order their first layer runs.
    device_order = []
    assignment = {}
    producer_stage = {}
    for node in graph.nodes:
        op = node.operation
        if op.name not in assignment:
            matched = [(p, d) for p, rx, d in patterns if rx.fullmatch(op.name)]
            if len(matched) > 1:
                raise ValueError(
                    f"Layer {op.name!r} is matched by more than one pattern "
                    f"of the manual plan: {[p for p, _ in matched]}. Each "
                    "layer must match exactly one pattern."
                )
            if matched:
                device = matched[0][1]
                if device not in device_order:
                    device_order.append(device)
                assignment[op.name] = device_order.index(device)
            elif id(op) in layer_ids:
                raise ValueError(
                    f"Layer {op.name!r} is matched by no pattern of the "
                    f"manual plan {list(mapping)}. Each layer must match "
                    "exactly one pattern (patterns use re.fullmatch)."
                )
            else:
                # A non-layer operation (e.g. `x + y`): join its latest input.
                assignment[op.name] = max(
                    [producer_stage.get(id(t), 0) for t in node.input_tensors]
                    or [0]
                )
        for t in node.outputs:
            producer_stage[id(t)] = assignment[op.name]
    unused = [d for _, _, d in patterns if d not in device_order]
    if unused:
        raise ValueError(
            f"Device(s) {sorted(set(unused))} of the manual plan get no "
            "layer: their patterns match nothing. Layer names: "
            f"{[op.name for op in graph.operations]}."
        )
    return assignment, device_order


def _default_devices(devices, num_stages):
    if devices is None:
        local = devices_lib.local_devices()
        if len(local) >= num_stages:
            return stage_devices.check_devices(list(local[:num_stages]))
        return [None] * num_stages
    devices = list(devices)
    if len(devices) < num_stages:
        raise ValueError(
            "Invalid value for argument `devices`. "
            f"Received: devices={devices} ({len(devices)} device(s)) for "
            f"num_stages={num_stages}. Expected at least one device per "
            "stage."
        )
    return stage_devices.check_devices(devices[:num_stages])


def _costs(graph, cost, batch_size, sample_inputs):
    ops = graph.operations
    if callable(cost):
        return {op.name: float(cost(op)) for op in ops}
    if cost == "params":
        return {
            op.name: float(op.count_params())
            if isinstance(op, keras.layers.Layer)
            else 0.0
            for op in ops
        }
    if cost == "time":
        return _measure_times(graph, batch_size, sample_inputs)
    raise ValueError(
        "Invalid value for argument `cost`. "
        f"Received: cost={cost!r}. Expected 'params', 'time' or a function "
        "from a layer to a float."
    )


def _measure_times(graph, batch_size, sample_inputs, repeats=5):
    """Forward time of each operation, seconds (median of `repeats`)."""
    if sample_inputs is None:
        rng = np.random.default_rng(0)
        flat = []
        for t in graph.functional.inputs:
            shape = [batch_size if d is None else d for d in t.shape[1:]]
            if None in t.shape[1:]:
                raise ValueError(
                    f"Input {t.name!r} has shape {t.shape} with an unknown "
                    "dimension; pass `sample_inputs` for cost='time'."
                )
            dtype = tf.as_dtype(t.dtype)
            if dtype.is_floating:
                data = rng.standard_normal((batch_size, *shape))
            else:
                data = np.zeros((batch_size, *shape))
            flat.append(tf.constant(data, dtype))
    else:
        flat = [
            tf.convert_to_tensor(v) for v in graph.flat_inputs(sample_inputs)
        ]
    values = dict(zip(graph.input_ids, flat, strict=False))
    times = {op.name: 0.0 for op in graph.operations}
    for node in graph.nodes:
        args, kwargs = node.arguments.fill_in(values)
        samples = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = graph_lib.call_operation(
                node.operation, False, *args, **kwargs
            )
            for v in keras.tree.flatten(out):
                np.asarray(v)  # wait for the result
            samples.append(time.perf_counter() - start)
        times[node.operation.name] += statistics.median(samples[1:])
        for t, v in zip(node.outputs, keras.tree.flatten(out), strict=False):
            values[id(t)] = v
    return times


def _unique(variables):
    seen, out = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _size(variable):
    return int(np.prod(variable.shape, dtype=np.int64))


def _bytes(variable):
    return _size(variable) * tf.as_dtype(variable.dtype).size



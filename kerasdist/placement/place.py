"""Placing a model's stages on devices."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from kerasdist.placement import pipeline
from kerasdist.placement import planning as plan_lib

__all__ = ["place"]


def place(
    model: keras.Model,
    devices: Sequence[str] | None = None,
    plan: plan_lib.Plan | None = None,
) -> pipeline.PipelineModel:
    """Puts each stage's variables and computation on its device.

    The result shares the model's layers (same weights, names and variable
    paths); each stage's variables are moved to its device, visible as
    `variable.value.device`. It runs the stages one after another, forward
    and backward each on its stage's device, and trains with `fit` like
    the original model. For stages that overlap, use `PipelineModel` with
    several micro-batches; `place` is `PipelineModel(model, devices,
    num_microbatches=1, plan=plan)`.

    Args:
        model: keras.Model. A built Sequential or functional model.
        devices: list of str or None. Device of each stage. Default: the
            plan's devices.
        plan: kerasdist.placement.Plan or None. Default: parameters balanced
            over `len(devices)` stages (`kd.placement.plan`).

    Returns:
        A `PipelineModel` with one micro-batch; compile and fit it.

    Raises:
        ValueError: if a device does not exist, the plan has more stages
            than `devices`, neither gives devices, or the model cannot be
            split.

    Example:

    ```python
    kd.virtual_cpus(2)
    placed = kd.placement.place(model, ["/cpu:0", "/cpu:1"])
    print([w.value.device for w in placed.weights])
    placed.compile(optimizer="sgd", loss="mse")
    placed.fit(x, y)
    ```
    """
    return pipeline.PipelineModel(model, devices, num_microbatches=1, plan=plan)

"""Losses computed by hand in a custom `train_step` or training loop.

Keras scales a loss for distribution (divides it by the number of replicas,
so that summing the replicas' gradients gives the gradient of the global
mean) only where Keras itself reduces the loss: `Model.compute_loss`, a
`keras.losses.Loss` called with per-example values, the built-in
`train_step`. A `train_step` that averages a loss by hand
(`ops.mean(...)`, the VAE example's `total_loss`) and calls
`optimizer.apply_gradients` moves the weights `num_replicas_in_sync` times
too far. `scale_loss` is the one line that makes such a step exact.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import keras
import tensorflow as tf

__all__ = ["scale_loss", "unscale_loss", "warn_if_custom_train_step"]

_warned: set[type] = set()
# Words in a `train_step`'s source that show its loss is scaled already.
_SCALED_MARKERS = ("scale_loss", "compute_loss(", "compute_average_loss(")


def _keras_step_after(cls: type) -> bool:
    """True if the `train_step` that `cls`'s `super()` reaches is Keras's."""
    for base in cls.__mro__[1:]:
        if "train_step" in vars(base):
            return base.__module__.startswith("keras.")
    return False


def scale_loss(loss: Any) -> Any:
    """Scales a hand-computed mean loss for the replicas in sync.

    Call it on the loss you differentiate inside a custom `train_step` (or
    a replica function run by `strategy.run`), after averaging over the
    replica's examples. With N replicas it divides by N, so the all-reduced
    (summed) gradients equal the gradient of the mean over the global
    batch, as on one device. With one replica, or outside any strategy, it
    returns `loss` unchanged. Call it inside the `tf.GradientTape` block
    (a product computed after the tape closes is not recorded, and the
    gradients come back None). Report the unscaled loss in your metrics.

    Args:
        loss: scalar tensor. The loss averaged over this replica's examples.

    Returns:
        `loss / num_replicas_in_sync`, same dtype.

    Example:

    ```python
    class MyModel(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = keras.ops.mean(keras.ops.square(y - self(x)))
                scaled = kd.scale_loss(loss)      # the one-line change
            grads = tape.gradient(scaled, self.trainable_variables)
            self.optimizer.apply_gradients(
                zip(grads, self.trainable_variables))
            return {"loss": loss}
    ```
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas == 1:
        return loss
    loss = tf.convert_to_tensor(loss)
    return loss * tf.cast(1.0 / replicas, loss.dtype)


def unscale_loss(loss: Any) -> Any:
    """A loss scaled by Keras for the replicas, as one device reports it.

    A `keras.losses.Loss` called inside a replica (a custom `train_step`
    or `test_step` under a strategy) returns its mean times
    `1 / num_replicas_in_sync`, which makes the summed gradients exact but
    makes the value a `train_step` returns, and so `fit`'s history,
    `evaluate`, `EarlyStopping`, `ReduceLROnPlateau` and `ModelCheckpoint`,
    see loss / N. Return `unscale_loss(loss)` instead of `loss` from the
    step (differentiate `loss` itself, not this). With one replica, or
    outside any strategy, it returns `loss` unchanged.

    Args:
        loss: scalar tensor returned by a `keras.losses.Loss` in a replica.

    Returns:
        `loss * num_replicas_in_sync`, same dtype.

    Example:

    ```python
    def train_step(self, data):
        ...
        d_loss = self.loss_fn(labels, predictions)   # Keras scales it
        ...
        return {"d_loss": kd.losses.unscale_loss(d_loss)}
    ```
    """
    from kerasdist import _internals

    return _internals.unscale_loss_for_distribution(loss)


def _overrides_train_step(model: Any) -> Any:
    """The class defining `model.train_step` if it is not Keras's own."""
    for cls in type(model).__mro__:
        if "train_step" in vars(cls):
            module = getattr(cls, "__module__", "")
            return None if module.startswith("keras.") else cls
    return None


def warn_if_custom_train_step(model: Any, strategy: Any) -> bool:
    """Warns once per class when a custom `train_step` may be unscaled.

    Called by kerasdist's strategies when `fit` starts with more than one
    replica. A `train_step` whose source mentions `compute_loss(`,
    `scale_loss`, `compute_average_loss(`, or calls a `keras.losses.Loss`
    the model holds (`self.loss_fn(...)`, as the keras.io GAN example does;
    Keras scales those) is taken to scale its loss; any other gets one
    warning naming the fix (`kd.scale_loss`). A correct step that is
    warned about can silence it with `warnings.filterwarnings`.

    Args:
        model: `keras.Model` being fitted.
        strategy: `tf.distribute.Strategy` it trains under.

    Returns:
        bool: True if a warning was issued.

    Example:

    ```python
    warn_if_custom_train_step(model, strategy)
    ```
    """
    if model is None or strategy.num_replicas_in_sync < 2:
        return False
    cls = _overrides_train_step(model)
    if cls is None or cls in _warned:
        return False
    try:
        source = inspect.getsource(cls.train_step)
    except (OSError, TypeError):
        source = ""
    held = [f"self.{name}(" for name, value in vars(model).items()
            if isinstance(value, keras.losses.Loss)]
    if any(marker in source for marker in held):
        return _warn_scaled_report(cls, held, source, strategy)
    if any(marker in source for marker in _SCALED_MARKERS):
        return False
    if "super().train_step(" in source and _keras_step_after(cls):
        return False  # Keras's own step computes and scales the loss
    _warned.add(cls)
    warnings.warn(
        f"{cls.__name__}.train_step is a custom training step running on "
        f"{strategy.num_replicas_in_sync} replicas. If it averages its loss "
        "by hand (e.g. keras.ops.mean(...)) and calls "
        "optimizer.apply_gradients, every step moves the weights "
        f"{strategy.num_replicas_in_sync}x too far: the replicas' gradients "
        "are summed. Differentiate `kd.scale_loss(loss)` instead of `loss` "
        "(or compute the loss with self.compute_loss(...) or a "
        "keras.losses.Loss, which Keras scales). See the custom loops "
        "guide.",
        UserWarning,
        stacklevel=5,
    )
    return True


def _warn_scaled_report(cls, held, source, strategy) -> bool:
    """Warns once that a held `Loss`'s values are reported scaled."""
    if "unscale_loss" in source:
        return False
    _warned.add(cls)
    replicas = strategy.num_replicas_in_sync
    name = next(marker for marker in held if marker in source)
    warnings.warn(
        f"{cls.__name__}.train_step computes losses with a "
        f"keras.losses.Loss ({name}...)). Training is exact, but under "
        f"{replicas} replicas Keras scales such a loss by 1/{replicas}, "
        "so the values the step returns (fit's history, evaluate, "
        "EarlyStopping, ReduceLROnPlateau, ModelCheckpoint's monitor) are "
        f"{replicas}x smaller than on one device. Return "
        "`kd.losses.unscale_loss(loss)` instead of `loss` (the one-line "
        "change; see the custom loops guide).",
        UserWarning,
        stacklevel=6,
    )
    return True

"""Learning-rate scaling and gradual warm-up for large global batches.

Goyal et al. 2017 ("Accurate, Large Minibatch SGD"): when the global batch
grows k times, multiply the learning rate by k (linear scaling rule), and
reach that rate gradually over the first epochs (warm-up) so the early,
large updates do not diverge.

`LearningRateWarmup` multiplies the optimizer's learning rate by a factor
that moves linearly, step by step, from a start factor to an end factor
over the warm-up, then stays at the end factor:

| `scale` / `target_lr` | start | end | optimizer rate is ... |
| --- | --- | --- | --- |
| `"linear"` (default) | 1 | N replicas | the single-replica rate |
| `None` | 1/N | 1 | already the large-batch rate (Horovod style) |
| `target_lr=t` | 1 | t / base | the start rate |

The step is `optimizer.iterations`, so a run resumed from a backup does
not restart its warm-up.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from absl import logging

from kerasdist import _internals
from kerasdist import cluster as cluster_lib
from kerasdist._validate import check_int

__all__ = ["LearningRateWarmup", "WarmupSchedule", "scale_learning_rate"]

_SCALES = ("linear", None)


def _num_replicas(strategy: tf.distribute.Strategy | None) -> int:
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    return int(strategy.num_replicas_in_sync)


@keras.saving.register_keras_serializable(package="kerasdist")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule multiplied by a linearly ramped factor.

    `lr(step) = schedule(step) * factor(step)`, where `factor` moves
    linearly from `start_factor` at step 0 to `end_factor` at
    `warmup_steps` and stays there.

    Args:
        schedule: `keras.optimizers.schedules.LearningRateSchedule` or
            float. The rate to multiply.
        warmup_steps: int. Steps of the ramp; 0 applies `end_factor`
            from the first step.
        start_factor: float. Factor at step 0. Defaults to 1.
        end_factor: float. Factor from `warmup_steps` on. Defaults to 1.

    Example:

    ```python
    sched = keras.optimizers.schedules.CosineDecay(0.1, 10_000)
    opt = keras.optimizers.SGD(WarmupSchedule(sched, 500, 1.0, 8.0))
    ```
    """

    def __init__(
        self,
        schedule: Any,
        warmup_steps: int,
        start_factor: float = 1.0,
        end_factor: float = 1.0,
    ):
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.start_factor = float(start_factor)
        self.end_factor = float(end_factor)

    def factor(self, step):
        """The multiplier at `step` (a tensor or number)."""
        step = tf.cast(step, tf.float32)
        if self.warmup_steps <= 0:
            return tf.constant(self.end_factor, tf.float32)
        frac = tf.minimum(step / float(self.warmup_steps), 1.0)
        return self.start_factor + (self.end_factor - self.start_factor) * frac

    def __call__(self, step):
        if isinstance(self.schedule,
                      keras.optimizers.schedules.LearningRateSchedule):
            base = self.schedule(step)
        else:
            base = self.schedule
        base = tf.cast(base, tf.float32)
        return base * self.factor(step)

    def get_config(self) -> dict:
        schedule = self.schedule
        if isinstance(schedule,
                      keras.optimizers.schedules.LearningRateSchedule):
            schedule = keras.saving.serialize_keras_object(schedule)
        return {
            "schedule": schedule,
            "warmup_steps": self.warmup_steps,
            "start_factor": self.start_factor,
            "end_factor": self.end_factor,
        }

    @classmethod
    def from_config(cls, config: dict) -> WarmupSchedule:
        config = dict(config)
        if isinstance(config["schedule"], dict):
            config["schedule"] = keras.saving.deserialize_keras_object(
                config["schedule"]
            )
        return cls(**config)


def scale_learning_rate(
    lr: Any,
    strategy: tf.distribute.Strategy | None = None,
    *,
    rule: str = "linear",
) -> Any:
    """Scales a single-replica learning rate to the global batch.

    Args:
        lr: float or `keras.optimizers.schedules.LearningRateSchedule`. The
            rate tuned for one replica's batch.
        strategy: `tf.distribute.Strategy` or None. Its
            `num_replicas_in_sync` is the scale; defaults to the current
            strategy (1 replica outside any scope).
        rule: str. `"linear"` (Goyal et al. 2017: times N) or `"sqrt"`
            (times sqrt(N), often used with Adam). Defaults to `"linear"`.

    Returns:
        A float when `lr` is a number, else a `WarmupSchedule` wrapping
        `lr` with a constant factor.

    Raises:
        ValueError: on an unknown `rule` or a non-positive `lr`.

    Example:

    ```python
    strategy = kd.get_strategy("mirrored")
    with strategy.scope():
        opt = keras.optimizers.SGD(kd.scale_learning_rate(0.1, strategy))
    ```
    """
    if rule not in ("linear", "sqrt"):
        raise ValueError(
            "Invalid value for argument `rule`. Received: "
            f"rule={rule!r}. Expected 'linear' or 'sqrt'."
        )
    n = _num_replicas(strategy)
    factor = float(n) if rule == "linear" else float(n) ** 0.5
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        return WarmupSchedule(lr, 0, factor, factor)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(
            "Invalid value for argument `lr`. Received: "
            f"lr={lr!r}. Expected a positive number or a "
            "keras.optimizers.schedules.LearningRateSchedule."
        )
    return float(lr) * factor


class LearningRateWarmup(keras.callbacks.Callback):
    """Ramps the learning rate per step over a warm-up, then hands over.

    With the default `scale="linear"`, the optimizer is configured with the
    rate tuned for one replica; over the warm-up the rate moves linearly,
    step by step, from that rate to rate × N (N = replicas in sync), and
    afterwards the optimizer's own rate (constant or schedule) continues,
    multiplied by N (Goyal et al. 2017). With `scale=None` the optimizer
    already holds the large-batch rate and the ramp starts at rate / N (as
    Horovod's `LearningRateWarmupCallback`). With `target_lr` the ramp goes
    from the optimizer's rate to `target_lr`.

    A constant rate (a variable) is assigned at each warm-up step and left
    alone afterwards, so `keras.callbacks.ReduceLROnPlateau` and
    `LearningRateScheduler` keep working (a change they make during the
    warm-up is taken as a new base rate). A
    `keras.optimizers.schedules.LearningRateSchedule` is wrapped in a
    `WarmupSchedule` at the start of training: the ramp then runs inside the
    compiled step. The step counted is `optimizer.iterations`, so training
    resumed from a backup continues the ramp where it stopped. With
    `steps_per_execution > 1` a constant rate changes once per execution
    (Keras calls batch hooks per execution); a schedule still ramps per
    step.

    Args:
        warmup_steps: int or None. Length of the ramp in optimizer steps.
            Exactly one of `warmup_steps` and `warmup_epochs` is needed.
        warmup_epochs: float or None. Length of the ramp in epochs
            (`steps_per_epoch` from `fit`, or the argument below).
        scale: str or None. `"linear"` (default): ramp from the rate to
            rate × N. None: ramp from rate / N to the rate.
        target_lr: float or None. Rate at the end of the ramp (overrides
            `scale`). Defaults to None.
        steps_per_epoch: int or None. For `warmup_epochs` when `fit` does
            not know the epoch length. Defaults to None.
        num_replicas: int or None. N; defaults to the model's strategy's
            `num_replicas_in_sync`.
        verbose: int. 1 logs the ramp at the start (chief only). Defaults
            to 0.

    Raises:
        ValueError: on invalid arguments (at construction), or when
            `warmup_epochs` is given and the epoch length is unknown (at
            the start of `fit`, before any step).

    Example:

    ```python
    strategy = kd.get_strategy("mirrored")
    with strategy.scope():
        model = build_model()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(ds, epochs=90, callbacks=[
        kd.callbacks.LearningRateWarmup(warmup_epochs=5),
        keras.callbacks.ReduceLROnPlateau(patience=3),
    ])
    ```
    """

    def __init__(
        self,
        warmup_steps: int | None = None,
        warmup_epochs: float | None = None,
        scale: str | None = "linear",
        target_lr: float | None = None,
        steps_per_epoch: int | None = None,
        num_replicas: int | None = None,
        verbose: int = 0,
    ):
        super().__init__()
        if (warmup_steps is None) == (warmup_epochs is None):
            raise ValueError(
                "Pass exactly one of `warmup_steps` and `warmup_epochs`. "
                f"Received: warmup_steps={warmup_steps!r}, "
                f"warmup_epochs={warmup_epochs!r}."
            )
        if warmup_steps is not None:
            warmup_steps = check_int("warmup_steps", warmup_steps)
        if warmup_epochs is not None and (
            isinstance(warmup_epochs, bool)
            or not isinstance(warmup_epochs, (int, float))
            or warmup_epochs <= 0
        ):
            raise ValueError(
                "Invalid value for argument `warmup_epochs`. Received: "
                f"warmup_epochs={warmup_epochs!r}. Expected a positive number."
            )
        if scale not in _SCALES:
            raise ValueError(
                "Invalid value for argument `scale`. Received: "
                f"scale={scale!r}. Expected 'linear' or None."
            )
        if target_lr is not None and (
            isinstance(target_lr, bool)
            or not isinstance(target_lr, (int, float))
            or target_lr <= 0
        ):
            raise ValueError(
                "Invalid value for argument `target_lr`. Received: "
                f"target_lr={target_lr!r}. Expected a positive number."
            )
        if steps_per_epoch is not None:
            steps_per_epoch = check_int(
                "steps_per_epoch", steps_per_epoch, hint="Or None."
            )
        if num_replicas is not None:
            num_replicas = check_int("num_replicas", num_replicas,
                                     hint="Or None.")
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.scale = scale
        self.target_lr = target_lr
        self.steps_per_epoch = steps_per_epoch
        self.num_replicas = num_replicas
        self.verbose = verbose
        self._total = None  # resolved warm-up steps
        self._base = None  # base rate (constant-rate mode)
        self._last_set = None
        self._done = False

    # -- helpers ---------------------------------------------------------
    def _resolve_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        steps = self.steps_per_epoch or (self.params or {}).get("steps")
        if not steps:
            raise ValueError(
                "Argument `warmup_epochs` needs the number of steps per "
                f"epoch. Received: warmup_epochs={self.warmup_epochs}, but "
                "`fit` does not know the epoch length (pass steps_per_epoch "
                "to fit or to LearningRateWarmup, or use warmup_steps)."
            )
        return max(1, int(round(self.warmup_epochs * steps)))

    def _factors(self, base: float) -> tuple[float, float]:
        n = self.num_replicas or _num_replicas(
            getattr(self.model, "distribute_strategy", None)
        )
        if self.target_lr is not None:
            return 1.0, float(self.target_lr) / base
        if self.scale == "linear":
            return 1.0, float(n)
        return 1.0 / n, 1.0

    def _factor(self, step: int) -> float:
        frac = min(step / self._total, 1.0)
        return self._start + (self._end - self._start) * frac

    def _optimizer(self):
        return self.model.optimizer

    # -- callback hooks --------------------------------------------------
    def on_train_begin(self, logs=None):
        opt = self._optimizer()
        self._total = self._resolve_steps()
        self._done = False
        lr = _internals.learning_rate_attribute(opt)
        step = int(opt.iterations.numpy())
        if isinstance(lr, WarmupSchedule):
            # Already wrapped: by an earlier fit, or restored from a saved
            # model (the ramp is part of the optimizer's config).
            self._schedule_mode = True
            return
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            self._schedule_mode = True
            base = float(lr(0))
            self._start, self._end = self._factors(base)
            wrapped = WarmupSchedule(lr, self._total, self._start, self._end)
            # Keras evaluates the schedule at `iterations` inside the train
            # step; swapping it before the first step (the train function is
            # traced on its first call) puts the ramp in the compiled step.
            _internals.set_learning_rate_schedule(opt, wrapped)
            if step > 0 and hasattr(self.model, "make_train_function"):
                # A train step traced by an earlier fit captured the old
                # schedule; `fit` reads `model.train_function` at each step.
                self.model.make_train_function(force=True)
            self._log_plan(base)
            return
        self._schedule_mode = False
        current = float(keras.ops.convert_to_numpy(opt.learning_rate))
        if current <= 0:
            raise ValueError(
                "LearningRateWarmup needs a positive learning rate. Received: "
                f"optimizer.learning_rate={current}."
            )
        if step >= self._total + 1:
            self._done = True  # Resumed after the warm-up.
            return
        # On resume, the restored rate is the ramp's value at step - 1.
        frac = min(max(step - 1, 0) / self._total, 1.0) if step else 0.0
        if self.target_lr is not None:
            # current = base + (target - base) * frac
            self._base = (current - self.target_lr * frac) / (1.0 - frac)
        else:
            self._start, self._end = self._factors(current)
            self._base = current / self._factor(max(step - 1, 0)) if (
                step
            ) else current
        self._start, self._end = self._factors(self._base)
        self._last_set = None
        self._log_plan(self._base)

    def _log_plan(self, base: float) -> None:
        if self.verbose and cluster_lib.is_chief():
            logging.info(
                "LearningRateWarmup: %d steps, learning rate %.6g -> %.6g",
                self._total, base * self._start, base * self._end,
            )

    def on_train_batch_begin(self, batch, logs=None):
        if self._schedule_mode or self._done:
            return
        opt = self._optimizer()
        step = int(opt.iterations.numpy())
        current = float(keras.ops.convert_to_numpy(opt.learning_rate))
        if self._last_set is not None and abs(current - self._last_set) > (
            1e-7 * max(abs(self._last_set), 1e-30)
        ):
            # Another callback (ReduceLROnPlateau, LearningRateScheduler)
            # changed the rate: take it as the new base.
            self._base = current / self._last_factor
        factor = self._factor(step)
        value = self._base * factor
        opt.learning_rate = value
        self._last_set = float(
            keras.ops.convert_to_numpy(opt.learning_rate)
        )
        self._last_factor = factor
        if step >= self._total:
            self._done = True  # From now on the rate belongs to others.

    def get_config(self) -> dict:
        return {
            "warmup_steps": self.warmup_steps,
            "warmup_epochs": self.warmup_epochs,
            "scale": self.scale,
            "target_lr": self.target_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "num_replicas": self.num_replicas,
            "verbose": self.verbose,
        }

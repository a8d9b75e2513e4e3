"""LearningRateWarmup and scale_learning_rate: the LR curve step by step."""

import keras
import numpy as np
import pytest

import kerasdist as kd
from kerasdist import _internals
from kerasdist.callbacks import LearningRateWarmup, WarmupSchedule

BASE = 0.01


def _strategy():
    return kd.MirroredStrategy(["/cpu:0", "/cpu:1"])


def _model(strategy, lr):
    """One weight w, loss |w - 1000| (mae): each step moves w by exactly lr.

    (A plain-function loss is not scaled for distribution by Keras 3, so
    the built-in "mae" is used.)
    """
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ])
        model.compile(optimizer=keras.optimizers.SGD(lr), loss="mae")
    return model


class _StepLR(keras.callbacks.Callback):
    """Learning rate applied at each step, from the weight's movement."""

    def __init__(self):
        super().__init__()
        self.applied = []

    def on_train_batch_begin(self, batch, logs=None):
        self._w = float(self.model.get_weights()[0][0, 0])

    def on_train_batch_end(self, batch, logs=None):
        w = float(self.model.get_weights()[0][0, 0])
        self.applied.append(w - self._w)


def _fit(model, steps, callbacks, epochs=1):
    x = np.ones((4 * steps, 1), "float32")
    rec = _StepLR()
    model.fit(x, 1000 * x, batch_size=4, epochs=epochs, verbose=0,
              shuffle=False,
              callbacks=[*callbacks, rec])
    return np.array(rec.applied)


def _ramp(base, start, end, total, steps):
    return np.array([
        base * (start + (end - start) * min(t / total, 1.0))
        for t in range(steps)
    ])


def test_linear_ramp_to_base_times_replicas_then_constant():
    model = _model(_strategy(), BASE)
    applied = _fit(model, 8, [LearningRateWarmup(warmup_steps=4)])
    # 2 replicas: BASE -> 2 * BASE over steps 0..4, then 2 * BASE.
    expected = _ramp(BASE, 1.0, 2.0, 4, 8)
    np.testing.assert_allclose(applied, expected, rtol=1e-5)
    assert expected[0] == BASE and expected[-1] == 2 * BASE


def test_scale_none_ramps_from_base_over_replicas_to_base():
    model = _model(_strategy(), BASE)
    applied = _fit(model, 6, [LearningRateWarmup(warmup_steps=4, scale=None)])
    np.testing.assert_allclose(applied, _ramp(BASE, 0.5, 1.0, 4, 6),
                               rtol=1e-5)


def test_target_lr():
    model = _model(_strategy(), BASE)
    applied = _fit(model, 6, [LearningRateWarmup(warmup_steps=2,
                                                 target_lr=0.05)])
    np.testing.assert_allclose(applied, _ramp(BASE, 1.0, 5.0, 2, 6),
                               rtol=1e-5)


def test_warmup_epochs_uses_steps_per_epoch():
    model = _model(_strategy(), BASE)
    # 3 steps per epoch, 1 epoch of warm-up = 3 steps.
    applied = _fit(model, 3, [LearningRateWarmup(warmup_epochs=1)], epochs=2)
    np.testing.assert_allclose(applied, _ramp(BASE, 1.0, 2.0, 3, 6),
                               rtol=1e-5)


def test_composes_with_a_keras_schedule_inside_the_compiled_step():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [5], [BASE, BASE / 10]
    )
    model = _model(_strategy(), schedule)
    applied = _fit(model, 8, [LearningRateWarmup(warmup_steps=4)])
    base = np.array([BASE if t <= 5 else BASE / 10 for t in range(8)])
    factor = _ramp(1.0, 1.0, 2.0, 4, 8)
    np.testing.assert_allclose(applied, base * factor, rtol=1e-5)
    assert isinstance(
        _internals.learning_rate_attribute(model.optimizer), WarmupSchedule
    )


def test_hands_over_to_reduce_lr_on_plateau_after_warmup():
    model = _model(_strategy(), BASE)
    # The loss keeps falling; min_delta makes every epoch after the first
    # "no improvement", so the rate is halved after each epoch (patience 0).
    plateau = keras.callbacks.ReduceLROnPlateau(
        "loss", factor=0.5, patience=0, min_delta=1e9, mode="min")
    applied = _fit(model, 2, [LearningRateWarmup(warmup_steps=2), plateau],
                   epochs=3)
    # Epoch 1: the ramp 0.01, 0.015 (the plateau callback's first epoch is
    # an improvement); epoch 2 at the end of the ramp (0.02), after which
    # the warm-up leaves the rate alone and the plateau callback halves it.
    np.testing.assert_allclose(
        applied, [0.01, 0.015, 0.02, 0.02, 0.01, 0.01], rtol=1e-5)


def test_resumed_fit_continues_the_ramp():
    model = _model(_strategy(), BASE)
    warmup = LearningRateWarmup(warmup_steps=4)
    first = _fit(model, 2, [warmup])
    second = _fit(model, 4, [LearningRateWarmup(warmup_steps=4)])
    np.testing.assert_allclose(np.concatenate([first, second]),
                               _ramp(BASE, 1.0, 2.0, 4, 6), rtol=1e-5)


def test_warmup_epochs_needs_epoch_length():
    import tensorflow as tf

    model = _model(_strategy(), BASE)
    ds = tf.data.Dataset.from_tensors(
        (np.ones((4, 1), "float32"), 1000 * np.ones((4, 1), "float32"))
    ).repeat()
    with pytest.raises(ValueError, match="warmup_epochs"):
        # filter() hides the length: fit cannot know the steps per epoch.
        model.fit(ds.take(2).filter(lambda x, y: True), epochs=1, verbose=0,
                  callbacks=[
            LearningRateWarmup(warmup_epochs=1)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"warmup_steps": 2, "warmup_epochs": 1}, "exactly one"),
        ({"warmup_steps": 0}, "warmup_steps=0"),
        ({"warmup_epochs": -1}, "warmup_epochs=-1"),
        ({"warmup_steps": 2, "scale": "sqrt"}, "scale='sqrt'"),
        ({"warmup_steps": 2, "target_lr": 0}, "target_lr=0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearningRateWarmup(**kwargs)


def test_scale_learning_rate():
    strategy = _strategy()
    assert kd.scale_learning_rate(0.1, strategy) == pytest.approx(0.2)
    assert kd.scale_learning_rate(0.1, strategy, rule="sqrt") == (
        pytest.approx(0.1 * 2 ** 0.5))
    assert kd.scale_learning_rate(0.1) == pytest.approx(0.1)  # no strategy
    sched = kd.scale_learning_rate(
        keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5), strategy)
    assert float(sched(0)) == pytest.approx(0.2)
    assert float(sched(10)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rule='cubic'"):
        kd.scale_learning_rate(0.1, strategy, rule="cubic")
    with pytest.raises(ValueError, match="lr=-1"):
        kd.scale_learning_rate(-1, strategy)


def test_warmup_schedule_round_trips_through_optimizer_config():
    inner = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    opt = keras.optimizers.SGD(WarmupSchedule(inner, 4, 1.0, 3.0))
    clone = keras.optimizers.SGD.from_config(opt.get_config())
    sched = _internals.learning_rate_attribute(clone)
    assert isinstance(sched, WarmupSchedule)
    for step in (0, 2, 4, 20):
        assert float(sched(step)) == pytest.approx(
            float(_internals.learning_rate_attribute(opt)(step)))


def test_schedule_warmup_added_on_a_second_fit_takes_effect():
    """A train step traced by an earlier fit is retraced with the ramp."""
    model = _model(_strategy(), keras.optimizers.schedules.ExponentialDecay(
        BASE, 1000, 1.0))  # constant BASE
    first = _fit(model, 2, [])
    second = _fit(model, 4, [LearningRateWarmup(warmup_steps=4)])
    np.testing.assert_allclose(first, [BASE, BASE], rtol=1e-5)
    # The ramp counts optimizer steps: steps 2..5 of a 4-step ramp.
    np.testing.assert_allclose(second, [BASE * f for f in
                                        (1.5, 1.75, 2.0, 2.0)], rtol=1e-5)

"""kd.callbacks.LocalSGD under MirroredStrategy with 4 virtual CPUs.

Everything is real `fit`: the per-replica weights are read from the
components of each MirroredVariable, and the all-reduces are counted by
instrumenting the strategy's collective (kd.callbacks.AllReduceCounter).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasdist as kd

DEVICES = [f"/cpu:{i}" for i in range(4)]
def ADAM():
    return keras.optimizers.Adam(0.01)


STEPS = 8  # per epoch: 256 samples, global batch 32


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    return x, y


def _dataset():
    x, y = _data()
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32)


def _build(strategy, optimizer=None, batchnorm=False, seed=3, **compile_kw):
    with strategy.scope():
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((6,)), keras.layers.Dense(16, activation="tanh")]
        if batchnorm:
            layers.append(keras.layers.BatchNormalization())
        layers.append(keras.layers.Dense(1))
        model = keras.Sequential(layers)
        # Keras's TF optimizer binds the strategy current at its creation.
        optimizer = (optimizer or (lambda: keras.optimizers.SGD(0.05)))()
        model.compile(optimizer, "mse",
                      **compile_kw)
    return model


def _replicas(variable):
    return [v.numpy() for v in variable.value.values]


def _spread(variable):
    parts = _replicas(variable)
    return max(float(np.abs(parts[0] - p).max()) for p in parts[1:])


class _Spy(keras.callbacks.Callback):
    """Records, after each step, how far apart the replicas' weights are."""

    def __init__(self):
        super().__init__()
        self.spread = []
        self.bn_spread = []

    def on_train_batch_end(self, batch, logs=None):
        self.spread.append(
            max(_spread(v) for v in self.model.trainable_variables))
        self.bn_spread.append(max(
            [_spread(v) for v in self.model.non_trainable_variables]
            or [0.0]))


class _Interrupted(Exception):
    pass


class _InterruptAfter(keras.callbacks.Callback):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.steps:
            raise _Interrupted()


# ---------------------------------------------------------------------------
# Bad input: clear errors before any training step.


@pytest.mark.parametrize("sync_every", [0, -2, 1.5, True, "8", None])
def test_rejects_sync_every(sync_every):
    with pytest.raises(ValueError, match="argument `sync_every`"):
        kd.callbacks.LocalSGD(sync_every=sync_every)


@pytest.mark.parametrize("outer", ["sgd", object(), tf.keras.optimizers])
def test_rejects_outer_optimizer_that_is_not_keras(outer):
    with pytest.raises(ValueError, match="keras.optimizers.Optimizer"):
        kd.callbacks.LocalSGD(4, outer_optimizer=outer)


def test_rejects_unknown_compression():
    with pytest.raises(ValueError, match="compression='int4'.*'int8'"):
        kd.callbacks.LocalSGD(4, compression="int4")


def test_sync_every_not_multiple_of_steps_per_execution_fails_before_training():
    strategy = kd.MirroredStrategy(DEVICES)
    model = _build(strategy, steps_per_execution=4)
    before = model.get_weights()
    with pytest.raises(ValueError) as e:
        model.fit(_dataset(), epochs=1, verbose=0,
                  callbacks=[kd.callbacks.LocalSGD(sync_every=6)])
    assert "sync_every=6" in str(e.value)
    assert "steps_per_execution=4" in str(e.value)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Semantics.


def test_sync_every_1_equals_synchronous_training():
    sync_strategy = kd.MirroredStrategy(DEVICES)
    sync_count = kd.callbacks.AllReduceCounter(sync_strategy)
    sync = _build(sync_strategy)
    sync.fit(_dataset(), epochs=2, verbose=0)

    local_strategy = kd.MirroredStrategy(DEVICES)
    local_count = kd.callbacks.AllReduceCounter(local_strategy)
    local = _build(local_strategy)
    local.fit(_dataset(), epochs=2, verbose=0,
              callbacks=[kd.callbacks.LocalSGD(sync_every=1)])

    for a, b in zip(sync.get_weights(), local.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sync_count.calls == local_count.calls == 2 * STEPS


def test_replicas_diverge_between_syncs_and_agree_after_each_sync():
    strategy = kd.MirroredStrategy(DEVICES)
    counter = kd.callbacks.AllReduceCounter(strategy)
    model = _build(strategy, ADAM, batchnorm=True)
    spy = _Spy()
    local = kd.callbacks.LocalSGD(sync_every=4)
    model.fit(_dataset(), epochs=2, verbose=0, callbacks=[local, spy])

    for step, (spread, bn) in enumerate(
        zip(spy.spread, spy.bn_spread, strict=True), start=1
    ):
        if step % 4 == 0:
            assert spread == 0.0, step
            assert bn == 0.0, step  # BatchNormalization statistics averaged
        else:
            assert spread > 1e-4, step
            assert bn > 1e-6, step
    assert local.syncs == 2 * STEPS // 4
    assert counter.calls == 2 * STEPS // 4


def test_all_reduces_are_h_times_fewer_and_carry_the_same_bytes():
    counts = {}
    for h in (None, 4, 8):
        strategy = kd.MirroredStrategy(DEVICES)
        counter = kd.callbacks.AllReduceCounter(strategy)
        model = _build(strategy)
        callbacks = [] if h is None else [kd.callbacks.LocalSGD(h)]
        model.fit(_dataset(), epochs=2, verbose=0, callbacks=callbacks)
        counts[h] = (counter.calls, counter.bytes)
    assert counts[None][0] == 2 * STEPS
    assert counts[None][0] == 4 * counts[4][0] == 8 * counts[8][0]
    assert counts[None][1] == 4 * counts[4][1] == 8 * counts[8][1]


def test_diloco_outer_nesterov_differs_from_averaging_and_learns():
    results = {}
    for name, outer in [
        ("avg", None),
        ("diloco", keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)),
    ]:
        strategy = kd.MirroredStrategy(DEVICES)
        model = _build(strategy)
        start = model.evaluate(_dataset(), verbose=0)
        model.fit(_dataset(), epochs=3, verbose=0,
                  callbacks=[kd.callbacks.LocalSGD(4, outer)])
        results[name] = (start, model.evaluate(_dataset(), verbose=0),
                         model.get_weights())
    for start, end, _ in results.values():
        assert end < 0.5 * start
    assert not np.allclose(results["avg"][2][0], results["diloco"][2][0])


@pytest.mark.parametrize("compression", ["fp16", "bf16", "int8"])
def test_compressed_pseudo_gradients_stay_close(compression):
    weights = {}
    for c in (None, compression):
        strategy = kd.MirroredStrategy(DEVICES)
        model = _build(strategy)
        model.fit(_dataset(), epochs=1, verbose=0,
                  callbacks=[kd.callbacks.LocalSGD(4, compression=c)])
        weights[c] = model.get_weights()
    tol = {"fp16": 1e-3, "bf16": 1e-2, "int8": 2e-2}[compression]
    for a, b in zip(weights[None], weights[compression], strict=True):
        np.testing.assert_allclose(a, b, atol=tol)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(weights[None], weights[compression], strict=True)
    )


@pytest.mark.filterwarnings("ignore:kd.callbacks.LocalSGD")
@pytest.mark.parametrize("compression", [None, "int8"])
def test_exact_resume_mid_round_with_backup_and_restore(tmp_path,
                                                       compression):
    # int8: every replica's error-feedback residual is restored too.
    def outer():
        return keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)

    def local_sgd():
        return kd.callbacks.LocalSGD(4, outer(), compression=compression)

    strategy = kd.MirroredStrategy(DEVICES)
    reference = _build(strategy, ADAM, batchnorm=True)
    reference.fit(_dataset(), epochs=3, verbose=0, callbacks=[local_sgd()])

    backup = str(tmp_path / "backup")
    first = _build(strategy, ADAM, batchnorm=True)
    with pytest.raises(_Interrupted):
        first.fit(_dataset(), epochs=3, verbose=0, callbacks=[
            local_sgd(),
            kd.callbacks.BackupAndRestore(backup, save_freq=3),
            _InterruptAfter(11),  # backup at step 9: round step 1 of 4
        ])
    # A new process would build a new model (different initial weights).
    resumed = _build(strategy, ADAM, batchnorm=True,
                     seed=11)
    spy = _Spy()
    resumed.fit(_dataset(), epochs=3, verbose=0, callbacks=[
        kd.callbacks.BackupAndRestore(backup, save_freq=3),
        local_sgd(),
        spy,
    ])
    assert len(spy.spread) == 3 * STEPS - 9  # resumed at step 9
    # Step 12 is the first sync after the restart (round restored at 1).
    assert spy.spread[12 - 9 - 1] == 0.0
    assert spy.spread[0] > 0.0
    for a, b in zip(reference.get_weights(), resumed.get_weights(),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# int8 pseudo-gradients with error feedback.


def _named(model, name):
    return [v for v in model.optimizer.variables
            if name in v.path and not v.path.startswith("local_sgd/replicas")]


class _BeforeSync(keras.callbacks.Callback):
    """Before each sync (listed before LocalSGD): every replica's weights
    and residuals, and the anchor."""

    def __init__(self, every):
        super().__init__()
        self.every = every
        self.records = []

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every == 0:
            self.records.append(_snapshot(self.model))


def _snapshot(model):
    return {
        "weights": [_replicas(v) for v in model.trainable_variables],
        "residual": [_replicas(v) for v in _named(model,
                                                  "local_sgd_residual")],
        "anchor": [v.numpy() for v in _named(model, "local_sgd_anchor")],
    }


def test_int8_sends_a_byte_per_value_and_feeds_back_the_residual():
    strategy = kd.MirroredStrategy(DEVICES)
    counter = kd.callbacks.AllReduceCounter(strategy)
    model = _build(strategy)
    spy = _BeforeSync(4)
    model.fit(_dataset(), epochs=1, verbose=0, callbacks=[
        spy, kd.callbacks.LocalSGD(4, compression="int8")])
    records = [*spy.records, _snapshot(model)]
    assert len(records) == STEPS // 4 + 1
    # Bytes: one per value, padded to 4 per tensor (kernel 96, bias 16,
    # kernel 16, bias 1 -> 4), against 4 per value uncompressed.
    assert counter.calls == STEPS // 4
    assert counter.bytes == (96 + 16 + 16 + 4) * counter.calls
    levels = kd.compression.int8_levels(4)
    carried = False
    for before, after in zip(records[:-1], records[1:], strict=True):
        for i, anchor in enumerate(before["anchor"]):
            old_e = np.stack(before["residual"][i])
            new_e = np.stack(after["residual"][i])
            value = anchor - np.stack(before["weights"][i]) + old_e
            scale = np.abs(value).max() / levels
            sent = value - new_e  # what each replica's integers carry
            q = sent / scale
            np.testing.assert_allclose(q, np.round(q), atol=1e-3)
            assert np.abs(np.round(q)).max() <= levels
            assert np.abs(new_e).max() <= scale / 2 * (1 + 1e-5)
            # Averaging outer step: the anchor moves by the mean of what
            # was sent, i.e. the true mean pseudo-gradient plus the
            # residuals carried in, minus those carried out.
            np.testing.assert_allclose(
                after["anchor"][i], anchor - sent.mean(axis=0),
                rtol=1e-5, atol=1e-7)
            carried |= bool(np.abs(old_e).max() > 0)
    assert carried  # the second sync started with residuals to send


# ---------------------------------------------------------------------------
# DiLoCo: risky combinations warn before the first step.


class _FirstStep(keras.callbacks.Callback):
    def __init__(self, record):
        super().__init__()
        self.record = record
        self.warned_before = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.warned_before is None:
            self.warned_before = len(self.record)


@pytest.mark.parametrize("inner, risks", [
    (lambda: keras.optimizers.SGD(0.05, momentum=0.9),
     ["outer momentum 0.9 on an inner SGD with momentum 0.9",
      "only 4 outer step(s) (syncs) for outer momentum 0.9"]),
    (ADAM, ["only 4 outer step(s) (syncs) for outer momentum 0.9"]),
])
def test_risky_diloco_warns_before_step_1_saying_what_to_change(inner,
                                                                 risks):
    strategy = kd.MirroredStrategy(DEVICES)
    model = _build(strategy, inner)
    outer = keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)
    with pytest.warns(UserWarning) as record:
        first = _FirstStep(record)
        model.fit(_dataset(), epochs=2, verbose=0, callbacks=[
            kd.callbacks.LocalSGD(4, outer), first])
    texts = [str(w.message) for w in record
             if "kd.callbacks.LocalSGD" in str(w.message)]
    assert len(texts) == len(risks)
    for text, risk in zip(texts, risks, strict=True):
        assert risk in text
        assert "Use " in text  # says what to change
    assert first.warned_before == len(record)


@pytest.mark.parametrize("outer, inner, steps", [
    # The documented line: momentum 0.5 needs 20 outer steps.
    (keras.optimizers.SGD(0.7, momentum=0.5, nesterov=True),
     keras.optimizers.SGD(0.05, momentum=0.9), 20),
    # DiLoCo's own regime: inner AdamW, 100+ outer steps.
    (keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True),
     keras.optimizers.AdamW(1e-3), 100),
    (keras.optimizers.SGD(1.0), keras.optimizers.SGD(0.1, momentum=0.9), 1),
])
def test_safe_combinations_have_no_risk(outer, inner, steps):
    assert kd.callbacks.local_sgd.diloco_risks(outer, inner, steps) == []


def test_plain_averaging_never_warns():
    import warnings

    strategy = kd.MirroredStrategy(DEVICES)
    model = _build(strategy, lambda: keras.optimizers.SGD(0.05, momentum=0.9))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="kd.callbacks.LocalSGD")
        model.fit(_dataset(), epochs=1, verbose=0,
                  callbacks=[kd.callbacks.LocalSGD(4)])

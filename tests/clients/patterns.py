"""User code patterns run by the client tests, the way users write them.

Each pattern trains a small model on generated data under a strategy (None:
plain Keras on one device) and returns what a user compares: final weights,
`fit` history, `evaluate` results. Initial weights come from a fixed NumPy
generator, so every strategy starts from the same point.

Patterns marked `EXACT` must equal one-device training; the others (random
dropout masks, per-replica BatchNorm statistics) are compared across
workers only.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

import kerasdist as kd

N = 32
BATCH = 8
EPOCHS = 2
VOCAB = ["the", "cat", "dog", "sat", "ran", "on", "mat", "fast"]


def _init(model, seed=42):
    """Same random trainable weights under every strategy (statistics such
    as BatchNormalization's moving variance keep their initial values)."""
    rng = np.random.RandomState(seed)
    model.set_weights([
        rng.normal(0, 0.3, value.shape).astype(value.dtype)
        if variable.trainable and value.dtype.kind == "f" else value
        for variable, value in zip(model.weights, model.get_weights(),
                                   strict=True)])


def _xy(seed=0, n=N):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32")
    return x, y


def _result(model, history=None, evaluation=None, extra=None):
    out = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    for k, v in (history or {}).items():
        out[f"history_{k}"] = np.array(v)
    if isinstance(evaluation, dict):
        for k, v in evaluation.items():
            out[f"eval_{k}"] = np.array(v)
    out.update(extra or {})
    return out


# -- custom train_step patterns --------------------------------------------


class HandLossModel(keras.Model):
    """keras.io "customizing fit": a mean loss computed by hand, scaled."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = ops.mean(ops.square(y - self(x, training=True)))
            scaled = kd.scale_loss(loss)  # The one-line change.
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(
            zip(grads, self.trainable_variables, strict=True))
        return {"loss": loss}


class UnscaledHandLossModel(keras.Model):
    """The same step exactly as the keras.io guide writes it."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = ops.mean(ops.square(y - self(x, training=True)))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(
            zip(grads, self.trainable_variables, strict=True))
        return {"loss": loss}


def hand_loss(strategy, scale=True, learning_rate=0.1):
    x, y = _xy()
    with kd.strategies.scope_or_null(strategy):
        inp = keras.Input((4,))
        cls = HandLossModel if scale else UnscaledHandLossModel
        model = cls(inp, keras.layers.Dense(1)(inp))
        model.compile(keras.optimizers.SGD(learning_rate))
        _init(model)
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0,
                        shuffle=False).history
    return _result(model, extra={"first_loss": np.array(history["loss"][0])})


class VAE(keras.Model):
    """keras.io VAE example shape: reconstruction + KL, one optimizer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(4)   # mean (2) and log-var (2)
        self.decoder = keras.layers.Dense(4)
        self.total = keras.metrics.Mean(name="total_loss")
        self.kl = keras.metrics.Mean(name="kl_loss")

    def call(self, x):
        z_mean, _ = ops.split(self.encoder(x), 2, axis=-1)
        return self.decoder(z_mean)

    @property
    def metrics(self):
        return [self.total, self.kl]

    def train_step(self, data):
        x = data
        with tf.GradientTape() as tape:
            z_mean, z_log_var = ops.split(self.encoder(x), 2, axis=-1)
            # Deterministic "sample" so one device and N replicas compare.
            z = z_mean + ops.exp(0.5 * z_log_var) * 0.1
            reconstruction = ops.mean(ops.sum(ops.square(
                x - self.decoder(z)), axis=-1))
            kl = -0.5 * ops.mean(ops.sum(
                1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var),
                axis=-1))
            total = reconstruction + kl
            scaled = kd.scale_loss(total)  # inside the tape
        grads = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(
            zip(grads, self.trainable_weights, strict=True))
        self.total.update_state(total)
        self.kl.update_state(kl)
        return {m.name: m.result() for m in self.metrics}


def vae(strategy):
    x, _ = _xy(1)
    with kd.strategies.scope_or_null(strategy):
        model = VAE()
        model(np.zeros((1, 4), "float32"))
        model.compile(keras.optimizers.Adam(0.01))
        _init(model)
    history = model.fit(tf.data.Dataset.from_tensor_slices(x).batch(BATCH),
                        epochs=EPOCHS, verbose=0).history
    return _result(model, history)


class CallFreeGAN(keras.Model):
    """keras.io GAN example shape: two optimizers, a `keras.losses.Loss`,
    and no `call()` (issue 23.5)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.discriminator = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(1)])
        self.generator = keras.Sequential(
            [keras.Input((2,)), keras.layers.Dense(4)])

    def compile(self, d_optimizer, g_optimizer, loss_fn, build=True):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn
        if build:  # The line the keras.io example needs under a strategy.
            d_optimizer.build(self.discriminator.trainable_variables)
            g_optimizer.build(self.generator.trainable_variables)

    def train_step(self, data):
        real = data
        batch = ops.shape(real)[0]
        # Fixed latent codes (not random) so runs compare exactly.
        noise = ops.tile(ops.reshape(ops.arange(2, dtype="float32") / 2,
                                     (1, 2)), (batch, 1))
        fake = self.generator(noise)
        images = ops.concatenate([fake, real], axis=0)
        labels = ops.concatenate(
            [ops.ones((batch, 1)), ops.zeros((batch, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(images))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(
            zip(grads, self.discriminator.trainable_weights, strict=True))
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(ops.zeros((batch, 1)),
                                  self.discriminator(self.generator(noise)))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(
            zip(grads, self.generator.trainable_weights, strict=True))
        return {"d_loss": d_loss, "g_loss": g_loss}


class GAN(CallFreeGAN):
    """The GAN with a `call()`, as the project's first test GAN had."""

    def call(self, images):
        return self.discriminator(images)


class ReportingGAN(CallFreeGAN):
    """The GAN returning its losses as one device reports them."""

    def train_step(self, data):
        logs = super().train_step(data)
        return {k: kd.losses.unscale_loss(v) for k, v in logs.items()}


def gan_history(strategy, model_class):
    """The GAN's `fit` history (issue 23.6: its Loss values are scaled)."""
    x, _ = _xy(2)
    with kd.strategies.scope_or_null(strategy):
        model = model_class()
        model.compile(keras.optimizers.Adam(0.01), keras.optimizers.SGD(0.1),
                      keras.losses.BinaryCrossentropy(from_logits=True))
        _init(model)
    history = model.fit(tf.data.Dataset.from_tensor_slices(x).batch(BATCH),
                        epochs=EPOCHS, verbose=0)
    return _result(model, history.history)


def gan(strategy, build=True, with_call=True):
    x, _ = _xy(2)
    with kd.strategies.scope_or_null(strategy):
        model = GAN() if with_call else CallFreeGAN()
        # A keras.losses.Loss reduces per-example values itself, so Keras
        # scales it for the replicas: this step needs no change.
        model.compile(keras.optimizers.Adam(0.01), keras.optimizers.SGD(0.1),
                      keras.losses.BinaryCrossentropy(from_logits=True),
                      build=build)
        _init(model)
    model.fit(tf.data.Dataset.from_tensor_slices(x).batch(BATCH),
              epochs=EPOCHS, verbose=0)
    return _result(model)


# -- custom loop ------------------------------------------------------------


def custom_loop(strategy):
    """TF's "Custom training with tf.distribute.Strategy" tutorial shape."""
    strategy = strategy or tf.distribute.get_strategy()
    x, y = _xy(3)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                                  keras.layers.Dense(1)])
        _init(model)
        optimizer = keras.optimizers.SGD(0.05)
        # The line the tutorial lacks for a Keras 3 optimizer:
        optimizer.build(model.trainable_variables)
    loss_object = keras.losses.MeanSquaredError(reduction=None)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH))

    def step(inputs):
        features, labels = inputs
        with tf.GradientTape() as tape:
            per_example = loss_object(labels, model(features, training=True))
            loss = tf.nn.compute_average_loss(per_example,
                                              global_batch_size=BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def train_step(inputs):
        losses = strategy.run(step, args=(inputs,))
        return strategy.reduce("SUM", losses, axis=None)

    epoch_losses = []
    for _ in range(EPOCHS):
        total = 0.0
        for batch in dataset:
            total += float(train_step(batch))
        epoch_losses.append(total)
    return _result(model, extra={"epoch_losses": np.array(epoch_losses)})


def unbuilt_optimizer_loop(strategy):
    """The tutorial as written: optimizer created in scope, never built."""
    x, y = _xy(3)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.05)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH))

    def step(inputs):
        features, labels = inputs
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(
                ops.square(labels - model(features))[:, 0],
                global_batch_size=BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def train_step(inputs):
        return strategy.reduce("SUM", strategy.run(step, args=(inputs,)),
                               axis=None)

    for batch in dataset:
        train_step(batch)


# -- compiled models ---------------------------------------------------------


def bn_dropout(strategy):
    """BatchNormalization + Dropout (per-replica statistics: not EXACT)."""
    x, y = _xy(4)
    with kd.strategies.scope_or_null(strategy):
        model = keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(8),
            keras.layers.BatchNormalization(), keras.layers.Dropout(0.2),
            keras.layers.Dense(1)])
        model.compile(keras.optimizers.Adam(0.01), "mse")
        _init(model)
    # Dropout draws differ from run to run, so two epochs (8 steps) can end
    # with a loss no lower than the first; 8 epochs always make progress.
    return fit_evaluate(model, x, y, epochs=8)


def fit_evaluate(model, x, y, epochs, batch_size=BATCH, result_of=None):
    """`fit` without shuffling, `evaluate` on the same data, the results."""
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                        verbose=0, shuffle=False).history
    evaluation = model.evaluate(x, y, batch_size=batch_size, verbose=0,
                                return_dict=True)
    return _result(result_of or model, history, evaluation)


def multi_io(strategy):
    """Functional model, two inputs (dict), two outputs, two losses."""
    rng = np.random.RandomState(5)
    a = rng.normal(size=(N, 3)).astype("float32")
    b = rng.normal(size=(N, 2)).astype("float32")
    y_cls = (a[:, 0] > 0).astype("int64")
    y_reg = (a.sum(1, keepdims=True) - b[:, :1]).astype("float32")
    with kd.strategies.scope_or_null(strategy):
        ia = keras.Input((3,), name="a")
        ib = keras.Input((2,), name="b")
        h = keras.layers.Dense(6, activation="tanh")(
            keras.layers.Concatenate()([ia, ib]))
        model = keras.Model(
            {"a": ia, "b": ib},
            {"cls": keras.layers.Dense(2, name="cls")(h),
             "reg": keras.layers.Dense(1, name="reg")(h)})
        model.compile(
            keras.optimizers.SGD(0.1),
            {"cls": keras.losses.SparseCategoricalCrossentropy(
                from_logits=True), "reg": "mse"},
            loss_weights={"cls": 1.0, "reg": 0.5},
            metrics={"cls": ["accuracy"], "reg": ["mae"]})
        _init(model)
    data = ({"a": a, "b": b}, {"cls": y_cls, "reg": y_reg})
    history = model.fit(*data, batch_size=BATCH, epochs=EPOCHS, verbose=0,
                        shuffle=False).history
    evaluation = model.evaluate(*data, batch_size=BATCH, verbose=0,
                                return_dict=True)
    return _result(model, history, evaluation)


def _sentences(n=N, seed=6):
    rng = np.random.RandomState(seed)
    words = rng.choice(VOCAB, size=(n, 4))
    texts = np.array([" ".join(w) for w in words])
    labels = np.array([("cat" in t) * 1 for t in texts], dtype="int64")
    return texts, labels


def text_classifier(strategy):
    """keras.io text classification: TextVectorization in the model."""
    texts, labels = _sentences()
    with kd.strategies.scope_or_null(strategy):
        vectorize = keras.layers.TextVectorization(
            vocabulary=VOCAB, output_mode="int", output_sequence_length=5)
        inp = keras.Input((), dtype="string")
        h = keras.layers.Embedding(len(VOCAB) + 2, 4)(vectorize(inp))
        h = keras.layers.GlobalAveragePooling1D()(h)
        model = keras.Model(inp, keras.layers.Dense(2)(h))
        model.compile(keras.optimizers.Adam(0.05),
                      keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True), metrics=["accuracy"])
        _init(model)
    ds = tf.data.Dataset.from_tensor_slices((texts, labels)).batch(BATCH)
    history = model.fit(ds, epochs=EPOCHS, verbose=0).history
    evaluation = model.evaluate(ds, verbose=0, return_dict=True)
    # And NumPy string arrays, as `fit(x, y, batch_size=...)` users pass.
    numpy_eval = model.evaluate(texts.astype(object), labels,
                                batch_size=BATCH, verbose=0,
                                return_dict=True)
    return _result(model, history, evaluation, {
        "numpy_eval_loss": np.array(numpy_eval["loss"])})


def bool_input(strategy):
    """A boolean mask input (as keras_hub's `padding_mask`)."""
    x, y = _xy(7)
    mask = x[:, :1] > 0
    with kd.strategies.scope_or_null(strategy):
        xi = keras.Input((4,))
        mi = keras.Input((1,), dtype="bool")
        h = keras.layers.Dense(4)(xi)
        h = ops.where(mi, h, ops.zeros_like(h))
        model = keras.Model([xi, mi], keras.layers.Dense(1)(h))
        model.compile(keras.optimizers.SGD(0.1), "mse")
        _init(model)
    ds = tf.data.Dataset.from_tensor_slices(((x, mask), y)).batch(BATCH)
    history = model.fit(ds, epochs=EPOCHS, verbose=0).history
    evaluation = model.evaluate(ds, verbose=0, return_dict=True)
    return _result(model, history, evaluation)


def keras_hub_classifier(strategy):
    """keras_hub BertTextClassifier, tiny random backbone, no download."""
    import keras_hub

    texts, labels = _sentences(seed=8)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB]
    with kd.strategies.scope_or_null(strategy):
        tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab)
        preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
            tokenizer, sequence_length=8)
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=len(vocab), num_layers=1, num_heads=2,
            hidden_dim=8, intermediate_dim=16, max_sequence_length=8,
            dropout=0.0)
        model = keras_hub.models.BertTextClassifier(
            backbone, num_classes=2, preprocessor=preprocessor, dropout=0.0)
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True), metrics=["accuracy"])
        _init(model)
    ds = tf.data.Dataset.from_tensor_slices((texts, labels)).batch(BATCH)
    history = model.fit(ds, epochs=EPOCHS, verbose=0).history
    evaluation = model.evaluate(ds, verbose=0, return_dict=True)
    return _result(model, history, evaluation)


class PositionEmbedding(keras.layers.Layer):
    """keras.io `TokenAndPositionEmbedding`'s position half: `ops.arange`
    lookups, so every replica's sparse gradient touches every index."""

    def __init__(self, length, dim, **kwargs):
        super().__init__(**kwargs)
        self.length = length
        self.positions = keras.layers.Embedding(length, dim)

    def call(self, x):
        return x + self.positions(ops.arange(0, self.length))


def position_embedding_adam(strategy, epochs=EPOCHS):
    """Adam on a position embedding (issue 23.4: the replicas' sparse
    gradients must be merged before Adam squares them)."""
    rng = np.random.RandomState(3)
    x = rng.normal(size=(N, 6, 4)).astype("float32")
    y = rng.normal(size=(N, 1)).astype("float32")
    with kd.strategies.scope_or_null(strategy):
        model = keras.Sequential([keras.Input((6, 4)), PositionEmbedding(6, 4),
                                  keras.layers.Flatten(),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.Adam(0.05), "mse")
        _init(model)
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0,
                        shuffle=False)
    return _result(model, history.history)


class RandomDraws(keras.Model):
    """Dropout in the model and latents drawn in `train_step` (issue 23.3).

    Each replica keeps its last draws in variables with
    `aggregation="none"` (one copy per replica, never all-reduced), so a
    test can read what every replica drew.
    """

    def __init__(self):
        super().__init__()
        self.dropout = keras.layers.Dropout(0.5, seed=3)
        self.dense = keras.layers.Dense(1)
        self.latents = keras.random.SeedGenerator(5)
        self.z = self.add_weight(shape=(4,), initializer="zeros",
                                 trainable=False, aggregation="none",
                                 name="z")
        self.mask = self.add_weight(shape=(16,), initializer="zeros",
                                    trainable=False, aggregation="none",
                                    name="mask")

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x, training=False):
        return self.dense(self.dropout(x, training=training))

    def train_step(self, data):
        self.z.assign(keras.random.normal((4,), seed=self.latents))
        self.mask.assign(self.dropout(ops.ones((16,)), training=True))
        return super().train_step(data)


def _local_values(strategy, variable):
    if strategy is None:
        return [np.asarray(variable.numpy())]
    return [np.asarray(v.numpy())
            for v in strategy.experimental_local_results(variable.value)]


def random_streams(strategy, epochs=1, callbacks=None):
    """What each local replica drew at the last step, and the weights."""
    x, y = _xy(7)
    with kd.strategies.scope_or_null(strategy):
        model = RandomDraws()
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.build((None, 4))
        _init(model)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
              epochs=epochs, verbose=0, callbacks=callbacks)
    extra = {}
    for name in ("z", "mask"):
        for i, value in enumerate(_local_values(strategy,
                                                getattr(model, name))):
            extra[f"{name}{i}"] = value
    return {**{f"w{i}": np.asarray(w) for i, w in
               enumerate(model.dense.get_weights())}, **extra}


EXACT = {
    "position_embedding_adam": position_embedding_adam,
    "hand_loss": hand_loss,
    "vae": vae,
    "gan": gan,
    "gan_without_call": lambda strategy: gan(strategy, with_call=False),
    "gan_reported_history": lambda strategy: gan_history(strategy,
                                                         ReportingGAN),
    "custom_loop": custom_loop,
    "multi_io": multi_io,
    "text_classifier": text_classifier,
    "bool_input": bool_input,
    "keras_hub_classifier": keras_hub_classifier,
}
WORKERS_ONLY = {"bn_dropout": bn_dropout}


def assert_same(actual, expected, rtol=1e-4, atol=1e-5):
    assert sorted(actual) == sorted(expected)
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol,
                                   atol=atol, err_msg=k)


# -- uneven batches, XLA, file callbacks, the keras.io guide ----------------

# (examples, batch_size, how): training data that must be refused, before
# the first step, with more than one replica.
UNEVEN = {
    "fit_batch_1": (12, 1, "fit"),
    "fit_batch_3": (12, 3, "fit"),
    "fit_partial_1": (9, 4, "fit"),
    "fit_tfdata_batch_3": (12, 3, "fit_tfdata"),
    "fit_tfdata_partial_1": (9, 4, "fit_tfdata"),
}
# Must give what one device gives. Evaluation, validation and predict data
# may split unevenly (issue 23.1, 23.2): Keras weights each replica's
# metrics by its examples and gathers every predicted row in order.
EVEN = {
    "fit_batch_4": (12, 4, "fit"),
    "fit_partial_2": (10, 4, "fit"),
    "fit_tfdata_partial_2": (10, 4, "fit_tfdata"),
    "predict_partial_2": (10, 4, "predict"),
    "evaluate_batch_3": (12, 3, "evaluate"),
    "evaluate_partial_1": (9, 4, "evaluate"),
    "predict_batch_3": (12, 3, "predict"),
    "predict_one_row": (1, 32, "predict"),
    "predict_tfdata_partial_1": (9, 4, "predict_tfdata"),
    # keras.io timeseries: validation_split leaves 3 validation rows with
    # batch_size=4 (12 training rows split evenly).
    "fit_validation_split": (15, 4, "fit_validation"),
    "fit_tfdata_validation": (9, 4, "fit_tfdata_validation"),
}


def _uneven_model(strategy):
    with kd.strategies.scope_or_null(strategy):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
        model.compile(keras.optimizers.SGD(0.1), "mse", metrics=["mae"])
        _init(model)
    return model


def uneven(strategy, case):
    n, batch, how = {**UNEVEN, **EVEN}[case]
    rng = np.random.RandomState(9)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.normal(size=(n, 3)).astype("float32")
    model = _uneven_model(strategy)
    extra = {}
    if how == "fit":
        model.fit(x, y, batch_size=batch, epochs=2, verbose=0,
                  shuffle=False)
        extra["eval"] = np.array(model.evaluate(x, y, batch_size=batch,
                                                verbose=0))
    elif how == "fit_tfdata":
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
        model.fit(ds, epochs=2, verbose=0)
    elif how == "fit_validation":
        history = model.fit(x, y, batch_size=batch, epochs=2, verbose=0,
                            shuffle=False, validation_split=0.2)
        return _result(model, history.history)
    elif how == "fit_tfdata_validation":
        train = tf.data.Dataset.from_tensor_slices((x, y)).take(8)
        val = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
        history = model.fit(train.batch(batch), validation_data=val,
                            epochs=2, verbose=0)
        extra["eval"] = np.array(model.evaluate(val, verbose=0))
        return _result(model, history.history, extra=extra)
    elif how == "evaluate":
        extra["eval"] = np.array(model.evaluate(x, y, batch_size=batch,
                                                verbose=0))
    elif how == "predict_tfdata":
        extra["predict"] = model.predict(
            tf.data.Dataset.from_tensor_slices(x).batch(batch), verbose=0)
    else:
        extra["predict"] = model.predict(x, batch_size=batch, verbose=0)
    return _result(model, extra=extra)


def jit(strategy):
    x, y = _xy(10)
    with kd.strategies.scope_or_null(strategy):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
        _init(model)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return _result(model)


def _small_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    _init(model)
    return model


def file_callbacks(strategy, directory):
    """ModelCheckpoint and CSVLogger as users write them.

    (TensorBoard is adapted the same way but needs the tensorboard package,
    which is not a test dependency.)
    """
    x, y = _xy(11)
    os.makedirs(directory, exist_ok=True)  # CSVLogger does not create it.
    with kd.strategies.scope_or_null(strategy):
        model = _small_model()
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False,
              callbacks=[
                  keras.callbacks.ModelCheckpoint(
                      os.path.join(directory, "ckpt-{epoch}.keras")),
                  keras.callbacks.CSVLogger(
                      os.path.join(directory, "log.csv")),
              ])
    return _result(model)


def keras_backup(strategy, directory):
    x, y = _xy(12)
    with kd.strategies.scope_or_null(strategy):
        model = _small_model()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(directory)])


def run_training(make_strategy, checkpoint_dir, epochs=1):
    """keras.io "Multi-GPU distributed training with TensorFlow", fault
    tolerance part: make or restore the model, fit with ModelCheckpoint."""
    x, y = _xy(13)
    strategy = make_strategy()
    with strategy.scope():
        checkpoints = [os.path.join(checkpoint_dir, name)
                       for name in os.listdir(checkpoint_dir)]
        if checkpoints:
            model = keras.models.load_model(
                max(checkpoints, key=os.path.getctime))
        else:
            model = _small_model()
    start = [np.asarray(w) for w in model.get_weights()]
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0,
              shuffle=False, callbacks=[keras.callbacks.ModelCheckpoint(
                  os.path.join(checkpoint_dir, "ckpt-{epoch}.keras"))])
    out = _result(model)
    out.update({f"start{i}": w for i, w in enumerate(start)})
    out["restored"] = np.array(bool(checkpoints))
    return out


def shuffled_fit(strategy, seed, callbacks=None):
    """TF's multi-worker tutorial input: `shuffle(n)`, seeded or not."""
    x, y = _xy(14)
    with kd.strategies.scope_or_null(strategy):
        model = _small_model()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(N, seed=seed)
    model.fit(ds.batch(BATCH), epochs=1, verbose=0, callbacks=callbacks)

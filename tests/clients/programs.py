"""Ten keras.io / TensorFlow programs, kept in their published structure.

Issue 23 tried these as a new user would. Each runs on generated data,
small enough for CI, under a strategy (None: one device) and returns what a
user compares: weights, `fit` history, `evaluate` results. Two of the ten
are in `patterns.py` already and run there on 2 virtual CPUs and 2 workers
against one device: the custom training loop (`patterns.custom_loop`) and
the keras_hub BertTextClassifier with a tiny random backbone
(`patterns.keras_hub_classifier`).

`PROGRAMS` maps each name to `(fn, tolerance)`. A tolerance is either
`Exact(rtol, atol)`: every result equals one device's within it, or
`Close(loss_rtol)`: the program cannot equal one device weight by weight
(it draws random numbers: Dropout, augmentation, latents; keeps
per-replica BatchNormalization statistics; couples the rows of a batch; or
shuffles, which a strategy's rewrite of the dataset orders differently);
its last loss is within `loss_rtol` of one device's, and 2 workers equal 2
virtual CPUs (the same global replica ids draw the same numbers).
"""

import dataclasses
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops
from patterns import _init, _result, fit_evaluate

import kerasdist as kd

BATCH = 16


@dataclasses.dataclass(frozen=True)
class Exact:
    rtol: float = 1e-4
    atol: float = 1e-5


@dataclasses.dataclass(frozen=True)
class Close:
    loss_rtol: float


def run(name, strategy):
    """Runs one program with Python/NumPy/TF seeded as a script would be
    (`keras.utils.set_random_seed`), so the unseeded layers of keras.io's
    code (`layers.Dropout(0.1)`) start from the same seed in every
    process."""
    keras.utils.set_random_seed(0)
    return PROGRAMS[name][0](strategy)


def _trainable_result(model, history, evaluation=None):
    """Trainable weights only: BatchNormalization's moving statistics are
    per replica (never all-reduced) and differ between workers."""
    out = _result(model, history, evaluation)
    for key in [k for k in out if k.startswith("w")]:
        del out[key]
    out.update({f"t{i}": np.asarray(v.numpy())
                for i, v in enumerate(model.trainable_weights)})
    return out


def _classes(n=64, shape=(8,), classes=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = (x.reshape(n, -1)[:, :classes].argmax(-1)).astype("int64")
    return x, y


# -- knowledge distillation (keras.io, both versions) ------------------------


def _teacher_student():
    teacher = keras.Sequential([keras.Input((8,)), layers.Dense(16, "relu"),
                                layers.Dense(3)], name="teacher")
    student = keras.Sequential([keras.Input((8,)), layers.Dense(4, "relu"),
                                layers.Dense(3)], name="student")
    return teacher, student


class Distiller(keras.Model):
    """keras.io knowledge distillation, current version (`compute_loss`)."""

    def __init__(self, student, teacher):
        super().__init__()
        self.teacher = teacher
        self.student = student

    def compile(self, optimizer, metrics, student_loss_fn,
                distillation_loss_fn, alpha=0.1, temperature=3):
        super().compile(optimizer=optimizer, metrics=metrics)
        self.student_loss_fn = student_loss_fn
        self.distillation_loss_fn = distillation_loss_fn
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     allow_empty=False):
        teacher_pred = self.teacher(x, training=False)
        student_loss = self.student_loss_fn(y, y_pred)
        distillation_loss = self.distillation_loss_fn(
            ops.softmax(teacher_pred / self.temperature, axis=1),
            ops.softmax(y_pred / self.temperature, axis=1),
        ) * (self.temperature**2)
        return (self.alpha * student_loss
                + (1 - self.alpha) * distillation_loss)

    def call(self, x):
        return self.student(x)


class OldDistiller(Distiller):
    """The earlier keras.io version: its own `train_step`/`test_step`."""

    def train_step(self, data):
        x, y = data
        teacher_predictions = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            student_predictions = self.student(x, training=True)
            student_loss = self.student_loss_fn(y, student_predictions)
            distillation_loss = self.distillation_loss_fn(
                tf.nn.softmax(teacher_predictions / self.temperature, axis=1),
                tf.nn.softmax(student_predictions / self.temperature, axis=1),
            ) * self.temperature**2
            loss = (self.alpha * student_loss
                    + (1 - self.alpha) * distillation_loss)
        gradients = tape.gradient(loss, self.student.trainable_variables)
        self.optimizer.apply_gradients(
            zip(gradients, self.student.trainable_variables, strict=True))
        return self._metrics_of(y, student_predictions)

    def test_step(self, data):
        x, y = data
        y_prediction = self.student(x, training=False)
        return self._metrics_of(y, y_prediction)

    def _metrics_of(self, y, y_pred):
        # keras.io: `self.compiled_metrics.update_state(y, y_pred)` (Keras 2).
        for metric in self.metrics:
            if metric.name != "loss":
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics
                if m.name != "loss"}


def _distill(strategy, distiller_class):
    x, y = _classes(seed=1)
    with kd.strategies.scope_or_null(strategy):
        teacher, student = _teacher_student()
        _init(teacher, seed=1)
        _init(student, seed=2)
        teacher.compile(keras.optimizers.Adam(0.01),
                        keras.losses.SparseCategoricalCrossentropy(
                            from_logits=True),
                        metrics=[keras.metrics.SparseCategoricalAccuracy()])
    teacher.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
    with kd.strategies.scope_or_null(strategy):
        distiller = distiller_class(student=student, teacher=teacher)
        distiller.compile(
            optimizer=keras.optimizers.Adam(0.01),
            metrics=[keras.metrics.SparseCategoricalAccuracy()],
            student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True),
            distillation_loss_fn=keras.losses.KLDivergence(),
            alpha=0.1, temperature=10)
    return fit_evaluate(distiller, x, y, epochs=2, batch_size=BATCH,
                        result_of=student)


def distillation(strategy):
    return _distill(strategy, Distiller)


def distillation_train_step(strategy):
    return _distill(strategy, OldDistiller)


# -- collaborative filtering (keras.io, RecommenderNet) ----------------------


class RecommenderNet(keras.Model):
    def __init__(self, num_users, num_movies, embedding_size, **kwargs):
        super().__init__(**kwargs)
        self.user_embedding = layers.Embedding(
            num_users, embedding_size, embeddings_initializer="he_normal",
            embeddings_regularizer=keras.regularizers.l2(1e-6))
        self.user_bias = layers.Embedding(num_users, 1)
        self.movie_embedding = layers.Embedding(
            num_movies, embedding_size, embeddings_initializer="he_normal",
            embeddings_regularizer=keras.regularizers.l2(1e-6))
        self.movie_bias = layers.Embedding(num_movies, 1)

    def call(self, inputs):
        user_vector = self.user_embedding(inputs[:, 0])
        user_bias = self.user_bias(inputs[:, 0])
        movie_vector = self.movie_embedding(inputs[:, 1])
        movie_bias = self.movie_bias(inputs[:, 1])
        dot_user_movie = ops.tensordot(user_vector, movie_vector, 2)
        x = dot_user_movie + user_bias + movie_bias
        return ops.nn.sigmoid(x)


def collaborative_filtering(strategy):
    rng = np.random.RandomState(2)
    x = np.stack([rng.randint(0, 10, 96), rng.randint(0, 12, 96)], 1)
    y = rng.uniform(size=(96, 1)).astype("float32")
    with kd.strategies.scope_or_null(strategy):
        model = RecommenderNet(10, 12, 4)
        model.compile(loss=keras.losses.BinaryCrossentropy(),
                      optimizer=keras.optimizers.Adam(learning_rate=0.01))
        model(x[:1])  # Builds the layers, for _init.
        _init(model)
    history = model.fit(x=x, y=y, batch_size=BATCH, epochs=2, verbose=0,
                        shuffle=False, validation_data=(x[:40], y[:40]))
    return _result(model, history.history)


# -- Transformer text classification (keras.io) ------------------------------


class TransformerBlock(layers.Layer):
    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads=num_heads,
                                             key_dim=embed_dim)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"),
                                     layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size,
                                          output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen,
                                        output_dim=embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        return self.token_emb(x) + self.pos_emb(positions)


def transformer_classification(strategy):
    vocab_size, maxlen, embed_dim = 20, 10, 8
    rng = np.random.RandomState(4)
    x = rng.randint(0, vocab_size, (64, maxlen))
    y = (x[:, 0] > vocab_size // 2).astype("int64")
    with kd.strategies.scope_or_null(strategy):
        inputs = layers.Input(shape=(maxlen,))
        x_ = TokenAndPositionEmbedding(maxlen, vocab_size, embed_dim)(inputs)
        x_ = TransformerBlock(embed_dim, 2, 8)(x_)
        x_ = layers.GlobalAveragePooling1D()(x_)
        x_ = layers.Dropout(0.1)(x_)
        x_ = layers.Dense(8, activation="relu")(x_)
        x_ = layers.Dropout(0.1)(x_)
        outputs = layers.Dense(2, activation="softmax")(x_)
        model = keras.Model(inputs=inputs, outputs=outputs)
        model.compile(optimizer="adam",
                      loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        _init(model)
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                        shuffle=False, validation_data=(x[:24], y[:24]))
    return _result(model, history.history)


# -- image classification from scratch (augmentation in the model) ----------


def image_classification(strategy):
    x, y = _classes(n=48, shape=(8, 8, 3), classes=2, seed=5)
    with kd.strategies.scope_or_null(strategy):
        data_augmentation = keras.Sequential(
            [layers.RandomFlip("horizontal", seed=1),
             layers.RandomRotation(0.1, seed=2)])
        inputs = keras.Input(shape=(8, 8, 3))
        h = data_augmentation(inputs)
        h = layers.Rescaling(1.0 / 2)(h)
        h = layers.Conv2D(8, 3, strides=2, padding="same")(h)
        h = layers.BatchNormalization()(h)
        h = layers.Activation("relu")(h)
        h = layers.GlobalAveragePooling2D()(h)
        h = layers.Dropout(0.25)(h)
        outputs = layers.Dense(1, activation=None)(h)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.Adam(3e-3),
                      loss=keras.losses.BinaryCrossentropy(from_logits=True),
                      metrics=[keras.metrics.BinaryAccuracy(name="acc")])
        _init(model)
    history = model.fit(x, y.astype("float32"), batch_size=BATCH, epochs=2,
                        verbose=0, shuffle=False,
                        validation_data=(x[:16], y[:16].astype("float32")))
    return _trainable_result(model, history.history)


# -- timeseries classification from scratch (three callbacks) ---------------


def timeseries_classification(strategy):
    rng = np.random.RandomState(6)
    x = rng.normal(size=(90, 20, 1)).astype("float32")
    y = (x[:, :5, 0].mean(1) > 0).astype("int64")
    with kd.strategies.scope_or_null(strategy):
        input_layer = keras.layers.Input((20, 1))
        h = input_layer
        for _ in range(2):
            h = keras.layers.Conv1D(filters=8, kernel_size=3,
                                    padding="same")(h)
            h = keras.layers.BatchNormalization()(h)
            h = keras.layers.ReLU()(h)
        gap = keras.layers.GlobalAveragePooling1D()(h)
        output_layer = keras.layers.Dense(2, activation="softmax")(gap)
        model = keras.models.Model(inputs=input_layer, outputs=output_layer)
        model.compile(optimizer="adam",
                      loss="sparse_categorical_crossentropy",
                      metrics=["sparse_categorical_accuracy"])
        _init(model)
    directory = tempfile.mkdtemp(prefix="kd-timeseries-")
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "best_model.keras"),
            save_best_only=True, monitor="val_loss"),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                          patience=1, min_lr=0.0001),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=2,
                                      verbose=0),
    ]
    # 90 rows, validation_split=0.2: 18 validation rows, an uneven split.
    history = model.fit(x, y, batch_size=BATCH, epochs=3, callbacks=callbacks,
                        validation_split=0.2, verbose=0)
    evaluation = model.evaluate(x, y, batch_size=BATCH, verbose=0,
                                return_dict=True)
    return _trainable_result(model, history.history, evaluation)


# -- mixed precision (TF guide) ----------------------------------------------


def mixed_precision(strategy):
    x, y = _classes(n=64, shape=(16,), classes=4, seed=9)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with kd.strategies.scope_or_null(strategy):
            inputs = keras.Input(shape=(16,), name="digits")
            h = layers.Dense(32, activation="relu", name="dense_1")(inputs)
            h = layers.Dense(32, activation="relu", name="dense_2")(h)
            h = layers.Dense(4, name="dense_logits")(h)
            outputs = layers.Activation("softmax", dtype="float32",
                                        name="predictions")(h)
            model = keras.Model(inputs=inputs, outputs=outputs)
            model.compile(loss="sparse_categorical_crossentropy",
                          optimizer=keras.optimizers.RMSprop(1e-3),
                          metrics=["accuracy"])
            _init(model)
        history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                            shuffle=False, validation_split=0.25)
        evaluation = model.evaluate(x, y, batch_size=BATCH, verbose=0,
                                    return_dict=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return _result(model, history.history, evaluation)


# -- the GAN of "Customizing what happens in fit()" ---------------------------


class GAN(keras.Model):
    def __init__(self, discriminator, generator, latent_dim):
        super().__init__()
        self.discriminator = discriminator
        self.generator = generator
        self.latent_dim = latent_dim
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.seed_generator = keras.random.SeedGenerator(1337)

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn
        # The two lines a strategy needs (docs/guide/custom_loops.md).
        d_optimizer.build(self.discriminator.trainable_variables)
        g_optimizer.build(self.generator.trainable_variables)

    def train_step(self, real_images):
        batch_size = ops.shape(real_images)[0]
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator)
        generated_images = self.generator(random_latent_vectors)
        combined_images = ops.concatenate([generated_images, real_images],
                                          axis=0)
        labels = ops.concatenate(
            [ops.ones((batch_size, 1)), ops.zeros((batch_size, 1))], axis=0)
        with tf.GradientTape() as tape:
            predictions = self.discriminator(combined_images)
            d_loss = self.loss_fn(labels, predictions)
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(
            zip(grads, self.discriminator.trainable_weights, strict=True))
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator)
        misleading_labels = ops.zeros((batch_size, 1))
        with tf.GradientTape() as tape:
            predictions = self.discriminator(
                self.generator(random_latent_vectors))
            g_loss = self.loss_fn(misleading_labels, predictions)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(
            zip(grads, self.generator.trainable_weights, strict=True))
        # kd.losses.unscale_loss: the losses as one device reports them.
        self.d_loss_tracker.update_state(kd.losses.unscale_loss(d_loss))
        self.g_loss_tracker.update_state(kd.losses.unscale_loss(g_loss))
        return {"d_loss": self.d_loss_tracker.result(),
                "g_loss": self.g_loss_tracker.result()}


def gan(strategy):
    x, _ = _classes(n=64, shape=(6,), seed=11)
    latent_dim = 3
    with kd.strategies.scope_or_null(strategy):
        discriminator = keras.Sequential(
            [keras.Input((6,)), layers.Dense(8), layers.LeakyReLU(0.2),
             layers.Dense(1)], name="discriminator")
        generator = keras.Sequential(
            [keras.Input((latent_dim,)), layers.Dense(8),
             layers.LeakyReLU(0.2), layers.Dense(6)], name="generator")
        model = GAN(discriminator=discriminator, generator=generator,
                    latent_dim=latent_dim)
        model.compile(
            d_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
            g_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
            loss_fn=keras.losses.BinaryCrossentropy(from_logits=True))
        _init(model)
    history = model.fit(
        tf.data.Dataset.from_tensor_slices(x).batch(BATCH), epochs=2,
        verbose=0)
    return _result(model, history.history)


# -- TensorFlow's multi-worker tutorial (Keras `fit`) ------------------------


def mnist_dataset(batch_size):
    rng = np.random.RandomState(12)
    x_train = rng.randint(0, 256, (256, 28, 28)).astype("float32")
    y_train = rng.randint(0, 10, 256)
    x_train = x_train / np.float32(255)
    # The tutorial's `shuffle(60000)`, plus the one line kerasdist asks for
    # on several workers: a seed (issue 23.7).
    return tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(
        256, seed=1).repeat().batch(batch_size)


def build_and_compile_cnn_model():
    model = keras.Sequential([
        keras.layers.InputLayer(shape=(28, 28)),
        keras.layers.Reshape(target_shape=(28, 28, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=keras.optimizers.SGD(learning_rate=0.001),
        metrics=["accuracy"])
    return model


def tf_multi_worker_tutorial(strategy):
    per_worker_batch_size = 16
    num_workers = 2  # The tutorial reads it from TF_CONFIG.
    # One device and 2 virtual CPUs train on the same global batch.
    global_batch_size = per_worker_batch_size * num_workers
    dataset = mnist_dataset(global_batch_size)
    with kd.strategies.scope_or_null(strategy):
        model = build_and_compile_cnn_model()
        _init(model)
    history = model.fit(dataset, epochs=2, steps_per_epoch=4, verbose=0)
    return _result(model, history.history)


PROGRAMS = {
    "distillation": (distillation, Exact()),
    "distillation_train_step": (distillation_train_step, Exact()),
    # keras.io's `ops.tensordot(user_vector, movie_vector, 2)` sums over
    # the whole batch: each replica adds its own half-batch sum.
    "collaborative_filtering": (collaborative_filtering, Close(0.05)),
    "transformer_classification": (transformer_classification, Close(0.1)),
    "image_classification": (image_classification, Close(0.1)),
    "timeseries_classification": (timeseries_classification, Close(0.1)),
    "mixed_precision": (mixed_precision, Exact(rtol=2e-2, atol=2e-3)),
    "gan": (gan, Close(0.1)),
    # Without the shuffle it is exact (max |diff| 6e-8); a seeded shuffle
    # distributed by the strategy reads another order than on one device
    # (the same on every worker).
    "tf_multi_worker_tutorial": (tf_multi_worker_tutorial, Close(0.1)),
}

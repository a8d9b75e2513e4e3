"""Training cases shared by the in-process and multi-worker parity tests.

Each case trains a small model for two epochs on generated data and returns
what a user would compare: final weights, the fit history, `evaluate` and
`predict` results. Initial weights come from a fixed NumPy generator so every
strategy starts from the same point.
"""

import keras
import numpy as np
import tensorflow as tf

import kerasdist as kd

GLOBAL_BATCH = 16
NUM_EXAMPLES = 128
EPOCHS = 2
CASES = ("sgd_tuple_sample_weight", "adam_dict", "adam_tuple_multi_output")


def _data(case):
    rng = np.random.RandomState(0)
    x = rng.normal(size=(NUM_EXAMPLES, 5)).astype("float32")
    y_class = (x[:, 0] + x[:, 1] > 0).astype("int64")
    y_reg = (x @ rng.normal(size=(5, 1))).astype("float32")
    if case == "sgd_tuple_sample_weight":
        w = rng.uniform(0.2, 2.0, NUM_EXAMPLES).astype("float32")
        return (x, y_class, w), x
    if case == "adam_dict":
        inputs = {"a": x[:, :3], "b": x[:, 3:]}
        return (inputs, y_reg), inputs
    return (x, {"cls": y_class, "reg": y_reg}), x


def _model(case):
    if case == "adam_dict":
        a = keras.Input((3,), name="a")
        b = keras.Input((2,), name="b")
        h = keras.layers.Concatenate()([a, b])
        h = keras.layers.Dense(8, activation="tanh")(h)
        model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(h))
        model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
        return model
    x = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(x)
    cls = keras.layers.Dense(2, name="cls")(h)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if case == "sgd_tuple_sample_weight":
        model = keras.Model(x, cls)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), ce,
                      metrics=["accuracy"], weighted_metrics=["accuracy"])
        return model
    reg = keras.layers.Dense(1, name="reg")(h)
    model = keras.Model(x, {"cls": cls, "reg": reg})
    model.compile(keras.optimizers.Adam(0.01), {"cls": ce, "reg": "mse"},
                  metrics={"cls": ["accuracy"], "reg": ["mae"]})
    return model


def run(case, strategy=None):
    """Trains `case` under `strategy` (None: no strategy); returns results."""
    train, predict_x = _data(case)
    with kd.strategies.scope_or_null(strategy):
        model = _model(case)
        rng = np.random.RandomState(42)
        model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32")
                           for w in model.get_weights()])
    ds = tf.data.Dataset.from_tensor_slices(train)
    pds = tf.data.Dataset.from_tensor_slices(predict_x)
    if strategy is None:
        ds, pds = ds.batch(GLOBAL_BATCH), pds.batch(GLOBAL_BATCH)
    else:
        ds = kd.data.distribute(ds, strategy, global_batch_size=GLOBAL_BATCH)
        pds = kd.data.distribute(pds, strategy,
                                 global_batch_size=GLOBAL_BATCH)
    history = model.fit(ds, epochs=EPOCHS, verbose=0,
                        validation_data=ds).history
    evaluation = model.evaluate(ds, verbose=0, return_dict=True)
    prediction = model.predict(pds, verbose=0)
    out = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    out.update({f"history_{k}": np.array(v) for k, v in history.items()})
    out.update({f"eval_{k}": np.array(v) for k, v in evaluation.items()})
    for k, v in (prediction.items() if isinstance(prediction, dict)
                 else [("out", prediction)]):
        out[f"predict_{k}"] = v
    return out


def assert_same(actual, expected, rtol=1e-4, atol=1e-5):
    assert sorted(actual) == sorted(expected)
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol,
                                   atol=atol, err_msg=k)

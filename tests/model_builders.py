"""Small Keras models and data shared by the placement and pipeline tests.

Import from a test module as `import model_builders` (pytest puts `tests/`
on `sys.path`).
"""

import keras
import numpy as np

CPUS = ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]


def sequential(name: str = "seq") -> keras.Sequential:
    """Input(8) -> four Dense(12, tanh) -> Dense(3): five layers to split."""
    return keras.Sequential(
        [keras.Input((8,))]
        + [
            keras.layers.Dense(12, activation="tanh", name=f"h{i}")
            for i in range(4)
        ]
        + [keras.layers.Dense(3, name="out")],
        name=name,
    )


def skip_model(name: str = "res", l2: float | None = None) -> keras.Model:
    """A residual block whose skip crosses the stage boundaries.

    Args:
        name: the model's name.
        l2: float or None. An L2 kernel regularizer on layer "b" (so the
            loss has a regularization term), or none.
    """
    i = keras.Input((8,), name="x")
    a = keras.layers.Dense(12, activation="tanh", name="a")(i)
    b = keras.layers.Dense(
        12,
        activation="tanh",
        name="b",
        kernel_regularizer=None if l2 is None else keras.regularizers.L2(l2),
    )(a)
    c = keras.layers.Dense(12, name="c")(b)
    s = keras.layers.Add(name="skip")([a, c])
    o = keras.layers.Dense(3, name="out")(s)
    return keras.Model(i, o, name=name)


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` examples: float32 features (n, 8) and integer labels in [0, 3)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype("float32")
    return x, rng.integers(0, 3, n)

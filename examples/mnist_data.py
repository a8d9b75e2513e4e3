"""MNIST data for the examples: the real dataset via tfds, or a learnable
synthetic stand-in that needs no download (the default here).

Shared by `mnist.py` and `custom_training_loop.py`; it defines no flags, so
any script can import it.
"""

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)


def synthetic_mnist(num_examples, seed, split_seed):
    """Learnable MNIST-shaped data: class patterns, shifted, plus noise.

    Every worker calls this with the same seeds and gets the same arrays;
    `kd.data.distribute` then gives each worker its part of every batch.

    Args:
        num_examples: int. Number of images.
        seed: int. Seed of the class patterns (same for train and test).
        split_seed: int. Seed of labels, shifts and noise (differs by
            split).

    Returns:
        (images uint8 [n, 28, 28, 1], labels int64 [n]).
    """
    patterns_rng = np.random.RandomState(seed)
    # One 7x7 binary pattern per class, upsampled to 28x28 "strokes".
    coarse = patterns_rng.rand(NUM_CLASSES, 7, 7) > 0.6
    patterns = np.kron(coarse, np.ones((4, 4))).astype("float32")
    rng = np.random.RandomState(split_seed)
    labels = rng.randint(0, NUM_CLASSES, num_examples)
    images = patterns[labels]
    shifts = rng.randint(-2, 3, (num_examples, 2))
    for axis in (0, 1):
        for s in range(-2, 3):
            rows = shifts[:, axis] == s
            images[rows] = np.roll(images[rows], s, axis=axis + 1)
    images = images * 0.6 + rng.normal(0.2, 0.5, images.shape)
    images = np.clip(images * 255, 0, 255).astype("uint8")
    return images[..., None], labels.astype("int64")


def load_datasets(name, data_dir, num_examples, seed):
    """(train, test) `tf.data.Dataset`s of (uint8 image, int64 label)."""
    import tensorflow as tf

    if name == "synthetic":
        train = synthetic_mnist(num_examples, seed, seed + 1)
        test = synthetic_mnist(max(num_examples // 4, 1), seed, seed + 2)
        return (
            tf.data.Dataset.from_tensor_slices(train),
            tf.data.Dataset.from_tensor_slices(test),
        )
    import tensorflow_datasets as tfds

    try:
        train, test = tfds.load(
            "mnist", split=["train", "test"], as_supervised=True,
            data_dir=data_dir, shuffle_files=False,
        )
    except Exception as e:
        raise RuntimeError(
            f"Could not load MNIST with tfds.load (data_dir={data_dir!r}): "
            f"{e}. Without internet, run with --dataset=synthetic or point "
            "--data_dir at a prepared tensorflow_datasets directory."
        ) from e
    return train, test

"""MNIST data for the examples: the real dataset via tfds, or a learnable
synthetic stand-in that needs no download (the default here).

Shared by `mnist.py` and `custom_training_loop.py`; it defines no flags, so
any script can import it. Every example also takes
`quiet_tensorflow_startup()` from here (TensorFlow's C++ start-up lines
hidden on machines without GPUs).
"""

import os
import subprocess
import sys

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


# TensorFlow's C++ start-up lines on a machine without GPUs (TF 2.21): they
# are written before absl's logging is initialised, so TF_CPP_MIN_LOG_LEVEL
# does not hide them, and the cuInit line is an ERROR.
_NOISE = (r"WARNING: All log messages before absl::InitializeLog\(\) is"
          r"|\] oneDNN custom operations are on"
          r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
          r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
          r"|^To enable the following instructions: .* rebuild TensorFlow")
# Only after "Could not find cuda drivers": with a driver it is a real error.
_NO_DRIVER_ONLY = r"cuda_platform\.cc:\d+\] failed call to cuInit"
_FILTER = """
import re, signal, sys
# Only the end of its input ends it, so the program's last lines (a save
# on SIGTERM, a traceback) still pass when its process group is signalled.
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
noise, no_driver_only = (re.compile(a.encode()) for a in sys.argv[1:3])
no_driver = False
for line in sys.stdin.buffer:
    no_driver = no_driver or b"Could not find cuda drivers" in line
    if noise.search(line) or (no_driver and no_driver_only.search(line)):
        continue
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()
"""


def quiet_tensorflow_startup() -> None:
    """Hides TensorFlow's C++ start-up lines on machines without GPUs.

    Standard error (file descriptor 2, so C++ writes too) goes through a
    small filter process that drops only those lines (the absl pre-init
    notice, oneDNN's, the CUDA driver probe and its cuInit error when no
    driver is installed, the CPU instructions notice); everything else,
    warnings and real errors included, passes unchanged. Call it before
    TensorFlow is imported. Set KERASDIST_VERBOSE=1 (`kerasdist-run
    --verbose`) to see everything.
    """
    verbose = os.environ.get("KERASDIST_VERBOSE", "").strip()
    if verbose not in ("", "0") or "tensorflow" in sys.modules:
        return
    read, write = os.pipe()
    subprocess.Popen(  # lives until standard error closes
        [sys.executable, "-c", _FILTER, _NOISE, _NO_DRIVER_ONLY],
        stdin=read, stdout=sys.stderr.fileno(), close_fds=True)
    sys.stderr.flush()
    os.dup2(write, sys.stderr.fileno())
    os.close(read)
    os.close(write)

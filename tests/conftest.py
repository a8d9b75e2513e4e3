"""Test session set-up: 4 logical CPU devices for multi-device tests.

Logical devices must be configured before TensorFlow initialises, so this
runs at import time, before any test module creates a tensor.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import kerasdist as kd  # noqa: E402

NUM_CPUS = 4
kd.virtual_cpus(NUM_CPUS)

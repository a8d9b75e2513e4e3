"""kerasdist: distributed training for Keras 3 on TensorFlow.

Data parallelism on one or many machines, model parallelism across devices,
and training that survives lost workers, through the Keras APIs users
already know.
"""

# ruff: noqa: E402 (the environment and log set-up must precede imports)

import os as _os

# Quiet TensorFlow's C++ INFO and WARNING logs (errors still show, and
# Python exceptions carry their messages) unless the user chose a level.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging as _logging

# TF logs every collective it builds at INFO ("Collective all_reduce
# tensors: ..."), on every worker. Unless the user chose a level for TF's
# logger, show its warnings and errors only; tf.get_logger().setLevel("INFO")
# brings the rest back.
if _logging.getLogger("tensorflow").level == _logging.NOTSET:
    _logging.getLogger("tensorflow").setLevel(_logging.WARNING)

import warnings as _warnings

# Keras >= 3.14 warns on every fit(dataset) because fit's *default* is
# shuffle=True (keras-team/keras#22777); a tf.data pipeline shuffles itself.
_warnings.filterwarnings(
    "ignore",
    message=r"`shuffle=True` was passed, but will be ignored",
    category=UserWarning,
)

from kerasdist import (
    callbacks,
    cluster,
    compression,
    data,
    devices,
    flags,
    launch,
    placement,
)
from kerasdist.accumulation import accumulate_gradients
from kerasdist.callbacks.warmup import scale_learning_rate
from kerasdist.cluster import is_chief
from kerasdist.devices import virtual_cpus
from kerasdist.strategies import (
    MirroredStrategy,
    MultiWorkerMirroredStrategy,
    get_strategy,
)

__version__ = "0.1.0"

__all__ = [
    "MirroredStrategy",
    "MultiWorkerMirroredStrategy",
    "accumulate_gradients",
    "callbacks",
    "cluster",
    "compression",
    "data",
    "devices",
    "flags",
    "get_strategy",
    "is_chief",
    "launch",
    "placement",
    "scale_learning_rate",
    "virtual_cpus",
    "__version__",
]

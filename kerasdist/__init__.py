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

from kerasdist.launch import protocol as _protocol

# In a worker started by kerasdist-run, an uncaught PermanentError exits
# with PERMANENT_EXIT_CODE so the launcher does not retry it.
_protocol.install_permanent_error_hook()

import importlib as _importlib

# Public names are loaded on first use (PEP 562), so `import kerasdist` and
# the `kerasdist-run` launcher do not import TensorFlow; `kd.get_strategy`
# etc. import it when first touched.
_SUBMODULES = frozenset({
    "accumulation", "callbacks", "cluster", "compression", "data", "devices",
    "elastic", "errors", "flags", "integrations", "launch", "losses",
    "placement", "strategies", "testing",
})
_NAMES = {
    "MirroredStrategy": "kerasdist.strategies",
    "MultiWorkerMirroredStrategy": "kerasdist.strategies",
    "get_strategy": "kerasdist.strategies",
    "scope_or_null": "kerasdist.strategies",
    "accumulate_gradients": "kerasdist.accumulation",
    "scale_learning_rate": "kerasdist.callbacks.warmup",
    "scale_loss": "kerasdist.losses",
    "unscale_loss": "kerasdist.losses",
    "is_chief": "kerasdist.cluster",
    "virtual_cpus": "kerasdist.devices",
}


def __getattr__(name):
    if name in _NAMES:
        value = getattr(_importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f"kerasdist.{name}")
    else:
        raise AttributeError(f"module 'kerasdist' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


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
    "elastic",
    "errors",
    "flags",
    "get_strategy",
    "integrations",
    "is_chief",
    "launch",
    "losses",
    "placement",
    "scale_learning_rate",
    "scale_loss",
    "scope_or_null",
    "unscale_loss",
    "virtual_cpus",
    "__version__",
]

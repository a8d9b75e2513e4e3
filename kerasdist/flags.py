"""Standard absl flags for kerasdist training scripts.

In the style of TF Model Garden (`official/common/flags.py`,
`official/common/distribute_utils.py`): a script calls `define_flags()` at
import time, and its `main` turns the parsed values into a strategy and
callbacks with `strategy_from_flags()` and `callbacks_from_flags()`. Every
flag is optional with a sensible default; values are checked by absl
validators when the command line is parsed, so a bad value is a clear error
before TensorFlow starts. Library code never reads `FLAGS`, and flag values
are never modified.

Example script:

```python
from absl import app, flags
import kerasdist as kd

kd.flags.define_flags(epochs=5)
FLAGS = flags.FLAGS

def main(argv):
    strategy = kd.flags.strategy_from_flags(FLAGS)
    with strategy.scope():
        model = build_model()
    model.fit(train, epochs=FLAGS.epochs,
              callbacks=kd.flags.callbacks_from_flags(FLAGS))

if __name__ == "__main__":
    app.run(main)
```
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from absl import flags as absl_flags

__all__ = [
    "ALL_REDUCE_NAMES",
    "COMPRESSION_NAMES",
    "FLAG_NAMES",
    "backup_freq_value",
    "callbacks_from_flags",
    "define_flags",
    "strategy_from_flags",
]

#: Values of `--all_reduce` (passed to `kd.get_strategy(communication=...)`).
ALL_REDUCE_NAMES = ("auto", "ring", "nccl", "hierarchical_copy", "one_device")
#: Values of `--compression` ("none": gradients all-reduced uncompressed).
COMPRESSION_NAMES = ("none", "fp16", "bf16")
_STRATEGY_NAMES = ("auto", "one_device", "mirrored", "multi_worker")

#: The flags `define_flags()` defines, in order.
FLAG_NAMES = (
    "strategy",
    "num_virtual_cpus",
    "model_dir",
    "global_batch_size",
    "epochs",
    "steps_per_epoch",
    "backup_freq",
    "all_reduce",
    "compression",
    "warmup_steps",
    "seed",
    "dataset",
    "data_dir",
)

_DEFAULTS: dict[str, Any] = {
    "strategy": "auto",
    "num_virtual_cpus": 0,
    "model_dir": None,
    "global_batch_size": 64,
    "epochs": 3,
    "steps_per_epoch": None,
    "backup_freq": None,
    "all_reduce": "auto",
    "compression": "none",
    "warmup_steps": 0,
    "seed": 1,
    "dataset": "synthetic",
    "data_dir": None,
}


def backup_freq_value(backup_freq: str | int | None) -> str | int | None:
    """Converts a `--backup_freq` value to `BackupAndRestore`'s `save_freq`.

    Args:
        backup_freq: str, int or None. `"epoch"`, a positive number of steps
            (as int or decimal string), or None/"" for no backups.

    Returns:
        `"epoch"`, a positive int, or None.

    Raises:
        ValueError: for anything else, naming the value received.

    Example:

    >>> backup_freq_value("200")
    200
    >>> backup_freq_value("epoch")
    'epoch'
    """
    if backup_freq is None or backup_freq == "":
        return None
    if backup_freq == "epoch":
        return "epoch"
    if isinstance(backup_freq, bool):
        value = None
    elif isinstance(backup_freq, int):
        value = backup_freq
    elif isinstance(backup_freq, str) and backup_freq.strip().isdigit():
        value = int(backup_freq)
    else:
        value = None
    if value is None or value < 1:
        raise ValueError(
            "Invalid value for flag `--backup_freq`. Received: "
            f"backup_freq={backup_freq!r}. Expected 'epoch' or a positive "
            "integer number of steps."
        )
    return value


def _check(condition: bool, message: str) -> bool:
    if not condition:
        raise absl_flags.ValidationError(message)
    return True


def _positive(name: str):
    def check(value):
        return _check(
            value is not None and value >= 1,
            f"Invalid value for flag `--{name}`. Received: {name}={value!r}. "
            "Expected a positive integer.",
        )

    return check


def _positive_or_none(name: str):
    def check(value):
        return _check(
            value is None or value >= 1,
            f"Invalid value for flag `--{name}`. Received: {name}={value!r}. "
            "Expected a positive integer, or leave it unset.",
        )

    return check


def _non_negative(name: str, what: str):
    def check(value):
        return _check(
            value is not None and value >= 0,
            f"Invalid value for flag `--{name}`. Received: {name}={value!r}. "
            f"Expected an integer >= 0 ({what}).",
        )

    return check


def _valid_backup_freq(value):
    try:
        backup_freq_value(value)
    except ValueError as e:
        raise absl_flags.ValidationError(str(e)) from None
    return True


def _backup_needs_model_dir(values):
    return _check(
        not values["backup_freq"] or bool(values["model_dir"]),
        "Flag `--backup_freq` needs `--model_dir`: backups are written under "
        f"model_dir/backup. Received: backup_freq={values['backup_freq']!r}, "
        f"model_dir={values['model_dir']!r}. Set --model_dir=/path/to/run.",
    )


class _Flag(NamedTuple):
    """One standard flag: how `define_flags` defines and validates it."""

    name: str
    definer: Callable[..., Any]
    help: str
    enum_values: list[str] | None = None
    validator: Callable[[Any], bool] | None = None


# The standard flags, in `FLAG_NAMES` order; defaults are in `_DEFAULTS`.
_FLAGS = (
    _Flag(
        "strategy", absl_flags.DEFINE_enum,
        "Distribution strategy: 'auto' picks multi_worker when TF_CONFIG "
        "names several tasks, else mirrored over several GPUs (or over "
        "--num_virtual_cpus > 1), else one_device.",
        list(_STRATEGY_NAMES),
    ),
    _Flag(
        "num_virtual_cpus", absl_flags.DEFINE_integer,
        "Split the host CPU into N logical devices (0: don't; also "
        "KERASDIST_VIRTUAL_CPUS). For running mirrored on a CPU-only host.",
        validator=_non_negative("num_virtual_cpus", "0 means no split"),
    ),
    _Flag(
        "model_dir", absl_flags.DEFINE_string,
        "Directory for this run's backups and outputs (shared by all "
        "workers).",
    ),
    _Flag(
        "global_batch_size", absl_flags.DEFINE_integer,
        "Examples per training step, summed over all replicas of all "
        "workers; must divide by the number of replicas.",
        validator=_positive("global_batch_size"),
    ),
    _Flag(
        "epochs", absl_flags.DEFINE_integer, "Training epochs.",
        validator=_positive("epochs"),
    ),
    _Flag(
        "steps_per_epoch", absl_flags.DEFINE_integer,
        "Steps per epoch (unset: one pass over the training data).",
        validator=_positive_or_none("steps_per_epoch"),
    ),
    _Flag(
        "backup_freq", absl_flags.DEFINE_string,
        "Back up for fault tolerance every N steps, or 'epoch'; unset: no "
        "backups. Needs --model_dir.",
        validator=_valid_backup_freq,
    ),
    _Flag(
        "all_reduce", absl_flags.DEFINE_enum,
        "All-reduce implementation: auto|ring|nccl for multi_worker, "
        "auto|nccl|hierarchical_copy|one_device for mirrored.",
        list(ALL_REDUCE_NAMES),
    ),
    _Flag(
        "compression", absl_flags.DEFINE_enum,
        "Cast gradients for the all-reduce: none|fp16|bf16.",
        list(COMPRESSION_NAMES),
    ),
    _Flag(
        "warmup_steps", absl_flags.DEFINE_integer,
        "Learning-rate warm-up steps (0: no warm-up).",
        validator=_non_negative("warmup_steps", "0 means no warm-up"),
    ),
    _Flag(
        "seed", absl_flags.DEFINE_integer,
        "Random seed for weights and generated data (the same on every "
        "worker).",
        validator=_non_negative("seed", "a random seed"),
    ),
    _Flag(
        "dataset", absl_flags.DEFINE_string,
        "Dataset: 'synthetic' (generated, no download) or a "
        "tensorflow_datasets name the script supports.",
        validator=lambda v: _check(
            bool(v),
            f"Invalid value for flag `--dataset`. Received: dataset={v!r}. "
            "Expected 'synthetic' or a tensorflow_datasets name.",
        ),
    ),
    _Flag(
        "data_dir", absl_flags.DEFINE_string,
        "tensorflow_datasets data directory (unset: TFDS's default).",
    ),
)


def define_flags(
    flag_values: absl_flags.FlagValues | None = None, **defaults: Any
) -> None:
    """Defines the standard kerasdist flags, once.

    Defines `--strategy`, `--num_virtual_cpus`, `--model_dir`,
    `--global_batch_size`, `--epochs`, `--steps_per_epoch`, `--backup_freq`,
    `--all_reduce`, `--compression`, `--warmup_steps`, `--seed`,
    `--dataset` and `--data_dir` (see `FLAG_NAMES`), all optional, with
    validators. Calling it again is a no-op for the flags already defined,
    so a script and a library helper may both call it; a flag the script
    defined itself before the call is left as it is.

    Args:
        flag_values: `absl.flags.FlagValues` or None. Where to define the
            flags. Defaults to None (the global `absl.flags.FLAGS`).
        **defaults: per-script defaults overriding kerasdist's, e.g.
            `epochs=10, dataset="mnist"`. Keys must be names from
            `FLAG_NAMES`. Defaults: strategy="auto", num_virtual_cpus=0,
            model_dir=None, global_batch_size=64, epochs=3,
            steps_per_epoch=None, backup_freq=None, all_reduce="auto",
            compression="none", warmup_steps=0, seed=1, dataset="synthetic",
            data_dir=None.

    Raises:
        ValueError: if a key of `defaults` is not one of `FLAG_NAMES`.

    Example:

    ```python
    from absl import app, flags
    import kerasdist as kd

    kd.flags.define_flags(epochs=10, global_batch_size=256)

    def main(argv):
        print(flags.FLAGS.epochs)

    app.run(main)   # python train.py --epochs=2 --strategy=mirrored
    ```
    """
    fv = absl_flags.FLAGS if flag_values is None else flag_values
    unknown = sorted(set(defaults) - set(FLAG_NAMES))
    if unknown:
        raise ValueError(
            "Invalid keyword argument(s) for `define_flags`: "
            f"{unknown}. Expected names from {list(FLAG_NAMES)}."
        )
    d = {**_DEFAULTS, **defaults}
    defined = set()
    for flag in _FLAGS:
        if flag.name in fv:
            continue
        defined.add(flag.name)
        args = (flag.name, d[flag.name])
        if flag.enum_values is not None:
            args += (flag.enum_values,)
        flag.definer(*args, flag.help, flag_values=fv)
        if flag.validator is not None:
            absl_flags.register_validator(flag.name, flag.validator,
                                          flag_values=fv)
    if "backup_freq" in defined and "model_dir" in fv:
        absl_flags.register_multi_flags_validator(
            ["backup_freq", "model_dir"], _backup_needs_model_dir,
            flag_values=fv,
        )


def _value(fv, name: str) -> Any:
    if name not in fv:
        return _DEFAULTS[name]
    return fv[name].value


def strategy_from_flags(flags_values: absl_flags.FlagValues | None = None):
    """Builds the strategy the parsed flags ask for.

    Applies `--num_virtual_cpus` (or `KERASDIST_VIRTUAL_CPUS`) with
    `kd.virtual_cpus`, then calls `kd.get_strategy` with `--strategy`,
    `--all_reduce` (as `communication`) and `--compression`. With
    `--strategy=auto` and `--num_virtual_cpus` > 1 on a single worker, the
    strategy is mirrored over the virtual CPUs (asking for several devices
    means asking to use them). Call it first in `main`, before any tensor
    exists.

    Args:
        flags_values: `absl.flags.FlagValues` or None. Parsed flags defined
            by `define_flags()`. Defaults to None (the global
            `absl.flags.FLAGS`).

    Returns:
        `tf.distribute.Strategy`.

    Raises:
        ValueError: for a combination `kd.get_strategy` rejects (e.g.
            `--all_reduce=ring` with `--strategy=mirrored`), or
            `--compression` when this kerasdist has no gradient compression.
        RuntimeError: if TensorFlow initialised its devices before
            `--num_virtual_cpus` could be applied.

    Example:

    ```python
    def main(argv):
        strategy = kd.flags.strategy_from_flags(FLAGS)
        with strategy.scope():
            model = build_model()
    ```
    """
    from kerasdist import cluster, devices, strategies

    fv = absl_flags.FLAGS if flags_values is None else flags_values
    num_cpus = _value(fv, "num_virtual_cpus")
    if num_cpus:
        devices.virtual_cpus(num_cpus)
    else:
        created = devices.apply_env_virtual_cpus()
        num_cpus = len(created) if created else 0
    name = _value(fv, "strategy")
    if (
        name == "auto"
        and num_cpus > 1
        and not cluster.from_env().is_multi_worker
        and not devices.gpus()
    ):
        name = "mirrored"
    kwargs: dict[str, Any] = {"communication": _value(fv, "all_reduce")}
    compression = _value(fv, "compression")
    if compression and compression != "none":
        kwargs["compression"] = compression
    return strategies.get_strategy(name, **kwargs)


def callbacks_from_flags(
    flags_values: absl_flags.FlagValues | None = None,
    *,
    backup_subdir: str = "backup",
) -> list:
    """Builds the Keras callbacks the parsed flags ask for.

    - `--backup_freq` set: `kd.callbacks.BackupAndRestore` in
      `<model_dir>/<backup_subdir>` with `save_freq=backup_freq`, so a
      restarted run (e.g. under `kerasdist-run --max_restarts`) resumes
      where it stopped.
    - `--warmup_steps` > 0: `kd.callbacks.LearningRateWarmup` over that many
      steps, from the base learning rate to base × replicas.

    Pass the list to `model.fit(callbacks=...)`, adding your own.

    Args:
        flags_values: `absl.flags.FlagValues` or None. Parsed flags defined
            by `define_flags()`. Defaults to None (the global
            `absl.flags.FLAGS`).
        backup_subdir: str. Backup directory under `--model_dir`. Defaults
            to `"backup"`.

    Returns:
        list of `keras.callbacks.Callback` (empty when no flag asks for
        one).

    Raises:
        ValueError: if `--backup_freq` is set without `--model_dir`.

    Example:

    ```python
    # python train.py --model_dir=/tmp/run --backup_freq=100 \\
    #     --warmup_steps=50
    model.fit(train, epochs=FLAGS.epochs,
              callbacks=kd.flags.callbacks_from_flags(FLAGS))
    ```
    """
    fv = absl_flags.FLAGS if flags_values is None else flags_values
    out: list = []
    save_freq = backup_freq_value(_value(fv, "backup_freq"))
    if save_freq is not None:
        model_dir = _value(fv, "model_dir")
        if not model_dir:
            raise ValueError(
                "Flag `--backup_freq` needs `--model_dir`. Received: "
                f"backup_freq={save_freq!r}, model_dir={model_dir!r}."
            )
        from kerasdist import callbacks

        out.append(
            callbacks.BackupAndRestore(
                os.path.join(model_dir, backup_subdir), save_freq=save_freq
            )
        )
    warmup_steps = _value(fv, "warmup_steps")
    if warmup_steps:
        from kerasdist import callbacks

        out.append(callbacks.LearningRateWarmup(warmup_steps=warmup_steps))
    return out

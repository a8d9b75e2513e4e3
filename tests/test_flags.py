"""Tests for kerasdist.flags: defaults, validators, strategy and callbacks."""

import os

import pytest
import tensorflow as tf
from absl import flags as absl_flags

import kerasdist as kd
from kerasdist import flags as kd_flags

EXPECTED_DEFAULTS = {
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


def parsed(*argv, **defaults):
    fv = absl_flags.FlagValues()
    kd_flags.define_flags(fv, **defaults)
    fv(["prog", *argv])
    return fv


def test_defaults_all_optional():
    fv = parsed()
    assert set(kd_flags.FLAG_NAMES) == set(EXPECTED_DEFAULTS)
    assert {n: fv[n].value for n in kd_flags.FLAG_NAMES} == EXPECTED_DEFAULTS


def test_command_line_values():
    fv = parsed(
        "--strategy=mirrored", "--epochs=7", "--global_batch_size=128",
        "--backup_freq=50", "--model_dir=/tmp/x", "--compression=bf16",
        "--steps_per_epoch=9", "--dataset=mnist",
    )
    assert fv.strategy == "mirrored"
    assert fv.epochs == 7
    assert fv.global_batch_size == 128
    assert fv.backup_freq == "50"
    assert fv.steps_per_epoch == 9
    assert fv.compression == "bf16"
    assert fv.dataset == "mnist"


def test_define_flags_is_idempotent_and_keeps_script_flags():
    fv = absl_flags.FlagValues()
    absl_flags.DEFINE_integer("epochs", 42, "script's own", flag_values=fv)
    kd_flags.define_flags(fv, global_batch_size=256)
    kd_flags.define_flags(fv)  # second call: no DuplicateFlagError
    fv(["prog"])
    assert fv.epochs == 42
    assert fv.global_batch_size == 256
    assert fv["global_batch_size"].help.startswith("Examples per")


def test_unknown_default_is_an_error():
    with pytest.raises(ValueError, match=r"\['epoch'\].*Expected names from"):
        kd_flags.define_flags(absl_flags.FlagValues(), epoch=3)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--epochs=0", r"`--epochs`. Received: epochs=0. Expected a positive"),
        (
            "--global_batch_size=-8",
            r"`--global_batch_size`. Received: global_batch_size=-8",
        ),
        ("--steps_per_epoch=0", r"steps_per_epoch=0. Expected a positive"),
        ("--warmup_steps=-1", r"warmup_steps=-1. Expected an integer >= 0"),
        ("--num_virtual_cpus=-2", r"num_virtual_cpus=-2. Expected an integer"),
        ("--seed=-1", r"seed=-1"),
        ("--dataset=", r"`--dataset`"),
        (
            "--backup_freq=often",
            r"backup_freq='often'. Expected 'epoch' or a positive integer",
        ),
        ("--backup_freq=0", r"backup_freq='0'"),
        ("--strategy=parameter_server", r"value should be one of"),
        ("--all_reduce=mpi", r"value should be one of"),
        ("--compression=int8", r"value should be one of"),
    ],
)
def test_validators_reject_with_clear_message(arg, message):
    with pytest.raises(absl_flags.IllegalFlagValueError, match=message):
        parsed(arg)


def test_backup_freq_needs_model_dir():
    with pytest.raises(
        absl_flags.IllegalFlagValueError, match=r"needs `--model_dir`"
    ):
        parsed("--backup_freq=epoch")
    fv = parsed("--backup_freq=epoch", "--model_dir=/tmp/run")
    assert kd_flags.backup_freq_value(fv.backup_freq) == "epoch"


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), ("", None), ("epoch", "epoch"), ("12", 12), (3, 3)],
)
def test_backup_freq_value(value, expected):
    assert kd_flags.backup_freq_value(value) == expected


@pytest.mark.parametrize("value", [True, 0, "-1", "1.5", "steps"])
def test_backup_freq_value_rejects(value):
    with pytest.raises(ValueError, match=f"Received: backup_freq={value!r}"):
        kd_flags.backup_freq_value(value)


def test_strategy_from_flags_virtual_cpus_mean_mirrored():
    # conftest created 4 logical CPUs; asking for 4 again is a no-op.
    fv = parsed("--num_virtual_cpus=4")
    strategy = kd_flags.strategy_from_flags(fv)
    assert isinstance(strategy, kd.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 4
    assert fv.strategy == "auto"  # flag values are never modified


def test_strategy_from_flags_explicit_names():
    strategy = kd_flags.strategy_from_flags(parsed("--strategy=one_device"))
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    strategy = kd_flags.strategy_from_flags(
        parsed("--strategy=mirrored", "--all_reduce=one_device")
    )
    assert isinstance(strategy, kd.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 4


def test_strategy_from_flags_wrong_virtual_cpus_is_clear():
    with pytest.raises(RuntimeError, match=r"kd.virtual_cpus\(3\) was called"):
        kd_flags.strategy_from_flags(parsed("--num_virtual_cpus=3"))


def test_strategy_from_flags_bad_combination():
    fv = parsed("--strategy=mirrored", "--all_reduce=ring")
    with pytest.raises(ValueError, match=r"communication='ring'"):
        kd_flags.strategy_from_flags(fv)


def test_strategy_from_flags_compression():
    fv = parsed("--strategy=mirrored", "--compression=fp16")
    strategy = kd_flags.strategy_from_flags(fv)
    assert strategy.num_replicas_in_sync == 4
    assert kd.compression.get_compression(strategy) == "fp16"


def test_callbacks_from_flags_none_by_default():
    assert kd_flags.callbacks_from_flags(parsed()) == []


def _callbacks_module():
    try:
        from kerasdist import callbacks
    except ImportError:
        pytest.skip("kerasdist.callbacks not available yet")
    return callbacks


def test_callbacks_from_flags_backup(tmp_path):
    callbacks = _callbacks_module()
    if not hasattr(callbacks, "BackupAndRestore"):
        pytest.skip("kd.callbacks.BackupAndRestore not available yet")
    fv = parsed("--backup_freq=20", f"--model_dir={tmp_path}")
    (cb,) = kd_flags.callbacks_from_flags(fv)
    assert isinstance(cb, callbacks.BackupAndRestore)
    assert cb.save_freq == 20
    assert os.fspath(cb.backup_dir) == os.path.join(tmp_path, "backup")


def test_callbacks_from_flags_warmup():
    callbacks = _callbacks_module()
    if not hasattr(callbacks, "LearningRateWarmup"):
        pytest.skip("kd.callbacks.LearningRateWarmup not available yet")
    (cb,) = kd_flags.callbacks_from_flags(parsed("--warmup_steps=30"))
    assert isinstance(cb, callbacks.LearningRateWarmup)
    assert cb.warmup_steps == 30

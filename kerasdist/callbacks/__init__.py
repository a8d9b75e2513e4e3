"""Keras callbacks for distributed training (one concept per module)."""

from kerasdist.callbacks.backup_and_restore import (
    BackupAndRestore,
    BackupMismatchError,
    SavedBackup,
)
from kerasdist.callbacks.chief_only import ChiefOnly, RunSummary, chief_verbose
from kerasdist.callbacks.keras_files import (
    KerasBackupAndRestoreError,
    adapt_file_callbacks,
)
from kerasdist.callbacks.local_sgd import AllReduceCounter, LocalSGD
from kerasdist.callbacks.metric_average import MetricAverage, MetricAverageError
from kerasdist.callbacks.throughput import Throughput
from kerasdist.callbacks.warmup import LearningRateWarmup, WarmupSchedule

__all__ = [
    "AllReduceCounter",
    "LocalSGD",
    "BackupAndRestore",
    "BackupMismatchError",
    "ChiefOnly",
    "KerasBackupAndRestoreError",
    "LearningRateWarmup",
    "MetricAverage",
    "MetricAverageError",
    "RunSummary",
    "SavedBackup",
    "Throughput",
    "WarmupSchedule",
    "adapt_file_callbacks",
    "chief_verbose",
]

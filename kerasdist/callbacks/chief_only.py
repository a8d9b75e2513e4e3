"""Chief-only file output: checkpoints, logs, progress bars, run summary.

In multi-worker training every worker runs the same script, so a plain
`ModelCheckpoint("ckpt.keras")`, `CSVLogger("log.csv")` or
`TensorBoard("tb")` has every worker write the same path: files are
clobbered, locked (`BlockingIOError: unable to lock file`) or interleaved.

`ChiefOnly(callback)` makes only the chief (worker 0) write the real path.
Other workers either skip the callback, or, when the callback may run a
collective, run it as well with its path redirected to a private temporary
directory that is deleted: the idea of tf_keras's
`distribute/distributed_file_utils.py` (every worker runs the same saving
code, so none can wait for a peer that skipped it).

Why ModelCheckpoint runs on every worker by default: saving reads every
variable, and under `MultiWorkerMirroredStrategy` reading a variable whose
`synchronization` is `ON_READ` (Keras metric state, or any such variable a
custom model creates) in the cross-replica context is an all-reduce. With
Keras 3.15, saving a compiled `Sequential`/functional model to `.keras`
needed no collective in our runs (`ChiefOnly(..., mode="skip")` completed),
but a model that does would leave the chief waiting forever, so the default
pays a redundant local save on the other workers instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import keras
import numpy as np
from absl import logging

from kerasdist import cluster as cluster_lib

__all__ = ["ChiefOnly", "RunSummary", "chief_verbose"]

# Attributes holding the output path of Keras's file-writing callbacks.
_PATH_ATTRS = {
    keras.callbacks.ModelCheckpoint: ("filepath",),
    keras.callbacks.CSVLogger: ("filename",),
    keras.callbacks.TensorBoard: ("log_dir",),
}
_MODES = ("auto", "skip", "temp_dir")
_HOOKS = (
    "on_batch_begin", "on_batch_end", "on_epoch_begin", "on_epoch_end",
    "on_train_batch_begin", "on_train_batch_end", "on_test_batch_begin",
    "on_test_batch_end", "on_predict_batch_begin", "on_predict_batch_end",
    "on_train_begin", "on_train_end", "on_test_begin", "on_test_end",
    "on_predict_begin", "on_predict_end",
)


def chief_verbose(verbose: int | str = "auto") -> int | str:
    """`verbose` for `fit` on the chief, 0 on other workers.

    Args:
        verbose: int or str. What the chief shows (`"auto"`, 0, 1, 2).
            Defaults to `"auto"`.

    Returns:
        `verbose` on the chief, else 0 (no progress bar).

    Example:

    ```python
    model.fit(ds, epochs=3, verbose=kd.callbacks.chief_verbose())
    ```
    """
    return verbose if cluster_lib.is_chief() else 0


def _path_attrs(callback: keras.callbacks.Callback) -> tuple[str, ...]:
    for cls, attrs in _PATH_ATTRS.items():
        if isinstance(callback, cls):
            return attrs
    return ()


class ChiefOnly(keras.callbacks.Callback):
    """Runs a file-writing callback so that only the chief writes its path.

    Args:
        callback: `keras.callbacks.Callback`. The callback to wrap, e.g.
            `ModelCheckpoint`, `CSVLogger`, `TensorBoard`, or your own.
        mode: str. What non-chief workers do:
            - `"auto"` (default): `"temp_dir"` for `ModelCheckpoint` (saving
              may run a collective), `"skip"` for everything else.
            - `"skip"`: never call the callback. Use only for callbacks that
              run no collective (nothing that reads `ON_READ` variables or
              calls the strategy).
            - `"temp_dir"`: call it like the chief, with its path attributes
              pointing into a private temporary directory that is emptied
              after every epoch and deleted at the end of training.
        path_attrs: list of str or None. Attributes of `callback` holding
            output paths, for `"temp_dir"` with your own callbacks. Defaults
            to the known attribute of Keras's callbacks.
        task: `kerasdist.cluster.TaskInfo` or None. Which worker this is;
            defaults to `kerasdist.cluster.from_env()`.

    Raises:
        ValueError: if `callback` is not a Keras callback, `mode` is
            unknown, or `"temp_dir"` is asked for a callback whose path
            attributes are unknown.

    Example:

    ```python
    model.fit(ds, epochs=10, verbose=kd.callbacks.chief_verbose(), callbacks=[
        kd.callbacks.MetricAverage(),
        kd.callbacks.ChiefOnly(keras.callbacks.ModelCheckpoint("m.keras")),
        kd.callbacks.ChiefOnly(keras.callbacks.CSVLogger("log.csv")),
    ])
    ```
    """

    def __init__(
        self,
        callback: keras.callbacks.Callback,
        mode: str = "auto",
        path_attrs: list[str] | None = None,
        task: cluster_lib.TaskInfo | None = None,
    ):
        super().__init__()
        if not isinstance(callback, keras.callbacks.Callback):
            raise ValueError(
                "Invalid value for argument `callback`. Received: "
                f"callback={callback!r}. Expected a keras.callbacks.Callback."
            )
        if mode not in _MODES:
            raise ValueError(
                "Invalid value for argument `mode`. Received: "
                f"mode={mode!r}. Expected one of {list(_MODES)}."
            )
        attrs = tuple(path_attrs) if path_attrs is not None else (
            _path_attrs(callback)
        )
        for name in attrs:
            value = getattr(callback, name, None)
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError(
                    "Invalid value for argument `path_attrs`. Received: "
                    f"path_attrs={list(attrs)!r}, but {type(callback).__name__}"
                    f".{name} is not a path."
                )
        if mode == "auto":
            mode = (
                "temp_dir"
                if isinstance(callback, keras.callbacks.ModelCheckpoint)
                else "skip"
            )
        if mode == "temp_dir" and not attrs:
            raise ValueError(
                "ChiefOnly(mode='temp_dir') needs the attributes of "
                f"{type(callback).__name__} that hold output paths. Pass "
                "path_attrs=[...]."
            )
        self.callback = callback
        self.mode = mode
        self.path_attrs = attrs
        self.task = task if task is not None else cluster_lib.from_env()
        self.is_chief = self.task.is_chief
        self._tmp_dir: str | None = None
        if not self.is_chief and self.mode == "temp_dir":
            self._redirect()
        self._active = self.is_chief or self.mode == "temp_dir"

    @property
    def temp_dir(self) -> str | None:
        """The non-chief's temporary directory (None on the chief)."""
        return self._tmp_dir

    def _redirect(self) -> None:
        self._tmp_dir = tempfile.mkdtemp(
            prefix=f"kerasdist-worker{self.task.worker_rank}-"
        )
        for name in self.path_attrs:
            path = os.fspath(getattr(self.callback, name))
            target = os.path.join(
                self._tmp_dir, name, os.path.basename(path.rstrip("/\\"))
            )
            setattr(self.callback, name, target)

    def _clean(self) -> None:
        if self._tmp_dir is None:
            return
        for entry in os.listdir(self._tmp_dir):
            shutil.rmtree(os.path.join(self._tmp_dir, entry),
                          ignore_errors=True)

    # Keras sets these on every callback in the list.
    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def on_epoch_end(self, epoch, logs=None):
        if self._active:
            self.callback.on_epoch_end(epoch, logs)
        self._clean()

    def on_train_end(self, logs=None):
        if self._active:
            self.callback.on_train_end(logs)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def on_train_begin(self, logs=None):
        if self._tmp_dir is not None:
            os.makedirs(self._tmp_dir, exist_ok=True)  # again, after a fit
        if self._active:
            self.callback.on_train_begin(logs)


def _make_hook(name):
    def hook(self, *args, **kwargs):
        if self._active:
            getattr(self.callback, name)(*args, **kwargs)

    hook.__name__ = name
    hook.__doc__ = f"Calls the wrapped callback's `{name}` where it runs."
    return hook


for _name in _HOOKS:
    if _name not in ("on_epoch_end", "on_train_end", "on_train_begin"):
        setattr(ChiefOnly, _name, _make_hook(_name))


class RunSummary(keras.callbacks.Callback):
    """Logs one summary of the run on the chief when training ends.

    The summary names the cluster (workers, replicas), the epochs and steps
    run, the wall time and the last epoch's logs. It is also kept in
    `summary` (a dict) on every worker.

    Args:
        print_fn: callable or None. Called with the summary text on the
            chief; defaults to `absl.logging.info`.

    Example:

    ```python
    model.fit(ds, epochs=3, callbacks=[kd.callbacks.RunSummary()])
    ```
    """

    def __init__(self, print_fn=None):
        super().__init__()
        self.print_fn = print_fn
        self.summary: dict[str, Any] = {}

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()
        self._steps = 0
        self._epochs = 0
        self._last_logs: dict = {}

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        self._epochs += 1
        self._last_logs = dict(logs or {})

    def on_train_end(self, logs=None):
        task = cluster_lib.from_env()
        strategy = getattr(self.model, "distribute_strategy", None)
        final = {}
        for k, v in self._last_logs.items():
            try:
                final[k] = float(np.asarray(v))
            except (TypeError, ValueError):
                continue
        self.summary = {
            "workers": task.num_workers,
            "replicas": getattr(strategy, "num_replicas_in_sync", 1),
            "epochs": self._epochs,
            "steps": self._steps,
            "seconds": round(time.perf_counter() - self._start, 3),
            "final": final,
        }
        if not task.is_chief:
            return
        lines = [
            "kerasdist run summary:",
            f"  workers={self.summary['workers']} "
            f"replicas={self.summary['replicas']} "
            f"epochs={self._epochs} steps={self._steps} "
            f"wall={self.summary['seconds']:.1f}s",
        ]
        if final:
            lines.append("  final: " + ", ".join(
                f"{k}={v:.6g}" for k, v in sorted(final.items())
            ))
        text = "\n".join(lines)
        if self.print_fn is not None:
            self.print_fn(text)
        else:
            logging.info("%s", text)

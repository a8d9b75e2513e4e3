"""`kerasdist-run`: a worker group, on one host or many, restarted when
workers or hosts are lost (elastic with `--min_workers`).

```sh
kerasdist-run --num_workers 2 --max_restarts 3 --log_dir /tmp/logs \\
    --timeout 120 -- python train.py --epochs 10
```

Also `python -m kerasdist.launch ...`, and from Python `kd.launch.run(...)`,
which returns a `RunResult`. See docs/guide/fault_tolerance.md.

Names are loaded on first use (PEP 562), so that `import kerasdist` can
install the worker-side permanent-error hook from `protocol` without
loading the launcher itself.
"""

import importlib as _importlib

_NAMES = {
    "Failure": "results",
    "LauncherError": "spec",
    "RunResult": "results",
    "WorkerSpec": "spec",
    "WorkerState": "results",
    "read_events": "events",
    "run": "agent",
    "main": "cli",
    "options_table": "cli",
    "ENV_HEARTBEAT_FILE": "protocol",
    "ENV_NUM_WORKERS": "protocol",
    "ENV_RESTART_COUNT": "protocol",
    "ENV_WORKER_INDEX": "protocol",
    "PERMANENT_EXIT_CODE": "protocol",
    "RESTART_EXIT_CODE": "protocol",
    "restart_count": "protocol",
}

_RENAMED = {"read_events": "read"}

_SUBMODULES = frozenset({
    "agent", "cli", "events", "goodput", "group", "hosts", "membership",
    "policy",
    "protocol", "results", "spec", "ssh", "supervisor",
})


def __getattr__(name):
    if name in _SUBMODULES:
        return _importlib.import_module(f"kerasdist.launch.{name}")
    if name not in _NAMES:
        raise AttributeError(
            f"module 'kerasdist.launch' has no attribute {name!r}"
        )
    module = _importlib.import_module(f"kerasdist.launch.{_NAMES[name]}")
    value = getattr(module, _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_NAMES)

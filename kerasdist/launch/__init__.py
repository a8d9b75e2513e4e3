"""`kerasdist-run`: a local worker group that restarts lost workers.

```sh
kerasdist-run --num_workers 2 --max_restarts 3 --log_dir /tmp/logs \\
    --timeout 120 -- python train.py --epochs 10
```

Also `python -m kerasdist.launch ...`, and from Python `kd.launch.run(...)`,
which returns a `RunResult`. See docs/guide/fault_tolerance.md.
"""

from kerasdist.launch.agent import (
    Failure,
    LauncherError,
    RunResult,
    WorkerSpec,
    WorkerState,
    run,
)
from kerasdist.launch.cli import main
from kerasdist.launch.protocol import (
    ENV_HEARTBEAT_FILE,
    ENV_NUM_WORKERS,
    ENV_RESTART_COUNT,
    ENV_WORKER_INDEX,
    RESTART_EXIT_CODE,
    restart_count,
)

__all__ = [
    "ENV_HEARTBEAT_FILE",
    "ENV_NUM_WORKERS",
    "ENV_RESTART_COUNT",
    "ENV_WORKER_INDEX",
    "Failure",
    "LauncherError",
    "RESTART_EXIT_CODE",
    "RunResult",
    "WorkerSpec",
    "WorkerState",
    "main",
    "restart_count",
    "run",
]

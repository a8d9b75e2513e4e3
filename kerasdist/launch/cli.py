"""Command line of `kerasdist-run` (and `python -m kerasdist.launch`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kerasdist.launch import agent, protocol

_USAGE = (
    "kerasdist-run --num_workers N [--max_restarts R] [--log_dir D] "
    "[--timeout S] -- COMMAND [ARGS...]"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kerasdist-run",
        usage=_USAGE,
        description=(
            "Run COMMAND as N workers on this host (each with its own "
            "TF_CONFIG on 127.0.0.1) and restart the whole group when a "
            "worker fails, hangs, or exits with the restart code "
            f"{protocol.RESTART_EXIT_CODE}."
        ),
        epilog=(
            "Workers get TF_CONFIG, KERASDIST_RESTART_COUNT, "
            "KERASDIST_WORKER_INDEX, KERASDIST_NUM_WORKERS and "
            "KERASDIST_HEARTBEAT_FILE. Exit status: 0 when all workers "
            "succeeded, else the last failure's."
        ),
    )
    parser.add_argument("--num_workers", type=int, default=1,
                        help="worker processes (default 1)")
    parser.add_argument("--max_restarts", type=int, default=3,
                        help="group restarts after failures or hangs "
                        "(default 3)")
    parser.add_argument("--max_preemptions", type=int, default=100,
                        help="restarts after workers exit with "
                        f"{protocol.RESTART_EXIT_CODE}, not counted in "
                        "--max_restarts (default 100)")
    parser.add_argument("--log_dir", default=None,
                        help="write worker-i.log files here")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds without output or heartbeat before a "
                        "worker counts as hung (default: never)")
    parser.add_argument("--grace_period", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when the "
                        "launcher is stopped (default 10)")
    parser.add_argument("--restart_grace_period", type=float, default=1.0,
                        help="seconds between SIGTERM and SIGKILL for the "
                        "other workers when one failed (default 1)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the worker command, after --")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kerasdist-run`.

    Args:
        argv: list of str or None. Arguments without the program name;
            defaults to `sys.argv[1:]`.

    Returns:
        int. The exit status: 0 when all workers succeeded.

    Example:

    ```python
    main(["--num_workers", "2", "--", "python", "train.py"])
    ```
    """
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error(
            "no worker command given. Put it after --, e.g. "
            "kerasdist-run --num_workers 2 -- python train.py"
        )
    try:
        result = agent.run(
            command,
            num_workers=args.num_workers,
            max_restarts=args.max_restarts,
            max_preemptions=args.max_preemptions,
            log_dir=args.log_dir,
            timeout=args.timeout,
            grace_period=args.grace_period,
            restart_grace_period=args.restart_grace_period,
        )
    except agent.LauncherError as e:
        parser.error(str(e))
    return result.returncode

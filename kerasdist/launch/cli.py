"""Command line of `kerasdist-run` (and `python -m kerasdist.launch`).

The options are `WorkerSpec`'s fields (see `spec`): the parser and the
options table of docs/guide/fault_tolerance.md are generated from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from kerasdist.launch import agent, protocol, spec

_USAGE = (
    "kerasdist-run [--num_workers N | --hosts A[:N],B[:N],...] "
    "[--min_workers M] [--max_restarts R] [--log_dir D] [--timeout S] "
    "[OPTIONS] -- COMMAND [ARGS...]"
)


def _help(field: dataclasses.Field) -> str:
    return (
        f"{field.metadata['help'].replace('`', '')} "
        f"(default: {field.metadata['default_text']})"
    ).replace("%", "%%")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kerasdist-run",
        usage=_USAGE,
        description=(
            "Run COMMAND as N workers on this host, or on the hosts of "
            "--hosts/--hostfile (each with its own TF_CONFIG), and restart "
            "the whole group when a worker fails, hangs, or exits with the "
            "restart code "
            f"{protocol.RESTART_EXIT_CODE}; stop at once when one exits "
            f"with the permanent-error code {protocol.PERMANENT_EXIT_CODE}. "
            "With --min_workers, a host lost for good does not end the "
            "run: the group restarts on the hosts left and grows back "
            "when it returns."
        ),
        epilog=(
            "Workers get TF_CONFIG, KERASDIST_RESTART_COUNT, "
            "KERASDIST_WORKER_INDEX, KERASDIST_NUM_WORKERS and "
            "KERASDIST_HEARTBEAT_FILE. Exit status: 0 when all workers "
            "succeeded, else the last failure's."
        ),
    )
    for field in spec.option_fields():
        parser.add_argument(
            f"--{field.name}",
            type=field.metadata["parse"],
            default=field.default,
            metavar=field.metadata["metavar"],
            help=_help(field),
            action="append" if field.name == "env" else "store",
        )
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the worker command, after --")
    return parser


def options_table() -> str:
    """The Markdown table of `kerasdist-run`'s options, from `WorkerSpec`.

    docs/guide/fault_tolerance.md holds this table; a test checks that it
    is the same.

    Returns:
        str. A Markdown table: option, default, meaning.

    Example:

    >>> options_table().splitlines()[0]
    '| option | default | meaning |'
    """
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for field in spec.option_fields():
        meta = field.metadata
        rows.append(
            f"| `--{field.name} {meta['metavar']}` | {meta['default_text']} "
            f"| {meta['help']} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kerasdist-run`.

    Args:
        argv: list of str or None. Arguments without the program name;
            defaults to `sys.argv[1:]`.

    Returns:
        int. The exit status: 0 when all workers succeeded.

    Raises:
        SystemExit: with status 2 and a message (no traceback) for invalid
            options, a worker command that cannot be run or a `--log_dir`
            that cannot be written, before starting anything.

    Example:

    ```python
    main(["--num_workers", "2", "--", "python", "train.py"])
    ```
    """
    parser = _parser()
    args = vars(parser.parse_args(sys.argv[1:] if argv is None
                                  else list(argv)))
    command = list(args.pop("command"))
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error(
            "no worker command given. Put it after --, e.g. "
            "kerasdist-run --num_workers 2 -- python train.py"
        )
    if args["env"] is not None:
        args["env"] = dict(args["env"])
    try:
        result = agent.run(command, **args)
    except spec.LauncherError as e:
        parser.error(str(e))
    return result.returncode

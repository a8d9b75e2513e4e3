"""tests/fault_worker.py under SLURM, leaving through the restart contract.

Until `BackupAndRestore` calls `protocol.exit_for_restart()` itself, its
"saved, restart me" exit (SystemExit 75) is turned into that call here, so
the SLURM tests exercise the contract: signal -> save -> exit_for_restart
(-> `scontrol requeue`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fault_worker  # noqa: E402

from kerasdist.launch import protocol  # noqa: E402

if __name__ == "__main__":
    try:
        code = fault_worker.main()
    except SystemExit as e:
        if e.code == protocol.RESTART_EXIT_CODE:
            protocol.exit_for_restart()
        raise
    sys.exit(code)

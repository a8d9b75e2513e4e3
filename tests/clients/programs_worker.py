"""One worker of the ten-program test, run by `kerasdist-run`.

    kerasdist-run --num_workers 2 -- python programs_worker.py OUT

Runs every program of `programs.py` in turn under one
`kd.get_strategy("multi_worker")` and writes `NAME-workerRANK.npz` into
OUT (or `NAME-workerRANK.json` with the error a program raised), so one
launch covers all of them.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402


def main(out):
    import kerasdist as kd

    strategy = kd.get_strategy("multi_worker", timeout_seconds=120)
    import programs

    rank = kd.cluster.from_env().worker_rank
    for name in programs.PROGRAMS:
        try:
            result = programs.run(name, strategy)
        except Exception as e:  # noqa: BLE001 (recorded for the test)
            with open(os.path.join(out, f"{name}-worker{rank}.json"),
                      "w") as f:
                json.dump({"type": type(e).__name__, "message": str(e)}, f)
            raise
        np.savez(os.path.join(out, f"{name}-worker{rank}.npz"), **result)


if __name__ == "__main__":
    main(sys.argv[1])

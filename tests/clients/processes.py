"""Running a client program (a worker, or `kerasdist-run`) and its log."""

import os
import subprocess
import sys

from kerasdist.testing import kill_group

HERE = os.path.dirname(os.path.abspath(__file__))


def env():
    """The environment for a program using this checkout's kerasdist."""
    out = dict(os.environ)
    root = os.path.dirname(os.path.dirname(HERE))
    out["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, out.get("PYTHONPATH")) if p)
    out.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out.pop("TF_CONFIG", None)
    return out


def run_logged(argv, timeout, environ=None):
    """(exit code, stdout + stderr) of `argv`, its process group killed
    on the way out."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env=environ or env())
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return proc.returncode, log


def launch(args, command, timeout):
    """`kerasdist-run ARGS -- python COMMAND...`."""
    return run_logged([sys.executable, "-m", "kerasdist.launch", *args,
                       "--", sys.executable, *command], timeout)

"""Running a client program (a worker, or `kerasdist-run`) and its log."""

import os
import subprocess
import sys
import tempfile
import time

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


def _launch_argv(args, command):
    """The argv of `kerasdist-run ARGS -- python COMMAND...`."""
    return [sys.executable, "-m", "kerasdist.launch", *args, "--",
            sys.executable, *command]


def launch(args, command, timeout):
    """`kerasdist-run ARGS -- python COMMAND...`."""
    return run_logged(_launch_argv(args, command), timeout)


class Background:
    """`kerasdist-run ARGS -- python COMMAND...` started now and waited for
    later (`result`), so a test module's in-process work (one device's
    results) runs while the workers start and train. Its output goes to
    a temporary file (no pipe to fill while nobody reads it).

    Args:
        args: list of str. The launcher's options.
        command: list of str. The worker script and its arguments.
        timeout: float. Seconds from now for the whole launch.
    """

    def __init__(self, args, command, timeout):
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.proc = subprocess.Popen(
            _launch_argv(args, command),
            stdout=self._log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env=env())

    def result(self):
        """Waits for the launch: (exit code, its whole output).

        Raises:
            AssertionError: with the output's tail if it did not end
                within its timeout (its process group is killed then).
        """
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"kerasdist-run did not end within {self.timeout:g}s:\n"
                f"{self._output()[-8000:]}") from None
        return self.proc.returncode, self._output()

    def _output(self):
        self._log.seek(0)
        return self._log.read()

    def stop(self):
        """Kills the launch's process group if it still runs."""
        kill_group(self.proc)

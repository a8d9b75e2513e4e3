"""Shared benchmark plumbing: interleaved ratios, environment, JSON results.

Protocol (../shared/BENCHMARKS.md): ratios measured side by side in one run,
interleaved A B A B ..., >= 5 rounds, median of per-round ratios with min and
max; warm-up excluded; say what was measured.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = str(Path(__file__).resolve().parent.parent)
REPLY_PREFIX = "RESULT "


class RequestProcess:
    """A long-lived benchmark process that answers JSON requests.

    It reads one JSON request per line on stdin and answers each with a
    `RESULT {json}` line on stdout; its stderr goes to a temporary log that
    is shown if it dies. It runs in a process group of its own, killed if it
    does not exit within 30 s of `close()`.

    Args:
        role: str. Names the process in error messages.
        command: list of str. The program and its arguments.
        env: dict or None. Its environment. Defaults to this process's.
    """

    def __init__(self, role: str, command: list[str], env: dict | None = None):
        self.role = role
        # Closed in close(): it outlives this call.
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, cwd=ROOT, env=env,
            start_new_session=True,
        )

    def send(self, request: dict) -> None:
        """Sends one request without waiting for its answer."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict:
        """The next answer; raises with the log's tail if the process died."""
        for line in self.proc.stdout:
            if line.startswith(REPLY_PREFIX):
                return json.loads(line[len(REPLY_PREFIX):])
        self.log.seek(0)
        tail = self.log.read()[-3000:]
        raise RuntimeError(
            f"{self.role} exited with code {self.proc.wait()}:\n{tail}"
        )

    def request(self, request: dict) -> dict:
        """Sends `request` and returns its answer."""
        self.send(request)
        return self.reply()

    def close(self) -> None:
        """Ends the process (stdin closed, then its group killed if needed)."""
        from kerasdist.testing import kill_group

        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_group(self.proc)
        self.log.close()


def environment(**extra) -> dict:
    """What was measured on: versions, cores, plus benchmark specifics."""
    import keras
    import tensorflow as tf

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
    }


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), or the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratio_stats(ratios: list[float]) -> dict:
    """Median, min and max of per-round ratios."""
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
        "per_round": ratios,
    }


def interleaved(
    a: Callable[[], float],
    b: Callable[[], float],
    rounds: int = 5,
) -> tuple[dict, list[float], list[float]]:
    """Runs a, b, a, b, ... `rounds` times; each returns a measured time.

    Returns:
        (stats of b/a per round, a's times, b's times).
    """
    ta, tb = [], []
    for i in range(rounds):
        # Alternate who goes first so drift favours neither.
        if i % 2:
            tb.append(b())
            ta.append(a())
        else:
            ta.append(a())
            tb.append(b())
    return ratio_stats([y / x for x, y in zip(ta, tb, strict=True)]), ta, tb


def write_result(name: str, result: dict) -> Path:
    """Writes benchmarks/results/NAME.json and returns its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def run_worker_script(script: str, args: list[str], num_workers: int = 2,
                      timeout: float = 300) -> dict:
    """Runs `script --worker --out FILE *args` as real workers on 127.0.0.1.

    The chief writes its measurements as JSON to FILE; returns them.
    """
    import tempfile

    from kerasdist.testing import run_workers

    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        run_workers(
            [os.path.abspath(script), "--worker", "--out", out, *args],
            num_workers, timeout=timeout,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)

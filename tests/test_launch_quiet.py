"""kerasdist-run keeps TensorFlow's C++ start-up lines off its console.

The filter is tested on its own (no process), then on a real worker that
imports TensorFlow: the console shows the worker's own lines but not the
start-up notices, which the worker's log file still holds.
"""

import os
import subprocess
import sys

from kerasdist.launch import quiet

NOISE = [
    "[worker-0] WARNING: All log messages before absl::InitializeLog() is "
    "called are written to STDERR\n",
    "[worker-0] I0000 00:00:1 123 port.cc:153] oneDNN custom operations "
    "are on. You may see slightly different numerical results\n",
    "[worker-0] W0000 00:00:1 123 cudart_stub.cc:31] Could not find cuda "
    "drivers on your machine, GPU will not be used.\n",
    "[worker-0] E0000 00:00:1 123 cuda_platform.cc:52] failed call to "
    "cuInit: INTERNAL: CUDA error\n",
    "[worker-0] I0000 00:00:1 123 cpu_feature_guard.cc:210] This "
    "TensorFlow binary is optimized to use available CPU instructions\n",
    "[worker-0] To enable the following instructions: AVX2 FMA, in other "
    "operations, rebuild TensorFlow with the appropriate compiler flags.\n",
]


def test_filter_drops_only_the_start_up_lines():
    out = []
    keep = "[worker-0] Traceback (most recent call last):\n"
    quiet.StartupFilter(out.append)("".join(NOISE) + keep)
    assert out == [keep]


def test_cuinit_error_shows_when_a_driver_exists():
    # Without the "no driver" line first, a failed cuInit is a real error.
    out = []
    quiet.StartupFilter(out.append)(NOISE[3])
    assert out == [NOISE[3]]


def test_verbose_shows_everything():
    out = []
    write = quiet.console_writer(out.append, {"KERASDIST_VERBOSE": "1"})
    write("".join(NOISE))
    assert out == ["".join(NOISE)]


def test_real_worker_console_is_quiet_and_its_log_complete(tmp_path):
    env = dict(os.environ)
    env.pop("KERASDIST_VERBOSE", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    code = ("import tensorflow as tf; tf.constant(1.0) + 1; "
            "print('worker says hello', flush=True)")
    done = subprocess.run(
        [sys.executable, "-m", "kerasdist.launch", "--log_dir",
         str(tmp_path), "--", sys.executable, "-c", code],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[worker-0] worker says hello" in done.stdout, done.stdout
    with open(tmp_path / "worker-0.log") as f:
        log = f.read()
    noisy = [line for line in log.splitlines() if quiet.is_noise(line)]
    assert noisy, f"TensorFlow printed no start-up line here:\n{log}"
    for line in noisy:
        assert line.strip() not in done.stdout, (
            f"start-up line on the console: {line!r}\n{done.stdout}")

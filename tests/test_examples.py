"""Runs every example for a few steps, alone and under `kerasdist-run`.

Each example is a separate process (its own absl flags and TensorFlow
devices), bounded by a timeout; on timeout its whole process group is
killed. Alone, examples run on 2 virtual CPUs (mirrored), on generated data
or on `tfds.testing.mock_data` (the real `tfds.load` code path, with random
examples and no download). Under the launcher they run as 2 workers
(multi-worker mirrored) on 127.0.0.1.
"""

import os
import re
import subprocess
import sys

import pytest

from kerasdist.testing import kill_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

# Runs an example inside tfds.testing.mock_data: tfds.load returns random
# examples of the dataset's real features, without downloading.
MOCK_TFDS = """
import os, runpy, sys
import tensorflow_datasets as tfds
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))  # as `python script.py` does
with tfds.testing.mock_data(num_examples=int({num_examples})):
    runpy.run_path(script, run_name="__main__")
"""

pytestmark = pytest.mark.slow


def run(argv, timeout, env=None):
    """Runs argv in its own process group; returns (returncode, output)."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    full_env.pop("TF_CONFIG", None)
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, grace=2.0)
        out, _ = proc.communicate()
        pytest.fail(f"{argv} timed out after {timeout}s:\n{out[-4000:]}")
    finally:
        kill_group(proc, grace=1.0)
    return proc.returncode, out


def example(name, *args, mock_examples=None):
    script = os.path.join(EXAMPLES, name)
    if mock_examples is None:
        return [sys.executable, script, *args]
    code = MOCK_TFDS.format(num_examples=mock_examples)
    return [sys.executable, "-c", code, script, *args]


def result_line(output, prefix=""):
    lines = [
        line for line in output.splitlines()
        if line.startswith(prefix + "result:")
    ]
    assert len(lines) == 1, f"expected one result line:\n{output[-4000:]}"
    return lines[0]


def accuracy(line):
    return float(re.search(r"test accuracy ([0-9.]+)", line).group(1))


def check_ok(code, out):
    assert code == 0, f"exit status {code}:\n{out[-6000:]}"


@pytest.mark.timeout(120)
def test_mnist_synthetic_learns_on_two_virtual_cpus():
    code, out = run(example(
        "mnist.py", "--num_virtual_cpus=2", "--num_examples=1024",
        "--epochs=2",
    ), timeout=110)
    check_ok(code, out)
    line = result_line(out)
    assert "2 replica(s)" in line
    assert accuracy(line) > 0.5, line  # chance is 0.1


@pytest.mark.timeout(120)
def test_mnist_tfds_code_path_with_mock_data():
    code, out = run(example(
        "mnist.py", "--dataset=mnist", "--num_virtual_cpus=2", "--epochs=1",
        "--steps_per_epoch=2", mock_examples=128,
    ), timeout=110)
    check_ok(code, out)
    assert "dataset mnist" in result_line(out)


@pytest.mark.timeout(60)
def test_bad_flag_fails_before_training_with_clear_message():
    code, out = run(example("mnist.py", "--epochs=0"), timeout=50)
    assert code != 0
    assert "Received: epochs=0. Expected a positive integer" in out
    assert "Epoch 1" not in out


@pytest.mark.timeout(150)
def test_cifar10_resnet_with_warmup_and_backup(tmp_path):
    code, out = run(example(
        "cifar10_resnet.py", "--num_virtual_cpus=2", "--num_examples=512",
        "--epochs=1", "--warmup_steps=4", f"--model_dir={tmp_path}",
        "--backup_freq=4",
    ), timeout=140)
    check_ok(code, out)
    line = result_line(out)
    assert "2 replica(s)" in line and "warm-up 4 steps" in line
    assert (tmp_path / "resnet.weights.h5").is_file()
    assert (tmp_path / "backup").is_dir()


@pytest.mark.timeout(150)
def test_cifar10_tfds_code_path_with_mock_data():
    code, out = run(example(
        "cifar10_resnet.py", "--dataset=cifar10", "--epochs=1",
        "--steps_per_epoch=2", "--warmup_steps=0", mock_examples=128,
    ), timeout=140)
    check_ok(code, out)
    assert "dataset cifar10" in result_line(out)


@pytest.mark.timeout(120)
def test_custom_training_loop_learns_on_two_virtual_cpus():
    code, out = run(example(
        "custom_training_loop.py", "--num_virtual_cpus=2",
        "--num_examples=1024", "--epochs=2",
    ), timeout=110)
    check_ok(code, out)
    line = result_line(out)
    assert "2 replica(s)" in line and "on 256 examples" in line
    assert accuracy(line) > 0.5, line


@pytest.mark.timeout(150)
def test_pipeline_transformer_on_two_virtual_cpus():
    code, out = run(example(
        "pipeline_transformer.py", "--num_virtual_cpus=2",
        "--num_examples=512", "--epochs=2",
    ), timeout=140)
    check_ok(code, out)
    line = result_line(out)
    assert "2 stage(s)" in line
    assert accuracy(line) > 0.6, line  # chance is 0.5


@pytest.mark.timeout(120)
def test_pipeline_transformer_tfds_code_path_with_mock_data():
    code, out = run(example(
        "pipeline_transformer.py", "--dataset=imdb_reviews", "--epochs=1",
        "--steps_per_epoch=2", mock_examples=256,
    ), timeout=110)
    check_ok(code, out)
    assert "dataset imdb_reviews" in result_line(out)


def launcher(num_workers=2):
    try:
        import kerasdist.launch  # noqa: F401
    except ImportError:
        pytest.skip("kerasdist.launch (kerasdist-run) not available")
    return [sys.executable, "-m", "kerasdist.launch", "--num_workers",
            str(num_workers), "--max_restarts", "0", "--"]


@pytest.mark.timeout(200)
def test_pipeline_across_workers_under_launcher():
    code, out = run([*launcher(3), *example(
        "pipeline_across_workers.py", "--num_examples=1024", "--epochs=2",
    )], timeout=190)
    check_ok(code, out)
    line = result_line(out, prefix="[worker-0] ")
    assert "2 stage(s) on ['/job:worker/replica:0/task:1', " in line, line
    assert accuracy(line) > 0.5, line
    assert "model-parallel server exits 0: the chief finished." in out


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    "script, args",
    [
        ("mnist.py", ["--num_examples=512", "--epochs=1"]),
        ("custom_training_loop.py", ["--num_examples=512", "--epochs=1"]),
        ("cifar10_resnet.py",
         ["--num_examples=512", "--epochs=1", "--warmup_steps=2"]),
        ("pipeline_transformer.py", ["--num_examples=512", "--epochs=1"]),
    ],
)
def test_examples_under_launcher_with_two_workers(script, args, tmp_path):
    if script == "cifar10_resnet.py":
        args = [*args, f"--model_dir={tmp_path}", "--backup_freq=2"]
    code, out = run(
        [*launcher(), *example(script, *args)], timeout=190
    )
    check_ok(code, out)
    line = result_line(out, prefix="[worker-0] ")
    assert "2 worker(s)" in line, line
    assert "[worker-1] result:" not in out  # only the chief reports

"""peer_step_time: kerasdist's step time ÷ what users would pick instead.

Two pairs, each measured side by side and interleaved (A B, B A, ...), the
median of per-round ratios reported with min and max (target ≤ 1.0):

- `mwms`: Keras 3 + `kd.MultiWorkerMirroredStrategy` ÷ tf_keras
  (`TF_USE_LEGACY_KERAS=1`) + `tf.distribute.MultiWorkerMirroredStrategy`,
  the fallback Kubeflow and Ray point users to. Two clusters of 2 workers on
  127.0.0.1 stay up for the whole run; one intra-op and one inter-op thread
  per worker (2 workers on 2 cores).
- `jax`: Keras 3 + `kd.MirroredStrategy` over 2 virtual CPUs ÷ Keras 3 on
  JAX with `keras.distribution.DataParallel` over 2 host devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=2`), one process each,
  default thread pools (both sized to the machine's cores). JAX runs in its
  own venv (`make bench-jax-venv`, or `KERASDIST_JAX_PYTHON`); without it
  this pair is skipped with the reason recorded.

Same model (the benchmarks' convnet, width 16), the same 512 random images,
global batch 64, SGD with momentum, each framework's default `compile`
(`steps_per_execution=1`; `jit_compile="auto"`, which is off for TensorFlow
on CPU and on for JAX). Each measurement is one `fit` whose first steps are
a warm-up excluded from the time; every process is warmed up (traced or
compiled) before the first round.

Run: `python -m benchmarks.run peer_step_time [--full]`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import common
from benchmarks.common import RequestProcess

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_ROOT, "benchmarks", "_peer_worker.py")
_PREFIX = common.REPLY_PREFIX
WIDTH, GLOBAL_BATCH, WARMUP = 16, 64, 3
TARGET = 1.0


def _process(role: str, python: str, env: dict) -> RequestProcess:
    """A `_peer_worker.py ROLE` process answering timing requests."""
    return RequestProcess(role, [
        python, _WORKER, role, str(WIDTH), str(GLOBAL_BATCH), str(WARMUP),
    ], env)


class _Group:
    """Processes that train together (a cluster, or a single process)."""

    def __init__(self, processes: list[RequestProcess]):
        self.processes = processes

    def wait_ready(self) -> None:
        for p in self.processes:
            p.reply()

    def step_time(self, steps: int) -> float:
        for p in self.processes:
            p.send({"steps": steps})
        # The chief's (first process's) time; all take part in each step.
        return [p.reply()["seconds"] for p in self.processes][0]

    def close(self) -> None:
        for p in self.processes:
            p.close()


def _base_env() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for name in ("TF_CONFIG", "TF_USE_LEGACY_KERAS", "KERAS_BACKEND",
                 "XLA_FLAGS"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(
        [_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return env


def _cluster(role: str, extra_env: dict) -> _Group:
    from kerasdist import cluster

    config = cluster.make_tf_config(2, 0)
    processes = []
    for i in range(2):
        config["task"]["index"] = i
        env = _base_env()
        env.update(extra_env, TF_CONFIG=json.dumps(config))
        processes.append(_process(role, sys.executable, env))
    return _Group(processes)


def jax_python() -> tuple[str | None, str]:
    """The JAX venv's interpreter, or None and why it is missing."""
    python = os.environ.get("KERASDIST_JAX_PYTHON") or os.path.join(
        _ROOT, ".venv-jax", "bin", "python"
    )
    if not os.path.exists(python):
        return None, (
            f"no JAX interpreter at {python}: run `make bench-jax-venv` or "
            "set KERASDIST_JAX_PYTHON"
        )
    probe = subprocess.run(
        [python, "-c", "import jax, keras; print(jax.__version__, "
         "keras.__version__)"],
        capture_output=True, text=True, timeout=300,
        env=dict(_base_env(), KERAS_BACKEND="jax"),
    )
    if probe.returncode:
        return None, f"{python} cannot import jax and keras: {probe.stderr}"
    return python, probe.stdout.strip()


def _interleave(groups: dict[str, _Group], rounds: int, steps: int) -> dict:
    """Warms every group up, then rounds in rotating order.

    Returns each group's step times by name, one per round.
    """
    for group in groups.values():
        group.wait_ready()
    for group in groups.values():
        group.step_time(steps)  # tracing / compilation and first runs
    names = list(groups)
    times = {name: [] for name in names}
    for r in range(rounds):
        # A B C, B C A, C A B, ...: drift on a shared machine favours none.
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(groups[name].step_time(steps))
    return times


def _ratio(times: dict, num: str, den: str) -> dict:
    return common.ratio_stats(
        [a / b for a, b in zip(times[num], times[den], strict=True)]
    )


def _pair(times: dict, ours: str, peer: str) -> dict:
    stats = _ratio(times, ours, peer)
    return {
        "ratio": stats,
        "kerasdist_seconds_per_step": times[ours],
        "peer_seconds_per_step": times[peer],
        "target": f"<= {TARGET}",
        "meets_target": stats["median"] <= TARGET,
    }


def measure_mwms(rounds: int, steps: int) -> dict:
    groups = {
        "tf_keras": _cluster("tfkeras_mwms", {"TF_USE_LEGACY_KERAS": "1"}),
        "kerasdist": _cluster("kd_mwms", {}),
        "tf_keras_single": _Group([_process(
            "tfkeras_single", sys.executable,
            dict(_base_env(), TF_USE_LEGACY_KERAS="1"),
        )]),
        "keras3_single": _Group(
            [_process("keras3_single", sys.executable, _base_env())]
        ),
    }
    try:
        times = _interleave(groups, rounds, steps)
    finally:
        for group in groups.values():
            group.close()
    result = _pair(times, "kerasdist", "tf_keras")
    # Where a difference comes from: the two trainers with no strategy in
    # one process (one worker's batch and thread), measured in the same
    # rounds. (Keras 3 with the plain TF strategy cannot be the reference:
    # its fit fails on PerReplica inputs, the bug kerasdist works around.)
    result["single_process_no_strategy"] = {
        "keras3_vs_tf_keras": _ratio(times, "keras3_single",
                                     "tf_keras_single"),
        "keras3_seconds_per_step": times["keras3_single"],
        "tf_keras_seconds_per_step": times["tf_keras_single"],
    }
    import tf_keras

    result["peer"] = (
        f"tf_keras {tf_keras.__version__} (TF_USE_LEGACY_KERAS=1) + "
        "tf.distribute.MultiWorkerMirroredStrategy"
    )
    result["kerasdist"] = "Keras 3 + kd.MultiWorkerMirroredStrategy"
    result["setup"] = (
        "2 workers on 127.0.0.1 per cluster, both clusters up for the whole "
        "run; intra_op=1, inter_op=1 threads per worker; DATA auto-shard"
    )
    return result


def measure_jax(rounds: int, steps: int) -> dict:
    python, versions = jax_python()
    if python is None:
        return {"skipped": versions}
    jax_env = dict(
        _base_env(), KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    groups = {
        "jax": _Group([_process("jax_dp", python, jax_env)]),
        "kerasdist": _Group(
            [_process("kd_mirrored", sys.executable, _base_env())]
        ),
    }
    try:
        times = _interleave(groups, rounds, steps)
    finally:
        for group in groups.values():
            group.close()
    result = _pair(times, "kerasdist", "jax")
    jax_version, keras_version = versions.split()
    result["peer"] = (
        f"Keras {keras_version} on JAX {jax_version}, "
        "keras.distribution.DataParallel over 2 host devices"
    )
    result["kerasdist"] = "Keras 3 + kd.MirroredStrategy on 2 virtual CPUs"
    result["setup"] = (
        "one process each, default thread pools; TF: tf.data via "
        "kd.data.distribute; JAX: the same arrays through fit(x, y)"
    )
    return result


def main(full: bool = False) -> dict:
    rounds, steps = (9, 100) if full else (5, 40)
    load_before = os.getloadavg()
    pairs = {
        "mwms": measure_mwms(rounds, steps),
        "jax": measure_jax(rounds, steps),
    }
    load_after = os.getloadavg()
    measured = [p for p in pairs.values() if "ratio" in p]
    return {
        # Headline: the worse of the measured pairs.
        "ratio": max((p["ratio"] for p in measured),
                     key=lambda r: r["median"]),
        "ratio_definition": "kerasdist step time ÷ peer step time; the "
        "larger of the pairs' medians (each pair in `pairs`)",
        "target": f"<= {TARGET} for each pair",
        "meets_target": all(p["meets_target"] for p in measured),
        "pairs": pairs,
        "environment": common.environment(
            model=f"convnet(width={WIDTH}) on 32x32x3, SGD momentum 0.9, "
            "sparse cross-entropy + accuracy",
            global_batch_size=GLOBAL_BATCH, warmup_steps=WARMUP,
            steps_per_measurement=steps, rounds=rounds,
            load_average=[[round(x, 2) for x in load_before],
                          [round(x, 2) for x in load_after]],
            load_note="1/5/15-minute load averages before and after; the "
            "machine is shared, ratios are interleaved",
        ),
    }


if __name__ == "__main__":
    print(json.dumps(main("--full" in sys.argv), indent=2))

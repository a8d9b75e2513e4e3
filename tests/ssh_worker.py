"""Worker script for tests/test_ssh_starter.py, run over ssh.

    python tests/ssh_worker.py MODE [ARGS...]

- `probe ARGS...`: prints one JSON line: working directory, the `KD_*`,
  `TF_CONFIG` and `KERASDIST_*` variables it sees, its arguments, whether it
  leads its own session, and its SIGINT handler.
- `exit N`: exits with status N (`kill` N: SIGKILLs itself).
- `signals PIDFILE`: writes its PID, prints "ready", and on SIGTERM, SIGUSR1
  or SIGINT prints "got SIGNAME" and exits 75.
- `stubborn PIDFILE`: ignores SIGTERM, starts a child in its process group,
  writes "PID CHILD_PID", prints "ready" and sleeps.
- `beat`: prints the heartbeat file it was given, then touches it
  (`protocol.touch_heartbeat`) 4 times, 1 s apart, printing nothing.
- `train OUT`: a tiny MultiWorkerMirroredStrategy fit from `TF_CONFIG`;
  saves `OUT/weights-RANK.npz` (initial and trained weights, replicas).
"""

import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # Whole or absent for the polling test.


def probe(args):
    print(json.dumps({
        "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("KD_", "KERASDIST_")) or k == "TF_CONFIG"},
        "args": args,
        "own_session": os.getsid(0) == os.getpid(),
        "sigint_default": signal.getsignal(signal.SIGINT)
        is signal.default_int_handler,
    }), flush=True)


def signals(pidfile):
    def handler(sig, frame):
        print(f"got {signal.Signals(sig).name}", flush=True)
        sys.exit(75)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, handler)
    _write(pidfile, str(os.getpid()))
    print("ready", flush=True)
    time.sleep(120)
    sys.exit(1)


def stubborn(pidfile):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "300"])  # Same process group.
    _write(pidfile, f"{os.getpid()} {child.pid}")
    print("ready", flush=True)
    time.sleep(300)


def beat():
    from kerasdist.launch import protocol

    print(os.environ.get(protocol.ENV_HEARTBEAT_FILE), flush=True)
    for _ in range(4):
        time.sleep(1.0)
        protocol.touch_heartbeat()


def train(out):
    import keras
    import numpy as np
    import tensorflow as tf

    import kerasdist as kd

    strategy = kd.get_strategy("auto", timeout_seconds=60)
    rank = kd.cluster.from_env().worker_rank
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    initial = model.get_weights()
    rng = np.random.RandomState(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    data = kd.data.distribute(
        tf.data.Dataset.from_tensor_slices((x, y)), strategy,
        global_batch_size=16)
    history = model.fit(data, epochs=3, verbose=0)
    np.savez(
        os.path.join(out, f"weights-{rank}.npz"),
        replicas=strategy.num_replicas_in_sync,
        loss=np.array(history.history["loss"]),
        **{f"initial{i}": w for i, w in enumerate(initial)},
        **{f"trained{i}": w for i, w in enumerate(model.get_weights())},
    )
    print(f"worker {rank} trained", flush=True)


def main(mode, args):
    if mode == "probe":
        probe(args)
    elif mode == "exit":
        if args[0] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(int(args[0]))
    elif mode == "signals":
        signals(args[0])
    elif mode == "stubborn":
        stubborn(args[0])
    elif mode == "beat":
        beat()
    elif mode == "train":
        train(args[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

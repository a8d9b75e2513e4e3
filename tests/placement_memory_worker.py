"""Worker script for the model-parallel memory test.

Every task runs it with `TF_CONFIG` set (tests/test_placement_memory.py
starts each in its own memory cgroup) and calls
`kd.placement.join_cluster()`; the servers stay there. The chief trains a
stack of `LAYERS` Dense(WIDTH, WIDTH) layers with Adam, its stages on
workers 1..K (K = the cluster's size - 1: K = 1 is the unsplit model on
one worker), and writes `DIR/done.json`.

    python tests/placement_memory_worker.py --out DIR
"""

import argparse
import json
import os
import sys

WIDTH = 2048
LAYERS = 16  # 16 × 2048² float32: 256 MiB of weights, 768 MiB with Adam
BATCH = 32
STEPS = 2
MICROBATCHES = 2


def weight_bytes() -> int:
    return LAYERS * WIDTH * WIDTH * 4


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import kerasdist as kd

    devices = kd.placement.join_cluster()  # Stage workers stay here.
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((WIDTH,))]
        + [keras.layers.Dense(WIDTH, use_bias=False) for _ in range(LAYERS)]
    )
    stages = devices[1:]
    pipe = kd.placement.PipelineModel(
        model, stages, num_microbatches=MICROBATCHES
    )
    pipe.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    x = np.random.default_rng(0).normal(size=(BATCH * STEPS, WIDTH))
    x = x.astype("float32")
    pipe.fit(x, x, batch_size=BATCH, epochs=1, verbose=0)
    with open(os.path.join(args.out, "done.json"), "w") as f:
        json.dump({"stages": len(stages), "devices": stages}, f)


if __name__ == "__main__":
    sys.exit(main())

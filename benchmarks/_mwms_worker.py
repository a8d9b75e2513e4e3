"""One worker of the mwms_scaling benchmark (run under TF_CONFIG)."""

import json
import os
import sys

import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(
    int(os.environ.get("KD_BENCH_INTER_OP", "1")))

import keras  # noqa: E402

import kerasdist as kd  # noqa: E402
from benchmarks import _models  # noqa: E402

per_replica_batch, steps, warmup = (int(a) for a in sys.argv[1:4])
strategy = kd.get_strategy("multi_worker")
keras.utils.set_random_seed(0)
with strategy.scope():
    model = _models.compile_for_classification(_models.convnet())
global_batch = per_replica_batch * strategy.num_replicas_in_sync
ds = kd.data.distribute(_models.images(), strategy,
                        global_batch_size=global_batch)
timer = _models.StepTimer(warmup)
model.fit(ds, epochs=1, steps_per_epoch=warmup + steps, verbose=0,
          callbacks=[timer])
if kd.is_chief():
    print("RESULT " + json.dumps({
        "examples_per_second": global_batch / timer.seconds_per_step,
        "replicas": strategy.num_replicas_in_sync,
    }), flush=True)

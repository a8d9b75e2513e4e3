"""Model parallelism: placement plans, layer placement, GPipe pipelines.

Keras 3's `keras.distribution.ModelParallel` works only on JAX; on
TensorFlow this package splits a Sequential or functional model's layers
into a chain of stages (`plan`), puts each stage on a device (`place`) and
runs the stages as a GPipe pipeline over micro-batches (`PipelineModel`),
R such pipelines side by side as data-parallel replicas
(`HybridPipelineModel`),
on local devices or, after `join_cluster()`, on other workers.
"""

from kerasdist.placement.cluster import join_cluster
from kerasdist.placement.hybrid import HybridPipelineModel
from kerasdist.placement.pipeline import PipelineModel
from kerasdist.placement.place import place
from kerasdist.placement.planning import Plan, Stage, plan
from kerasdist.placement.transfer import measure_bandwidth

__all__ = [
    "HybridPipelineModel",
    "PipelineModel",
    "Plan",
    "Stage",
    "join_cluster",
    "measure_bandwidth",
    "place",
    "plan",
]

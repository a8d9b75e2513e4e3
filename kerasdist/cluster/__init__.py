"""Cluster description: where is this process in the training cluster?

`resolve()` answers from, in order, `TF_CONFIG`, SLURM, a Kubernetes Indexed
Job / JobSet, and Ray Train (one module each: `tf_config`, `slurm`,
`kubernetes`, `ray`). `from_env()`, `parse()` and `make_tf_config()` read,
validate and write `TF_CONFIG` itself. Everything is validated up front so a
wrong environment is reported in words before TensorFlow starts a gRPC
server and hangs waiting for a peer that does not exist.
"""

from kerasdist.cluster.kubernetes import from_kubernetes
from kerasdist.cluster.resolver import SOURCES, is_chief, resolve
from kerasdist.cluster.slurm import expand_hostlist, from_slurm
from kerasdist.cluster.tf_config import (
    ClusterConfigError,
    TaskInfo,
    TFConfigError,
    free_ports,
    from_env,
    make_tf_config,
    parse,
)

__all__ = [
    "SOURCES",
    "ClusterConfigError",
    "TFConfigError",
    "TaskInfo",
    "expand_hostlist",
    "free_ports",
    "from_env",
    "from_kubernetes",
    "from_slurm",
    "is_chief",
    "make_tf_config",
    "parse",
    "resolve",
]

"""kd.cluster.resolve() over TF_CONFIG, SLURM, Kubernetes; TF's SLURM
resolver shown wrong where kerasdist's is right."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from kerasdist import cluster
from kerasdist.cluster import slurm
from kerasdist.errors import PermanentError
from kerasdist.launch import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slurm_env(procid, localid, node, nodelist="node[9-10]",
              tasks_per_node="2(x2)", num_tasks="4", **extra):
    """What `srun -N2 -n4` gives a task on node9/node10."""
    return {
        "SLURM_JOB_ID": "41", "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid), "SLURMD_NODENAME": node,
        "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_NUM_TASKS": num_tasks,
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "KERASDIST_PORT_BASE": "12345", **extra,
    }


# (rank, local id, node) as srun -N2 -n4 --distribution=block places them.
BLOCK = [(0, 0, "node9"), (1, 1, "node9"), (2, 0, "node10"),
         (3, 1, "node10")]


def test_hostlist_expander_keeps_slurm_order():
    expand = slurm.expand_hostlist
    assert expand("node[9-10,12]", use_scontrol=False) == [
        "node9", "node10", "node12"]
    assert expand("gpu[08-10],login1", use_scontrol=False) == [
        "gpu08", "gpu09", "gpu10", "login1"]
    assert expand("r[1-2]n[1-2]", use_scontrol=False) == [
        "r1n1", "r1n2", "r2n1", "r2n2"]
    if shutil.which("scontrol"):  # SLURM's own parser agrees.
        assert expand("node[9-10,12]") == ["node9", "node10", "node12"]


@pytest.mark.parametrize("bad", ["node[9-10", "node[a-b]", "node[5-3]", ""])
def test_malformed_hostlist_is_a_clear_error(bad):
    with pytest.raises(cluster.ClusterConfigError, match="hostlist"):
        slurm.expand_hostlist(bad, use_scontrol=False)


def test_slurm_several_tasks_per_node_rank_order_and_ports():
    infos = [cluster.resolve(slurm_env(*t)) for t in BLOCK]
    expected = ["node9:12345", "node9:12346", "node10:12347",
                "node10:12348"]
    for (rank, _, node), info in zip(BLOCK, infos, strict=True):
        assert info.source == "slurm"
        assert info.cluster == {"worker": expected}
        assert info.task_index == rank and info.worker_rank == rank
        # Each task's own address is on the node it really runs on.
        assert info.address.split(":")[0] == node
    assert [i.is_chief for i in infos] == [True, False, False, False]


def test_slurm_cyclic_distribution():
    # srun --distribution=cyclic: ranks go round the nodes.
    placed = [(0, 0, "node9"), (1, 0, "node10"), (2, 1, "node9"),
              (3, 1, "node10")]
    for rank, local, node in placed:
        info = cluster.resolve(slurm_env(
            rank, local, node, SLURM_DISTRIBUTION="cyclic"))
        assert info.address.split(":")[0] == node
    assert info.cluster["worker"][:2] == ["node9:12345", "node10:12346"]


def _tf_slurm_resolver(env, **kwargs):
    """TF's SlurmClusterResolver in a clean subprocess with `env`."""
    code = (
        "import json\n"
        "import tensorflow as tf\n"
        "R = tf.distribute.cluster_resolver.SlurmClusterResolver\n"
        f"r = R(**{kwargs!r})\n"
        "spec = r.cluster_spec().as_dict()\n"
        "print(json.dumps({'spec': spec, 'task': r.get_task_info()}))\n"
    )
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    full.update(env)
    full["PATH"] = "/usr/bin:/bin"  # no nvidia-smi, like a CPU node
    full.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True,
        text=True, timeout=300,
    )


@pytest.mark.slow
def test_tf_slurm_resolver_misplaces_node10_kerasdist_does_not():
    # TF sorts host names as strings: node10 before node9. Rank 0 runs on
    # node9 (SLURMD_NODENAME) but TF gives it node10's address.
    env = slurm_env(0, 0, "node9")
    # Pretend GPUs, since TF cannot be configured without (see below).
    res = _tf_slurm_resolver(env, port_base=12345, gpus_per_node=2,
                             gpus_per_task=1, auto_set_gpu=False)
    assert res.returncode == 0, res.stderr[-2000:]
    tf_view = json.loads(res.stdout.strip().splitlines()[-1])
    tf_workers = tf_view["spec"]["worker"]
    assert tf_workers[0].startswith("node10:"), tf_workers  # wrong node
    ours = cluster.resolve(env)
    assert ours.cluster["worker"][0] == "node9:12345"
    assert ours.address.startswith("node9:")


@pytest.mark.slow
def test_tf_slurm_resolver_fails_on_cpu_only_node_kerasdist_does_not():
    env = slurm_env(1, 1, "node9")
    res = _tf_slurm_resolver(env, port_base=12345)  # default: asks the GPUs
    assert res.returncode != 0
    assert "No such file or directory: 'nvidia-smi'" in res.stderr
    # Saying "no GPUs" does not help either (tensorflow/tensorflow#56894).
    res = _tf_slurm_resolver(env, port_base=12345, gpus_per_node=0)
    assert res.returncode != 0
    assert "range() arg 3 must not be zero" in res.stderr
    info = cluster.resolve(env)
    assert info.num_workers == 4 and info.address == "node9:12346"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"SLURM_STEP_NODELIST": ""},
         "SLURM_STEP_NODELIST is not set, but SLURM_PROCID is"),
        ({"SLURM_STEP_NUM_TASKS": "5"},
         "SLURM_STEP_NUM_TASKS and SLURM_STEP_TASKS_PER_NODE disagree: "
         "SLURM_STEP_NUM_TASKS=5 but the per-node counts [2, 2] sum to 4"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_STEP_NUM_TASKS": "6"},
         "3 count(s) for 2 node(s)"),
        ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 is out of range"),
        ({"SLURM_PROCID": "one"}, "SLURM_PROCID='one'. Expected an integer"),
        ({"SLURM_LOCALID": "0"}, "SLURM_LOCALID='0' contradicts "
         "SLURM_PROCID=1"),
        ({"SLURMD_NODENAME": "node10"}, "SLURMD_NODENAME='node10' "
         "contradicts SLURM_PROCID=1"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2,x"},
         "SLURM_STEP_TASKS_PER_NODE is malformed"),
        ({"SLURM_DISTRIBUTION": "plane=2"},
         "SLURM_DISTRIBUTION is not supported"),
        ({"KERASDIST_PORT_BASE": "80"}, "KERASDIST_PORT_BASE must be"),
    ],
)
def test_bad_slurm_variables_are_named(override, message):
    env = slurm_env(1, 1, "node9")
    env.update(override)
    with pytest.raises(cluster.ClusterConfigError) as err:
        cluster.resolve(env)
    assert message in str(err.value)
    assert isinstance(err.value, PermanentError)


def test_tf_config_wins_over_slurm():
    cfg = cluster.make_tf_config(["127.0.0.1:1000", "127.0.0.1:1001"], 1)
    info = cluster.resolve({**slurm_env(0, 0, "node9"),
                            "TF_CONFIG": json.dumps(cfg)})
    assert info.source == "tf_config" and info.worker_rank == 1


def test_nothing_set_is_one_worker_alone():
    info = cluster.resolve({})
    assert info.source == "single" and not info.is_multi_worker
    assert cluster.is_chief({}) and not cluster.is_chief(
        slurm_env(3, 1, "node10"))


def test_resolve_exports_tf_config_for_tensorflow(monkeypatch):
    for key, value in slurm_env(2, 0, "node10").items():
        monkeypatch.setenv(key, value)
    # setenv first so monkeypatch restores "unset" after resolve() sets it.
    monkeypatch.setenv("TF_CONFIG", "")
    monkeypatch.delenv("TF_CONFIG")
    info = cluster.resolve()
    exported = json.loads(os.environ["TF_CONFIG"])
    assert exported["task"] == {"type": "worker", "index": 2}
    assert cluster.from_env() == info


def test_chief_logs_the_source_once_after_exporting(monkeypatch):
    # The chief under SLURM: resolve() exports TF_CONFIG; later resolves
    # (the strategy's, the callbacks') read it back and still say "slurm",
    # without a second "cluster from tf_config" line. Run in a fresh
    # process: the chief logs once per process.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM", "TF_CONFIG", "KERASDIST"))}
    env.update(slurm_env(0, 0, "node9"), PYTHONPATH=ROOT)
    res = subprocess.run(
        [sys.executable, "-c",
         "from absl import logging; logging.set_verbosity('info')\n"
         "from kerasdist import cluster\n"
         "print([cluster.resolve().source for _ in range(3)])"],
        env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['slurm', 'slurm', 'slurm']"
    lines = [line for line in res.stderr.splitlines()
             if "kerasdist: cluster from" in line]
    assert len(lines) == 1 and "cluster from slurm: 4 worker(s)" in lines[0], (
        res.stderr)


# ------------------------------------------------------------ Kubernetes


def pod_env(index, hostname=None, **extra):
    """The environment a JobSet pod (deploy/kubernetes/jobset.yaml) gets."""
    return {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "HOSTNAME": hostname or f"mnist-workers-0-{index}",
        "JOB_COMPLETION_INDEX": str(index),
        "KERASDIST_NUM_WORKERS": "3",
        "KERASDIST_K8S_SUBDOMAIN": "mnist",
        **extra,
    }


def test_jobset_pod_resolves_stable_host_names():
    infos = [cluster.resolve(pod_env(i)) for i in range(3)]
    expected = [f"mnist-workers-0-{i}.mnist:2222" for i in range(3)]
    for i, info in enumerate(infos):
        assert info.source == "kubernetes"
        assert info.cluster == {"worker": expected}
        assert info.worker_rank == i
    assert [i.is_chief for i in infos] == [True, False, False]


def test_indexed_job_pod_and_port():
    info = cluster.resolve(pod_env(1, "train-1", KERASDIST_K8S_PORT="3000"))
    assert info.cluster["worker"][2] == "train-2.mnist:3000"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"KERASDIST_NUM_WORKERS": ""}, "KERASDIST_NUM_WORKERS is not set"),
        ({"KERASDIST_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "2",
          "HOSTNAME": "mnist-workers-0-2"},
         "JOB_COMPLETION_INDEX=2 is out of range for KERASDIST_NUM_WORKERS=2"),
        ({"JOB_COMPLETION_INDEX": "-1"},
         "JOB_COMPLETION_INDEX='-1'. Expected an integer >= 0"),
        ({"HOSTNAME": "mnist-workers-0-7"},
         "does not end with '-1' (JOB_COMPLETION_INDEX=1)"),
        ({"KERASDIST_K8S_SUBDOMAIN": ""}, "KERASDIST_K8S_SUBDOMAIN must"),
        ({"KERASDIST_K8S_PORT": "99999"}, "KERASDIST_K8S_PORT must"),
    ],
)
def test_bad_pod_variables_are_named(override, message):
    env = pod_env(1)
    env.update(override)
    with pytest.raises(cluster.ClusterConfigError) as err:
        cluster.resolve(env)
    assert message in str(err.value)


# ------------------------------------------------- restart exit code mapping


def test_engine_detection():
    assert protocol.restart_engine({}) == "kerasdist-run"
    assert protocol.restart_engine(slurm_env(0, 0, "node9")) == "slurm"
    assert protocol.restart_engine(pod_env(0)) == "kubernetes"
    launcher = {**slurm_env(0, 0, "node9"), "KERASDIST_WORKER_INDEX": "0"}
    assert protocol.restart_engine(launcher) == "kerasdist-run"
    with pytest.raises(ValueError, match="KERASDIST_ENGINE='k8s'"):
        protocol.restart_engine({"KERASDIST_ENGINE": "k8s"})


def _exit_code_in(env):
    """Runs exit_for_restart() in a real process with `env`."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM", "KUBERNETES", "KERASDIST"))}
    full.update(env, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c",
         "from kerasdist.launch import protocol; protocol.exit_for_restart()"],
        env=full, capture_output=True, text=True, timeout=120,
    )


def test_exit_codes_per_engine_in_real_processes():
    assert _exit_code_in({}).returncode == 75
    assert _exit_code_in(pod_env(1)).returncode == 143
    res = _exit_code_in(pod_env(1, KERASDIST_K8S_RESTART_EXIT_CODE="200"))
    assert res.returncode == 200
    res = _exit_code_in(pod_env(1, KERASDIST_K8S_RESTART_EXIT_CODE="75"))
    assert res.returncode == 1
    assert "Expected an exit code in [128, 255]" in res.stderr
    # SLURM, not requeueable (no such job here): the batch loop's code.
    res = _exit_code_in({**slurm_env(0, 0, "node9"),
                         "KERASDIST_SLURM_REQUEUE": "0"})
    assert res.returncode == 75


# ------------------------------------------------------------- SLURM ports


def test_slurm_ports_from_the_step_reservation():
    # srun --resv-ports=4: the same reserved ports on both nodes; one per
    # rank, so tasks of emulated nodes on one machine differ too.
    extra = {"KERASDIST_PORT_BASE": "", "SLURM_STEP_RESV_PORTS": "28100-28103"}
    info = cluster.resolve(slurm_env(2, 0, "node10", **extra))
    assert info.cluster["worker"] == [
        "node9:28100", "node9:28101", "node10:28102", "node10:28103"]
    # Fewer ports than tasks: the task's slot on its node.
    extra["SLURM_STEP_RESV_PORTS"] = "28100,28105"
    info = cluster.resolve(slurm_env(2, 0, "node10", **extra))
    assert info.cluster["worker"] == [
        "node9:28100", "node9:28105", "node10:28100", "node10:28105"]
    extra["SLURM_STEP_RESV_PORTS"] = "28100"
    with pytest.raises(cluster.ClusterConfigError,
                       match="reserves 1 port.*srun --resv-ports=4"):
        cluster.resolve(slurm_env(2, 0, "node10", **extra))


def test_slurm_default_ports_differ_for_jobs_25_ids_apart():
    # The old default (15000 + (id % 25) * 2000 + rank) gave jobs 41 and 66
    # the same ports.
    def ports(job_id):
        env = slurm_env(0, 0, "node9", KERASDIST_PORT_BASE="",
                        SLURM_JOB_ID=str(job_id))
        return {w.split(":")[1] for w in cluster.resolve(env).cluster[
            "worker"]}

    assert ports(41).isdisjoint(ports(66))
    assert len(ports(41)) == 4
    assert all(20000 <= int(p) < 60000 for p in ports(10**9 + 7))

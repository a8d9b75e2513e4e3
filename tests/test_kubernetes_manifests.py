"""deploy/kubernetes/: every manifest validates against the upstream schemas
kept in the repo, and agrees with what kerasdist reads in the pod (the
resolver) and writes on exit (the restart exit code)."""

import json
import os
import subprocess
import sys

import jsonschema
import pytest
import yaml

from kerasdist import cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
SCHEMAS = {
    ("jobset.x-k8s.io/v1alpha2", "JobSet"):
        "jobset.x-k8s.io_v1alpha2_jobset.json",
    ("kubeflow.org/v1", "TFJob"): "kubeflow.org_v1_tfjob.json",
    ("batch/v1", "Job"): "batch_v1_job.json",
    ("v1", "Service"): "v1_service.json",
}
MANIFESTS = ["jobset.yaml", "indexed-job.yaml", "tfjob.yaml"]


def load(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def schema_for(doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in SCHEMAS, f"no schema kept for {key}"
    with open(os.path.join(DEPLOY, "schemas", SCHEMAS[key])) as f:
        return json.load(f)


def validate(doc):
    schema = schema_for(doc)
    jsonschema.validators.validator_for(schema)(schema).validate(doc)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_upstream_schema(name):
    docs = load(name)
    assert docs
    for doc in docs:
        validate(doc)


def test_schema_rejects_a_wrong_manifest():
    # The schemas are strict enough to catch a typo in the failure policy.
    doc = load("jobset.yaml")[0]
    doc["spec"]["failurePolicy"]["rules"][1]["action"] = "RestartJobSetNow"
    with pytest.raises(jsonschema.ValidationError, match="RestartJobSetNow"):
        validate(doc)
    job = load("indexed-job.yaml")[1]
    job["spec"]["completionMode"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate(job)


def container_env(pod_spec):
    (container,) = pod_spec["containers"]
    return container, {e["name"]: e["value"] for e in container["env"]}


def restart_codes(policy, action):
    return {
        code
        for rule in policy["rules"]
        if rule["action"] == action and "onExitCodes" in rule
        for code in rule["onExitCodes"]["values"]
    }


def exit_code_in(env):
    """The exit code of a real process that saved and asks for a restart."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM", "KUBERNETES", "KERASDIST"))}
    full.update(env, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c",
         "from kerasdist.launch import protocol; protocol.exit_for_restart()"],
        env=full, capture_output=True, timeout=120,
    ).returncode


def pod_envs(job_spec, env, hostname):
    """The environment each pod of an Indexed Job really gets."""
    return [
        {
            **env,
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
            "JOB_COMPLETION_INDEX": str(i),
            "HOSTNAME": hostname(i),
        }
        for i in range(job_spec["completions"])
    ]


def test_jobset_pods_resolve_and_restart_code_matches_policy():
    (jobset,) = load("jobset.yaml")
    spec = jobset["spec"]
    name = jobset["metadata"]["name"]
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    container, env = container_env(pod)
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    assert job["completions"] == job["parallelism"] == int(
        env["KERASDIST_NUM_WORKERS"])
    assert spec["network"]["subdomain"] == env["KERASDIST_K8S_SUBDOMAIN"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    port = container["ports"][0]["containerPort"]
    envs = pod_envs(job, env, lambda i: f"{name}-{rjob['name']}-0-{i}")
    infos = [cluster.resolve(e) for e in envs]
    hosts = [f"{name}-{rjob['name']}-0-{i}.{name}:{port}"
             for i in range(job["completions"])]
    assert [i.source for i in infos] == ["kubernetes"] * len(hosts)
    assert all(i.cluster == {"worker": hosts} for i in infos)
    assert [i.worker_rank for i in infos] == list(range(len(hosts)))
    # "Saved, restart me" exits with the code the podFailurePolicy fails
    # the Job for, and the JobSet restarts without spending maxRestarts.
    code = exit_code_in(envs[1])
    assert code >= 128
    assert code in restart_codes(job["podFailurePolicy"], "FailJob")
    rules = spec["failurePolicy"]["rules"]
    restart = [r for r in rules
               if r["action"] == "RestartJobSetAndIgnoreMaxRestarts"]
    assert restart and restart[0]["onJobFailureReasons"] == [
        "PodFailurePolicy"]
    permanent = [r for r in rules if r["action"] == "FailJobSet"]
    assert "exit code 78" in permanent[0]["onJobFailureMessagePatterns"][0]
    assert rules.index(permanent[0]) < rules.index(restart[0])


def test_indexed_job_pods_resolve_and_restart_code_is_ignored():
    service, job = load("indexed-job.yaml")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container, env = container_env(pod)
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"] == env[
        "KERASDIST_K8S_SUBDOMAIN"]
    assert spec["completions"] == int(env["KERASDIST_NUM_WORKERS"])
    name = job["metadata"]["name"]
    envs = pod_envs(spec, env, lambda i: f"{name}-{i}")
    info = cluster.resolve(envs[0])
    port = container["ports"][0]["containerPort"]
    assert info.cluster["worker"] == [
        f"{name}-{i}.{pod['subdomain']}:{port}"
        for i in range(spec["completions"])]
    code = exit_code_in(envs[0])
    assert code in restart_codes(spec["podFailurePolicy"], "Ignore")
    assert 78 in restart_codes(spec["podFailurePolicy"], "FailJob")


def test_tfjob_restart_code_is_retried_by_exit_code_policy():
    (tfjob,) = load("tfjob.yaml")
    worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"
    container, env = container_env(worker["template"]["spec"])
    assert container["name"] == "tensorflow"  # TFJob requires this name
    # TFJob sets TF_CONFIG in each pod; kerasdist reads it first.
    tf_config = {"cluster": {"worker": [
        f"mnist-worker-{i}.default.svc:2222" for i in range(2)]},
        "task": {"type": "worker", "index": 1}}
    pod = {**env, "KUBERNETES_SERVICE_HOST": "10.96.0.1",
           "TF_CONFIG": json.dumps(tf_config)}
    info = cluster.resolve(pod)
    assert info.source == "tf_config" and info.worker_rank == 1
    # training-operator's IsRetryableExitCode: only codes >= 128 restart.
    assert exit_code_in(pod) >= 128

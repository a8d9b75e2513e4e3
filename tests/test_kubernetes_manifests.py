"""deploy/kubernetes/ and deploy/docker/: every manifest validates strictly
against the schemas kept in the repo for every Kubernetes minor kerasdist
claims; each manifest's failure policy, evaluated the way Kubernetes and
JobSet evaluate it, does what kerasdist.launch.protocol's exit codes mean;
the pods resolve their cluster; and the Dockerfile's steps, run in a
virtualenv (there is no Docker here), give the image the manifests run.

Not run here: a Kubernetes cluster, JobSet or training-operator
controllers, and `docker build` itself.
"""

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv

import jsonschema
import pytest
import yaml

from kerasdist import cluster
from kerasdist.launch import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
SCHEMAS = os.path.join(DEPLOY, "schemas")
DOCKERFILE = os.path.join(ROOT, "deploy", "docker", "Dockerfile")
sys.path.insert(0, SCHEMAS)
from update import VERSIONS  # noqa: E402

MANIFESTS = ["jobset.yaml", "indexed-job.yaml", "tfjob.yaml", "pvc.yaml"]
# Kinds of Kubernetes itself: validated against each minor's schema.
CORE = {("batch/v1", "Job"): "job-batch-v1",
        ("v1", "Service"): "service-v1",
        ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1"}
# Custom resources: their project's CRD schema, made strict; the Kubernetes
# objects inside them against each minor's schema.
CRDS = {("jobset.x-k8s.io/v1alpha2", "JobSet"):
        "jobset.x-k8s.io_v1alpha2_jobset.json",
        ("kubeflow.org/v1", "TFJob"): "kubeflow.org_v1_tfjob.json"}


def load(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def read_schema(path):
    with open(path) as f:
        return json.load(f)


def strict(schema):
    """Unknown fields rejected, as `kubectl apply --validate=strict` does:
    every object with properties and no rule of its own for others gets
    `additionalProperties: false` (what kubeconform's -strict does to CRD
    schemas)."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def check(schema, doc):
    jsonschema.validators.validator_for(schema)(schema).validate(doc)


def core_schema(version, kind):
    return read_schema(os.path.join(SCHEMAS, f"v{version}", f"{kind}.json"))


def validate(doc, version):
    """Validates `doc` as a cluster of Kubernetes `version` would."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CORE:
        check(core_schema(version, CORE[key]), doc)
        return
    assert key in CRDS, f"no schema kept for {key}"
    check(strict(read_schema(os.path.join(SCHEMAS, CRDS[key]))), doc)
    if key[1] == "JobSet":
        for rjob in doc["spec"]["replicatedJobs"]:
            check(core_schema(version, "jobspec-batch-v1"),
                  rjob["template"]["spec"])
    else:
        for replica in doc["spec"]["tfReplicaSpecs"].values():
            check(core_schema(version, "podtemplatespec-v1"),
                  replica["template"])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_strictly_valid_for_each_kubernetes_minor(name, version):
    docs = load(name)
    assert docs
    for doc in docs:
        validate(doc, version)


def test_schemas_reject_wrong_manifests():
    # Strict enough to catch a typo, an unknown field, a missing field.
    doc = load("jobset.yaml")[0]
    doc["spec"]["failurePolicy"]["rules"][1]["action"] = "RestartJobSetNow"
    with pytest.raises(jsonschema.ValidationError, match="RestartJobSetNow"):
        validate(doc, VERSIONS[0])
    job = load("indexed-job.yaml")[1]
    job["spec"]["completionMode"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate(job, VERSIONS[0])
    job = load("indexed-job.yaml")[1]
    job["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    with pytest.raises(jsonschema.ValidationError, match="comand"):
        validate(job, VERSIONS[-1])
    # Before Kubernetes 1.35 onPodConditions[].status is required.
    job = load("indexed-job.yaml")[1]
    del job["spec"]["podFailurePolicy"]["rules"][1]["onPodConditions"][0][
        "status"]
    with pytest.raises(jsonschema.ValidationError, match="status"):
        validate(job, VERSIONS[0])
    pod = load("jobset.yaml")[0]["spec"]["replicatedJobs"][0]
    pod["template"]["spec"]["template"]["spec"]["volumes"][0]["pvc"] = {}
    with pytest.raises(jsonschema.ValidationError, match="pvc"):
        check(core_schema(VERSIONS[0], "jobspec-batch-v1"),
              pod["template"]["spec"])


def test_volume_is_the_read_write_many_claim_of_pvc_yaml():
    (pvc,) = load("pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in MANIFESTS[:3]:
        for pod in pod_specs(name):
            claims = {v["persistentVolumeClaim"]["claimName"]
                      for v in pod["volumes"]}
            assert claims == {pvc["metadata"]["name"]}, name


def pod_specs(name):
    """The pod specs of a manifest's workloads."""
    specs = []
    for doc in load(name):
        if doc["kind"] == "JobSet":
            specs += [r["template"]["spec"]["template"]["spec"]
                      for r in doc["spec"]["replicatedJobs"]]
        elif doc["kind"] == "Job":
            specs.append(doc["spec"]["template"]["spec"])
        elif doc["kind"] == "TFJob":
            specs += [r["template"]["spec"]
                      for r in doc["spec"]["tfReplicaSpecs"].values()]
    return specs


# ------------------------------------ failure policies, evaluated as upstream


def pod_failure(policy, container, exit_code, conditions=()):
    """(action, message) of a failed pod under a Job's podFailurePolicy.

    As Kubernetes' Job controller does (matchPodFailurePolicy in
    pkg/controller/job/pod_failure_policy.go): the first rule matching the
    container's exit code (never 0) or one of the pod's conditions wins; no
    match counts the failure against backoffLimit ("Count").
    """
    for index, rule in enumerate(policy["rules"]):
        codes = rule.get("onExitCodes")
        if codes is not None:
            if codes.get("containerName", container) != container:
                continue
            inside = exit_code in codes["values"]
            if exit_code != 0 and inside == (codes["operator"] == "In"):
                return rule["action"], (
                    f"Container {container} for pod default/p failed with "
                    f"exit code {exit_code} matching {rule['action']} rule "
                    f"at index {index}")
            continue
        for pattern in rule.get("onPodConditions", []):
            if (pattern["type"], pattern.get("status", "True")) in conditions:
                return rule["action"], (
                    f"Pod default/p has condition {pattern['type']} matching "
                    f"{rule['action']} rule at index {index}")
    return "Count", None


def job_failure(job_spec, container, exit_code, conditions=()):
    """What the Job does: "Ignore" (pod recreated, not counted), "Count"
    (counted; recreated while backoffLimit allows) or a failed Job as
    (reason, message)."""
    action, message = pod_failure(job_spec["podFailurePolicy"], container,
                                  exit_code, conditions)
    if action == "FailJob":
        return ("PodFailurePolicy", message)
    if action == "Count" and job_spec["backoffLimit"] == 0:
        return ("BackoffLimitExceeded", "Job has reached the specified "
                "backoff limit")
    return action


def jobset_action(jobset_spec, failed):
    """JobSet's failurePolicy: the first rule whose reasons and message
    patterns (empty: any) match the failed Job; else RestartJobSet."""
    reason, message = failed
    for rule in jobset_spec["failurePolicy"]["rules"]:
        reasons = rule.get("onJobFailureReasons") or [reason]
        patterns = rule.get("onJobFailureMessagePatterns") or [""]
        if reason in reasons and any(re.search(p, message or "")
                                     for p in patterns):
            return rule["action"]
    return "RestartJobSet"


def protocol_cases(env):
    """kerasdist's exit codes in a pod with `env`, by what they mean."""
    return {
        # A worker that saved and asks to be restarted (SIGTERM, preemption).
        "restart": protocol.kubernetes_restart_exit_code(env),
        # kerasdist.errors.PermanentError: bad configuration.
        "permanent": protocol.PERMANENT_EXIT_CODE,
        # Any crash (an uncaught exception exits 1).
        "crash": 1,
    }


def test_jobset_policy_matches_the_protocol():
    (jobset,) = load("jobset.yaml")
    spec = jobset["spec"]
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    container, env = container_env(job["template"]["spec"])
    cases = protocol_cases(env)

    def outcome(code, conditions=()):
        failed = job_failure(job, container["name"], code, conditions)
        assert isinstance(failed, tuple), failed  # backoffLimit 0: no retry
        return jobset_action(spec, failed)

    assert outcome(cases["restart"]) == "RestartJobSetAndIgnoreMaxRestarts"
    assert outcome(cases["permanent"]) == "FailJobSet"
    assert outcome(cases["crash"]) == "RestartJobSet"  # counts maxRestarts
    # A node drain that kills the pod before it saves: restarted, free.
    disrupted = outcome(137, [("DisruptionTarget", "True")])
    assert disrupted == "RestartJobSetAndIgnoreMaxRestarts"


def test_indexed_job_policy_matches_the_protocol():
    _, job = load("indexed-job.yaml")
    spec = job["spec"]
    container, env = container_env(spec["template"]["spec"])
    cases = protocol_cases(env)
    name = container["name"]
    assert job_failure(spec, name, cases["restart"]) == "Ignore"
    reason, message = job_failure(spec, name, cases["permanent"])
    assert reason == "PodFailurePolicy" and "exit code 78" in message
    assert job_failure(spec, name, cases["crash"]) == "Count"
    assert job_failure(spec, name, 137,
                       [("DisruptionTarget", "True")]) == "Ignore"


def test_tfjob_exit_code_policy_matches_the_protocol():
    (tfjob,) = load("tfjob.yaml")
    worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"
    _, env = container_env(worker["template"]["spec"])
    cases = protocol_cases(env)
    # training-operator's IsRetryableExitCode: only codes >= 128 restart.
    assert cases["restart"] >= 128
    assert cases["permanent"] < 128


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


# ------------------------------------------- the image, without Docker


def dockerfile(path=DOCKERFILE):
    """(instruction, arguments) pairs, continuation lines joined."""
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def context_files(ignore=DOCKERFILE + ".dockerignore"):
    """The build context's files (relative paths) after the .dockerignore:
    '*' then '!' exceptions, as the file here is written."""
    with open(ignore) as f:
        rules = [r.strip() for r in f if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", rules
    keep = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    files = []
    for entry in keep:
        full = os.path.join(ROOT, entry)
        if os.path.isfile(full):
            files.append(entry)
            continue
        for base, dirs, names in os.walk(full):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            files += [os.path.relpath(os.path.join(base, n), ROOT)
                      for n in names if not n.endswith(".pyc")]
    return files


def copy_context(dest):
    for rel in context_files():
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


class Image:
    """The Dockerfile's steps on a directory `root` standing for `/`, with
    a virtualenv standing for the base image's Python."""

    def __init__(self, tmp):
        self.root = tmp / "root"
        self.root.mkdir()
        self.python_dir = tmp / "python"
        self.context = tmp / "context"
        copy_context(self.context)
        self.workdir = "/"
        self.env = {}
        self.cmd = None

    def path(self, image_path):
        return os.path.join(self.root, image_path.lstrip("/"))

    def environ(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "TF_CONFIG", "KERASDIST"))}
        env.update(self.env)
        env["PATH"] = os.pathsep.join([str(self.python_dir / "bin"),
                                       env.get("PATH", "")])
        return env

    def from_(self, base):
        match = re.fullmatch(r"python:(3\.\d+)-slim", base)
        assert match, f"base image {base!r}: expected python:3.X-slim"
        with open(os.path.join(ROOT, "setup.cfg")) as f:
            assert f"Python :: {match.group(1)}" in f.read()
        venv.EnvBuilder(with_pip=False).create(self.python_dir)
        # What the image's Python would download (TensorFlow, ...) comes
        # from this test's environment, after the image's own packages.
        site = next((self.python_dir / "lib").glob("python3*/site-packages"))
        deps = next(p for p in sys.path if p.endswith("site-packages"))
        (site / "deps.pth").write_text(deps + "\n")
        pip = self.python_dir / "bin" / "pip"
        pip.write_text(f"#!/bin/sh\nexec {sys.executable} -m pip --python "
                       f"{self.python_dir / 'bin' / 'python'} \"$@\"\n")
        pip.chmod(0o755)

    def run(self, command):
        mounts = {}
        while command.startswith("--mount="):
            option, _, command = command.partition(" ")
            fields = dict(f.split("=", 1) if "=" in f else (f, "")
                          for f in option[len("--mount="):].split(","))
            assert fields["type"] == "bind" and "rw" in fields, option
            mounts[fields["target"]] = str(self.context)
        for target, source in mounts.items():
            command = re.sub(rf"(?<![\w/]){re.escape(target)}(?![\w/])",
                             source, command)
        assert not re.search(r"(?<![\w.])/(?!tmp)", command.replace(
            str(self.context), "")), f"absolute path in RUN: {command}"
        # No downloads here: dependencies are already importable.
        env = dict(self.environ(), PIP_NO_DEPS="1",
                   PIP_NO_BUILD_ISOLATION="0", PIP_NO_INDEX="1")
        subprocess.run(["bash", "-c", command], cwd=self.path(self.workdir),
                       env=env, check=True, timeout=600,
                       capture_output=True)

    def apply(self, steps):
        for word, args in steps:
            if word == "FROM":
                self.from_(args)
            elif word == "ENV":
                self.env.update(a.split("=", 1) for a in shlex.split(args))
            elif word == "RUN":
                self.run(args)
            elif word == "WORKDIR":
                self.workdir = os.path.join(self.workdir, args)
                os.makedirs(self.path(self.workdir), exist_ok=True)
            elif word == "COPY":
                *sources, dest = shlex.split(args)
                for source in sources:
                    target = os.path.join(self.path(self.workdir), dest)
                    shutil.copy2(self.context / source, target)
            elif word == "CMD":
                self.cmd = json.loads(args)
            else:
                raise AssertionError(f"step not emulated: {word} {args}")

    def python(self, argv, cwd, timeout=300):
        argv = [self.path(a) if a.startswith("/app/") else a for a in argv]
        return subprocess.run(argv, cwd=cwd, env=self.environ(),
                              capture_output=True, text=True,
                              timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dockerfile_steps_give_the_image_the_manifests_run(tmp_path):
    # Without Docker: each step emulated (FROM: a virtualenv; RUN with a
    # bind mount: the build context copied; pip without downloads).
    image = Image(tmp_path)
    image.apply(dockerfile())
    # The image's tree: the example in /app and nothing else (the source
    # was only mounted); kerasdist and its launcher in the image's Python.
    tree = sorted(os.path.relpath(os.path.join(base, n), image.root)
                  for base, _, names in os.walk(image.root) for n in names)
    assert tree == ["app/mnist.py", "app/mnist_data.py"], tree
    assert (image.python_dir / "bin" / "kerasdist-run").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = image.python(["python", "-c", "import kerasdist, sys; "
                          "print(kerasdist.__file__)"], cwd=elsewhere)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.startswith(str(image.python_dir)), where.stdout
    # Every manifest's command runs in it, from any working directory
    # (here a short run: the manifests' flags plus a small data set).
    commands = {tuple(c["command"]) for name in MANIFESTS[:3]
                for pod in pod_specs(name) for c in pod["containers"]}
    assert all(c[:2] == tuple(image.cmd) for c in commands), commands
    ckpt = tmp_path / "ckpt"
    argv = [a.replace("/ckpt/", f"{ckpt}/") for a in sorted(commands)[0]]
    run = image.python([*argv, "--epochs=1", "--num_examples=256"],
                       cwd=elsewhere)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "result:" in run.stdout + run.stderr
    assert os.listdir(ckpt / "mnist"), "no backup written"

"""Elastic resizes on the worker side (issue 10): a run whose worker group is
restarted at another size ends with the weights of a run that never failed,
and applies each example of each epoch exactly once.

Real workers: `python -m kerasdist.launch` (kerasdist-run) on 127.0.0.1
running tests/fault_worker.py under MultiWorkerMirroredStrategy, with
`KERASDIST_MIN_WORKERS=2` / `KERASDIST_MAX_WORKERS=3` as the elastic
launcher sets them. A resize is emulated the way the elastic launcher does
it: the group is stopped (a worker is SIGKILLed, `--max_restarts 0`) and a
new group of another size resumes from the same backup directory.

Tolerance of the weight comparisons (`RESIZE_RTOL`, `RESIZE_ATOL`): the
data, the global batch and the update are the same, but the gradient
all-reduce sums the replicas' partial gradients in another order when the
replica count changes (3 partial sums of 4 examples vs 2 of 6), so float32
round-off differs slightly (measured: max |difference| about 1e-7 after
32 steps). The negative control differs by orders of magnitude more.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import fault_worker as fw
import numpy as np
import pytest

import kerasdist as kd
from kerasdist import elastic
from kerasdist.callbacks import backup_and_restore
from kerasdist.launch import protocol

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "fault_worker.py")
GLOBAL_BATCH = 12
EXAMPLES = 192  # 16 global batches of 12 per epoch
EPOCHS = 2
JOB = ["--global_batch", str(GLOBAL_BATCH), "--num_examples", str(EXAMPLES),
       "--epochs", str(EPOCHS), "--save_freq", "4"]
ELASTIC = {protocol.ENV_MIN_WORKERS: "2", protocol.ENV_MAX_WORKERS: "3"}
RESIZE_RTOL, RESIZE_ATOL = 1e-5, 1e-6
LAUNCH_TIMEOUT = 240

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _launch(out, backup_dir, num_workers, *args, env=None, faults=()):
    """Runs one worker group with kerasdist-run; returns (code, text)."""
    command = [sys.executable, "-m", "kerasdist.launch",
               "--num_workers", str(num_workers), "--max_restarts", "0",
               "--log_dir", str(out) + "-logs",
               "--env", "TF_CPP_MIN_LOG_LEVEL=3",
               "--env", "PYTHONWARNINGS=ignore"]
    for name, value in (env or {}).items():
        command += ["--env", f"{name}={value}"]
    command += ["--", sys.executable, WORKER, "--out", str(out),
                "--backup_dir", str(backup_dir), *args]
    for f in faults:
        command += ["--fault", f]
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO, HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=environ, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own group
        text, _ = proc.communicate()
        pytest.fail(f"kerasdist-run did not end in {LAUNCH_TIMEOUT}s:\n"
                    f"{text[-4000:]}")
    except BaseException:
        # Interrupted: stop the launcher (it stops its workers on SIGTERM).
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, text


def _steps(out, attempt):
    records = fw.read_steps(os.path.join(out, "steps-0.jsonl"))
    for r in records:
        r["attempt"] = attempt  # each launcher run is one attempt
    return records


def _weights(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def _files(directory):
    """{name: sha256} of the files in `directory` (backups untouched?)."""
    return {
        name: hashlib.sha256(
            open(os.path.join(directory, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(directory))
        if os.path.isfile(os.path.join(directory, name))
    }


def _assert_each_example_once_per_epoch(records):
    ids = np.arange(EXAMPLES, dtype=np.int64)
    for epoch in range(EPOCHS):
        rows = [r for r in records if r["epoch"] == epoch]
        assert len(rows) == EXAMPLES // GLOBAL_BATCH
        assert sum(r["id_sum"] for r in rows) == int(ids.sum())
        assert sum(r["id_sq"] for r in rows) == int((ids * ids).sum())


def _assert_matches_unfailed_run(steps, final, reference, label):
    """Every example once per epoch, the unfailed run's batches, and its
    weights within the resize tolerance."""
    assert fw.fingerprints(steps) == fw.fingerprints(reference[1])
    _assert_each_example_once_per_epoch(steps)
    weights = _weights(final)
    print(f"{label}: max |weight difference| = "
          f"{_max_diff(weights, reference[0]):.3g}")
    for w, r in zip(weights, reference[0], strict=True):
        np.testing.assert_allclose(w, r, rtol=RESIZE_RTOL, atol=RESIZE_ATOL)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("elastic")


@pytest.fixture(scope="module")
def reference(work):
    """An unfailed 3-worker run: (weights, step records)."""
    out = work / "ref"
    code, text = _launch(out, work / "ref-backup", 3, *JOB, env=ELASTIC)
    assert code == 0, text
    return _weights(out / "final.npz"), _steps(out, 0)


@pytest.fixture(scope="module")
def interrupted(work):
    """3 workers, worker 1 SIGKILLed after step 9 of epoch 0 (the newest
    backup is at step 8, mid-epoch), no restart: (backup dir, records)."""
    out = work / "interrupted"
    backup = work / "interrupted-backup"
    code, text = _launch(out, backup, 3, *JOB, env=ELASTIC,
                         faults=["0:1:0:9:SIGKILL"])
    assert code != 0, text
    assert "ckpt-000000000008.npz" in os.listdir(backup), text
    return backup, _steps(out, 0)


def _copy_backup(interrupted, tmp_path):
    backup = tmp_path / "backup"
    shutil.copytree(interrupted[0], backup)
    return backup


def test_global_batches_hold_the_same_examples_at_1_and_3_workers(
        reference, tmp_path):
    # DATA auto-sharding splits each global batch over the workers: the
    # examples of step k are those of a single-device run (the 2-worker
    # case is checked by the resize tests below).
    import tensorflow as tf

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    log = str(tmp_path / "one-device.jsonl")
    with strategy.scope():
        model = fw.build_model()
    model.fit(fw.make_dataset(strategy, EXAMPLES, global_batch=GLOBAL_BATCH),
              epochs=EPOCHS, verbose=0, callbacks=[fw.step_log_callback(log)])
    assert fw.fingerprints(reference[1]) == fw.fingerprints(
        fw.read_steps(log))
    _assert_each_example_once_per_epoch(reference[1])


def test_resize_3_to_2_workers_matches_unfailed_run(
        reference, interrupted, tmp_path):
    backup = _copy_backup(interrupted, tmp_path)
    out = tmp_path / "resumed"
    code, text = _launch(out, backup, 2, *JOB, env=ELASTIC)
    assert code == 0, text
    resumed = _steps(out, 1)
    assert (resumed[0]["epoch"], resumed[0]["step"]) == (0, 8)
    _assert_matches_unfailed_run(fw.lineage(interrupted[1] + resumed),
                                 out / "final.npz", reference,
                                 "3 -> 2 workers")


def test_resize_3_to_2_to_3_workers_matches_unfailed_run(
        reference, interrupted, tmp_path):
    backup = _copy_backup(interrupted, tmp_path)
    # On 2 workers, worker 0 (the chief) is killed after step 6 of epoch 1:
    # the newest backup is at step 20 of the run (epoch 1, step 4).
    code, text = _launch(tmp_path / "two", backup, 2, *JOB, env=ELASTIC,
                         faults=["0:0:1:6:SIGKILL"])
    assert code != 0, text
    two = _steps(tmp_path / "two", 1)
    code, text = _launch(tmp_path / "three", backup, 3, *JOB, env=ELASTIC)
    assert code == 0, text
    three = _steps(tmp_path / "three", 2)
    assert (three[0]["epoch"], three[0]["step"]) == (1, 4)
    _assert_matches_unfailed_run(fw.lineage(interrupted[1] + two + three),
                                 tmp_path / "three" / "final.npz", reference,
                                 "3 -> 2 -> 3 workers")


def _per_update(records, accumulation):
    """Step records of a run accumulating `accumulation` steps per update,
    merged into one record per optimizer update (a global batch)."""
    merged = {}
    for r in records:
        key = (r["epoch"], r["step"] // accumulation)
        m = merged.setdefault(key, {"attempt": r["attempt"], "epoch": key[0],
                                    "step": key[1], "id_sum": 0, "id_sq": 0,
                                    "parts": 0})
        m["id_sum"] += r["id_sum"]
        m["id_sq"] += r["id_sq"]
        m["parts"] += 1
    assert all(m.pop("parts") == accumulation for m in merged.values())
    return list(merged.values())


def test_resize_with_gradient_accumulation_matches_unfailed_run(
        reference, interrupted, tmp_path):
    # A replica may compute on at most 4 examples (--max_replica_batch 4):
    # on 3 workers a global batch of 12 is 3 x 4 in one step; on 2 workers
    # kd.elastic.batch_plan makes it 2 replicas x 3 examples x 2
    # accumulated steps. 3 -> 2 (accumulating) -> 3 workers.
    backup = _copy_backup(interrupted, tmp_path)
    cap = ["--max_replica_batch", "4"]
    # On 2 workers (2 steps per update, a backup every 4 steps), worker 0
    # is killed after step 9 of epoch 1: the newest backup is at update 20
    # (epoch 1, update 4).
    code, text = _launch(tmp_path / "two", backup, 2, *JOB, *cap,
                         env=ELASTIC, faults=["0:0:1:9:SIGKILL"])
    assert code != 0, text
    two = _steps(tmp_path / "two", 1)
    assert (two[0]["epoch"], two[0]["step"]) == (0, 16)  # update 8 of 16
    assert "ckpt-000000000020.npz" in os.listdir(backup)
    code, text = _launch(tmp_path / "three", backup, 3, *JOB, *cap,
                         env=ELASTIC)
    assert code == 0, text
    three = _steps(tmp_path / "three", 2)
    assert (three[0]["epoch"], three[0]["step"]) == (1, 4)
    _assert_matches_unfailed_run(
        fw.lineage(interrupted[1] + _per_update(two, 2) + three),
        tmp_path / "three" / "final.npz", reference,
        "3 -> 2 (accumulating 2 steps) -> 3 workers")


def test_negative_control_usual_resize_changes_the_weights(
        reference, tmp_path):
    # The usual way: a fixed per-worker batch (4, so the global batch is 12
    # on 3 workers and 8 on 2) and a hand-written epoch-end backup that
    # resumes at the start of the next epoch (`fit(initial_epoch=...)`),
    # as with keras.callbacks.BackupAndRestore. Same data, same model.
    job = ["--per_worker_batch", "4", "--num_examples", str(EXAMPLES),
           "--epochs", str(EPOCHS), "--backup", "epoch"]
    backup = str(tmp_path / "backup-{rank}")
    code, text = _launch(tmp_path / "first", backup, 3, *job,
                         faults=["0:1:1:5:SIGKILL"])
    assert code != 0, text
    first = _steps(tmp_path / "first", 0)
    code, text = _launch(tmp_path / "second", backup, 2, *job)
    assert code == 0, text
    second = _steps(tmp_path / "second", 1)
    assert (second[0]["epoch"], second[0]["step"]) == (1, 0)
    steps = fw.lineage(first + second)
    assert fw.fingerprints(steps) != fw.fingerprints(reference[1])
    weights = _weights(tmp_path / "second" / "final.npz")
    diff = _max_diff(weights, reference[0])
    print(f"negative control: max |weight difference| = {diff:.3g}")
    assert not all(
        np.allclose(w, r, rtol=RESIZE_RTOL, atol=RESIZE_ATOL)
        for w, r in zip(weights, reference[0], strict=True)
    )
    assert diff > 1000 * RESIZE_ATOL


def test_global_batch_that_an_allowed_size_cannot_split_exits_78(
        interrupted, tmp_path):
    backup = _copy_backup(interrupted, tmp_path)
    before = _files(backup)
    env = {protocol.ENV_MIN_WORKERS: "2", protocol.ENV_MAX_WORKERS: "4"}
    code, text = _launch(tmp_path / "out", backup, 2, "--global_batch", "8",
                         "--num_examples", "96", "--epochs", "1", env=env)
    assert code == protocol.PERMANENT_EXIT_CODE, text
    assert "ElasticConfigError" in text
    assert "global_batch_size=8" in text
    assert "3 worker(s) = 3 replicas" in text
    assert "multiple of 12" in text
    assert "--min_workers 4" in text
    assert _files(backup) == before
    assert not os.path.exists(tmp_path / "out" / "steps-0.jsonl")


def test_resume_with_another_global_batch_is_refused(interrupted, tmp_path):
    backup = _copy_backup(interrupted, tmp_path)
    before = _files(backup)
    # A per-worker batch of 4 on 2 workers: a global batch of 8, not 12.
    code, text = _launch(tmp_path / "out", backup, 2, "--per_worker_batch",
                         "4", "--num_examples", str(EXAMPLES),
                         "--epochs", str(EPOCHS))
    assert code == protocol.PERMANENT_EXIT_CODE, text
    assert "BackupMismatchError" in text
    assert ("global batch of 12 examples per optimizer update "
            "(3 replicas") in text
    assert "global_batch_size=8" in text
    assert "resume with global_batch_size=12" in text
    assert _files(backup) == before
    assert not os.path.exists(tmp_path / "out" / "steps-0.jsonl")


def test_synchronized_batchnorm_statistics_agree_between_workers(tmp_path):
    # BatchNormalization(synchronized=True) under MultiWorkerMirroredStrategy
    # computes the batch statistics over the global batch, so the moving
    # statistics are the same on every worker and equal those of one
    # device with the same global batch.
    import keras
    import tensorflow as tf

    code, text = _launch(tmp_path / "bn", tmp_path / "bn-backup", 2,
                         "--global_batch", str(GLOBAL_BATCH),
                         "--num_examples", "96", "--epochs", "1",
                         "--batchnorm", "sync", "--all_weights")
    assert code == 0, text
    w0 = _weights(tmp_path / "bn" / "final-w0.npz")
    w1 = _weights(tmp_path / "bn" / "final-w1.npz")
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = fw.build_model(batchnorm="sync")
    model.fit(fw.make_dataset(strategy, 96, global_batch=GLOBAL_BATCH),
              epochs=1, verbose=0)
    bn = next(layer for layer in model.layers
              if isinstance(layer, keras.layers.BatchNormalization))
    paths = [v.path for v in model.weights]
    moving = [paths.index(v.path) for v in
              (bn.moving_mean, bn.moving_variance)]
    initial = {moving[0]: 0.0, moving[1]: 1.0}
    for i in moving:
        np.testing.assert_array_equal(w0[i], w1[i])
        assert np.abs(w0[i] - initial[i]).max() > 1e-3  # they were updated
    for a, b in zip(w0, model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=RESIZE_RTOL, atol=RESIZE_ATOL)


def test_plain_batchnorm_depends_on_the_replica_count():
    # What the docs say: plain BatchNormalization normalises each
    # replica's part of the batch, so 2 replicas train differently from 1
    # device with the same global batch; synchronized=True does not.
    import keras
    import tensorflow as tf

    def moving_variance(strategy, batchnorm):
        with strategy.scope():
            model = fw.build_model(batchnorm=batchnorm)
        model.fit(fw.make_dataset(strategy, 96, global_batch=GLOBAL_BATCH),
                  epochs=1, verbose=0)
        bn = next(layer for layer in model.layers
                  if isinstance(layer, keras.layers.BatchNormalization))
        return np.asarray(bn.moving_variance.numpy())

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = kd.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    plain = _max_diff([moving_variance(one, "plain")],
                      [moving_variance(two, "plain")])
    synced = _max_diff([moving_variance(one, "sync")],
                       [moving_variance(two, "sync")])
    print(f"BN moving variance, 1 vs 2 replicas: plain {plain:.3g}, "
          f"synchronized {synced:.3g}")
    assert plain > 1000 * RESIZE_ATOL
    assert synced < RESIZE_ATOL * 10


# -- in-process checks of the configuration rules -------------------------


def test_allowed_workers_reads_the_launcher_environment():
    assert elastic.allowed_workers({}) is None
    assert elastic.allowed_workers({protocol.ENV_MIN_WORKERS: "2",
                                    protocol.ENV_NUM_WORKERS: "3"}) == (2, 3)
    assert elastic.allowed_workers({protocol.ENV_MIN_WORKERS: "3",
                                    protocol.ENV_MAX_WORKERS: "3"}) is None
    with pytest.raises(elastic.ElasticConfigError,
                       match="KERASDIST_MIN_WORKERS=4 above"):
        elastic.allowed_workers({protocol.ENV_MIN_WORKERS: "4",
                                 protocol.ENV_MAX_WORKERS: "3"})
    with pytest.raises(elastic.ElasticConfigError,
                       match=r"KERASDIST_MAX_WORKERS='two'"):
        elastic.allowed_workers({protocol.ENV_MIN_WORKERS: "1",
                                 protocol.ENV_MAX_WORKERS: "two"})


def test_only_the_sizes_the_hosts_reach_must_split_the_batch():
    """8 hosts of 2 slots, --min_workers 14: kerasdist-run can only run 14
    or 16 workers, so 112 (not a multiple of 15) is a valid global batch;
    without the launcher's list every size from 14 to 16 counts."""
    hosts = {protocol.ENV_MIN_WORKERS: "14", protocol.ENV_MAX_WORKERS: "16"}
    sizes = kd.launch.policy.group_sizes([2] * 8, 14)
    assert sizes == [14, 16]
    env = {**hosts, protocol.ENV_WORKER_SIZES: ",".join(map(str, sizes))}
    assert elastic.allowed_sizes(env) == [14, 16]
    assert elastic.allowed_sizes(hosts) == [14, 15, 16]
    elastic.check_global_batch(112, environ=env)
    with pytest.raises(elastic.ElasticConfigError,
                       match=r"15 worker\(s\) = 15 replicas"):
        elastic.check_global_batch(112, environ=hosts)
    with pytest.raises(elastic.ElasticConfigError) as e:
        elastic.check_global_batch(96, environ=env)  # 14 cannot split 96
    assert "14 worker(s) = 14 replicas" in str(e.value)
    assert "multiple of 112" in str(e.value)
    assert "--min_workers 16" in str(e.value)
    for bad in ("14,17", "x", "12,16", " , "):
        with pytest.raises(elastic.ElasticConfigError,
                           match="Invalid value for KERASDIST_WORKER_SIZES"):
            elastic.allowed_sizes({**hosts,
                                   protocol.ENV_WORKER_SIZES: bad})


def test_check_global_batch_names_failing_sizes_and_fix():
    env = {protocol.ENV_MIN_WORKERS: "1", protocol.ENV_MAX_WORKERS: "3"}
    elastic.check_global_batch(12, environ=env)  # 1, 2 and 3 split 12
    with pytest.raises(elastic.ElasticConfigError) as e:
        elastic.check_global_batch(10, environ=env)
    text = str(e.value)
    assert "global_batch_size=10" in text
    assert "3 worker(s) = 3 replicas" in text
    assert "multiple of 6 (e.g. 12)" in text
    assert isinstance(e.value, kd.errors.PermanentError)
    elastic.check_global_batch(10, environ={})  # not elastic: no check


def test_batch_plan_accumulates_only_above_the_memory_cap():
    import tensorflow as tf

    three = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1", "/cpu:2"])
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    plan = elastic.batch_plan(12, max_replica_batch_size=4, strategy=three)
    assert plan == (12, 4, 1, 12)
    plan = elastic.batch_plan(12, max_replica_batch_size=4, strategy=two)
    assert plan == elastic.BatchPlan(global_batch_size=12,
                                     replica_batch_size=3,
                                     accumulation_steps=2, step_batch_size=6)
    assert elastic.batch_plan(12, strategy=two).accumulation_steps == 1
    # 7 examples per replica and a cap of 4: 7 steps of 1 (7 is prime).
    assert elastic.batch_plan(14, 4, strategy=two) == (14, 1, 7, 2)
    with pytest.raises(elastic.ElasticConfigError,
                       match="global_batch_size=13.*multiple of 2"):
        elastic.batch_plan(13, 4, strategy=two)


def test_dataset_and_optimizer_must_accumulate_alike(tmp_path):
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    model = fw.build_model(accumulation_steps=2)
    train = fw.make_dataset(strategy, 48, global_batch=12,
                            accumulation_steps=3)  # batches of 4, not 6
    log = str(tmp_path / "steps.jsonl")
    with pytest.raises(backup_and_restore.BackupConfigError,
                       match="batched by 4 for a global batch of 12, but the "
                       "optimizer accumulates 2"):
        model.fit(train, epochs=1, verbose=0, callbacks=[
            fw.step_log_callback(log),
            kd.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert not os.path.exists(log)  # refused before the first step


def test_file_sharding_is_refused_and_auto_picks_data_when_elastic(
        tmp_path, monkeypatch):
    import tensorflow as tf

    files = []
    for i in range(2):
        path = str(tmp_path / f"part-{i}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            writer.write(b"x")
        files.append(path)
    ds = tf.data.TFRecordDataset(files)
    policy = tf.data.experimental.AutoShardPolicy
    # The policy 2 workers would get, without starting them.
    choose = kd.data._choose_policy  # noqa: SLF001
    assert choose(ds, "auto", 2) == policy.FILE
    for name, value in ELASTIC.items():
        monkeypatch.setenv(name, value)
    assert choose(ds, "auto", 2) == policy.DATA
    with pytest.raises(elastic.ElasticConfigError,
                       match="shard_policy='file' under an elastic"):
        kd.data.distribute(ds, tf.distribute.get_strategy(),
                           global_batch_size=None, shard_policy="file")

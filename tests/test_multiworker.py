"""Multi-worker training: local worker processes under MultiWorkerMirroredStrategy."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, error_line, run_train
from keras_ft.preemption import EXIT_PREEMPTED
from launch import multiworker
from runs import ONE_DEVICE, PARITY, Launch, start_train, tiny_config, train_error
from test_distribute import checkpoint_variables

# configs/tiny.py: 2 epochs x 3 steps, a stage switch at epoch 2. No dropout
# and re-estimated BatchNorm statistics, so the random backbone gets real
# gradients and a run is a pure function of its data stream.
COMMON = list(PARITY)
# The workers all-reduce gradients across processes; one device sums them in
# one kernel: the same SGD steps up to float summation order (measured: 1.1e-5
# on a BatchNorm variance of order 10).
RTOL, ATOL = 1e-4, 1e-5


def _train_command(workdir, images, *overrides):
    return [
        sys.executable, "-m", "launch.train", "--config=configs/tiny.py",
        f"--workdir={workdir}", f"--config.data.source=folder:{images}", *COMMON, *overrides,
    ]


def _env(tmp):
    """Environment of worker processes, temporary folders under `tmp`."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp))


def _start(workdir, images, tmp, *overrides):
    """`python -m launch.multiworker` of two workers, started in the background."""
    cmd = [sys.executable, "-m", "launch.multiworker", "--num_workers=2", "--"]
    return Launch(cmd + _train_command(workdir, images, *overrides), env=_env(tmp))


def _fingerprints(output):
    """{worker index: weights_sha256} from each worker's final metrics line."""
    found = re.findall(r'^\[worker (\d+)\] .*Final metrics: .*"weights_sha256": "([0-9a-f]{64})"',
                       output, re.M)
    return {int(i): h for i, h in found}


def _history(workdir):
    with open(os.path.join(workdir, "history.csv")) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _assert_same_run(workdir, reference):
    a, b = checkpoint_variables(workdir, 6), checkpoint_variables(reference, 6)
    assert a.keys() == b.keys() and len(a) > 200
    for key, value in b.items():
        np.testing.assert_allclose(a[key], value, rtol=RTOL, atol=ATOL, err_msg=key)
    ha, hb = _history(workdir), _history(reference)
    assert len(ha) == len(hb) == 2
    for row_a, row_b in zip(ha, hb):
        assert row_a.keys() == row_b.keys()
        for key in row_b:
            np.testing.assert_allclose(row_a[key], row_b[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.slow
def test_two_workers_match_one_device_and_only_the_chief_writes(tmp_path, tmp_path_factory, images):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    workdir = tmp_path / "run"
    # The reference: the same run on one device (the session's, shared with
    # tests/test_distribute.py), trained alongside if no test has yet.
    ONE_DEVICE.start(tmp_path_factory, images)
    # Each worker reads and decodes only its share of every batch (the
    # reference, on one device, runs the memory pipeline).
    with _start(workdir, images, tmp, "--config.data.pipeline=stream") as launch:
        result = launch.result()
    one_device = ONE_DEVICE.workdir(tmp_path_factory, images)
    out = result.stdout
    assert result.returncode == 0, out[-4000:]
    assert "Workers exited with [0, 0]." in out
    assert re.search(r"^\[worker 1\] .*Input pipeline: stream", out, re.M)
    # distribute.strategy=auto picked MultiWorkerMirroredStrategy from TF_CONFIG.
    assert ("MultiWorkerMirroredStrategy with 2 replica(s) on 2 worker(s); "
            "this is worker 0, the chief") in out
    assert "this is worker 1, not the chief" in out

    # The workers agree on the final weights, bitwise.
    fingerprints = _fingerprints(out)
    assert sorted(fingerprints) == [0, 1], out[-4000:]
    assert fingerprints[0] == fingerprints[1]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["weights_sha256"] == fingerprints[0]
    assert metrics["replicas"] == 2 and metrics["steps"] == 6

    # Only the chief's workdir holds artifacts; worker 1's folder is gone.
    assert {"checkpoints", "config.json", "export", "history.csv", "metrics.json"} <= set(
        os.listdir(workdir))
    assert list(tmp.iterdir()) == []
    assert re.search(r"^\[worker 1\] .*Not the chief: writing to ", out, re.M)

    # Each step's global batch is split between the workers: the same SGD
    # steps as one device, across a stage switch.
    _assert_same_run(str(workdir), one_device)


def _start_workers(tmp_path, workdir, images, *overrides):
    """Two worker processes of one job, logging to tmp_path/worker{0,1}.log,
    with their temporary folders in tmp_path/tmp."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    hosts = [f"127.0.0.1:{p}" for p in multiworker.free_ports(2)]
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        env = dict(_env(tmp_path / "tmp"), TF_CONFIG=multiworker.tf_config(hosts, i))
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                _train_command(workdir, images, *overrides), cwd=REPO, env=env,
                stdout=log, stderr=subprocess.STDOUT,
            ))
    return procs, logs


@pytest.mark.slow
def test_a_preempted_worker_stops_all_and_they_resume_together(tmp_path, tmp_path_factory, images):
    """SIGTERM to worker 1 alone: both agree on the step, save, exit 42; the
    rerun resumes both from the chief's checkpoint and ends as one device."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    workdir = tmp_path / "run"
    # No export: what is compared is checkpoints and history.
    extra = ("--config.checkpoint.every_steps=2", "--config.export.enabled=False")
    ONE_DEVICE.start(tmp_path_factory, images)
    procs, logs = _start_workers(tmp_path, workdir, images, *extra)
    deadline = time.monotonic() + 300
    while "ckpt-000000002." not in logs[0].read_text():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
            logs[0].read_text()[-3000:])
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [42, 42], texts[0][-3000:] + texts[1][-3000:]
    assert "SIGTERM received" in texts[1] and "SIGTERM received" not in texts[0]
    steps = [re.findall(r"Preempted: saved \S+ at step (\d+)", t) for t in texts]
    assert len(steps[0]) == 1 and steps[0] == steps[1], steps
    assert os.path.isdir(workdir / "checkpoints" / f"ckpt-{int(steps[0][0]):09d}")
    assert list(tmp.iterdir()) == []

    # The global batch makes every step the same on any number of replicas:
    # a copy of the stopped run goes on alone, on one device, while the two
    # workers resume the original.
    alone = tmp_path / "alone"
    shutil.copytree(workdir, alone)
    with start_train(alone, f"--config.data.source=folder:{images}", *COMMON, *extra,
                     "--config.distribute.strategy=default") as on_one, \
            _start(workdir, images, tmp, *extra) as on_two:
        alone_result, result = on_one.result(), on_two.result()
    one_device = ONE_DEVICE.workdir(tmp_path_factory, images)
    assert alone_result.returncode == 0, alone_result.stderr[-3000:]
    assert "Resumed from" in alone_result.stderr and "with 1 replica(s)" in alone_result.stderr
    _assert_same_run(str(alone), one_device)

    assert result.returncode == 0, result.stdout[-4000:]
    assert len(re.findall(r"Resumed from \S+ckpt-0+" + steps[0][0], result.stdout)) == 2
    fingerprints = _fingerprints(result.stdout)
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    _assert_same_run(str(workdir), one_device)


def _launch_script(tmp_path, script, *flags):
    return subprocess.run(
        [sys.executable, "-m", "launch.multiworker", *flags, "--", sys.executable, "-c", script],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )


def test_launcher_gives_each_worker_its_tf_config(tmp_path):
    result = _launch_script(
        tmp_path, "import os; print(os.environ['TF_CONFIG'])", "--num_workers=3")
    assert result.returncode == 0, result.stdout + result.stderr
    configs = {}
    for line in result.stdout.splitlines():
        match = re.match(r"\[worker (\d)\] (\{.*\})$", line)
        if match:
            configs[int(match[1])] = json.loads(match[2])
    assert sorted(configs) == [0, 1, 2]
    hosts = configs[0]["cluster"]["worker"]
    assert len(set(hosts)) == 3 and all(h.startswith("127.0.0.1:") for h in hosts)
    for i, config in configs.items():
        assert config == {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}


def test_launcher_stops_the_others_when_a_worker_fails(tmp_path):
    # Worker 1 fails at once; worker 0 would wait forever for it.
    script = ("import json, os, sys, time\n"
              "if json.loads(os.environ['TF_CONFIG'])['task']['index'] == 1: sys.exit(3)\n"
              "time.sleep(600)")
    start = time.monotonic()
    result = _launch_script(tmp_path, script, "--num_workers=2", "--grace_seconds=1")
    assert result.returncode == 3, result.stdout
    assert time.monotonic() - start < 60
    assert "Worker 1 exited with 3" in result.stdout


def test_launcher_exit_code_of_a_preempted_job(tmp_path):
    result = _launch_script(tmp_path, "import sys; sys.exit(42)", "--num_workers=2")
    assert result.returncode == 42
    assert "Workers exited with [42, 42]." in result.stdout


def test_launcher_needs_a_command():
    result = subprocess.run([sys.executable, "-m", "launch.multiworker", "--num_workers=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "No command" in result.stderr


@pytest.mark.parametrize("tf_config, strategy, message", [
    (None, "multi_worker", "distribute.strategy=multi_worker needs the TF_CONFIG"),
    ("{not json", "multi_worker", "TF_CONFIG is not a valid cluster spec"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
     "multi_worker", "task index 3 of 1 worker(s)"),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
     '"task": {"type": "worker", "index": 0}}',
     "mirrored", "TF_CONFIG names 2 workers, but distribute.strategy='mirrored'"),
])
def test_strategy_errors(tmp_path, images, monkeypatch, tf_config, strategy, message):
    # In-process: each is found before TensorFlow's runtime is configured.
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("TPU_NAME", raising=False)
    if tf_config is not None:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    config = tiny_config({"data.source": f"folder:{images}", "distribute.strategy": strategy})
    assert message in train_error(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_no_tpu_is_one_line_and_exit_2(tmp_path, images, monkeypatch):
    # A subprocess: looking for a TPU may connect TensorFlow to a cluster.
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("TPU_NAME", raising=False)
    result = run_train(
        tmp_path / "run", f"--config.data.source=folder:{images}",
        "--config.distribute.strategy=tpu",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "distribute.strategy=tpu: no TPU reachable as TPU_NAME='local'" in error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_lost_worker_stops_the_others_with_exit_4(tmp_path, images):
    procs, logs = _start_workers(tmp_path, tmp_path / "run", images,
                                 "--config.train.epochs=50", "--config.export.enabled=False")
    deadline = time.monotonic() + 300
    while "epoch 1/50 done" not in logs[0].read_text():
        assert time.monotonic() < deadline and procs[0].poll() is None, logs[0].read_text()[-3000:]
        time.sleep(0.1)
    procs[1].kill()  # kill -9: no save, no goodbye
    assert procs[0].wait(timeout=120) == 4, logs[0].read_text()[-3000:]
    assert "error: lost contact with another worker" in logs[0].read_text()


def test_kubernetes_manifest_builds_each_pods_tf_config(tmp_path):
    import yaml
    with open(os.path.join(REPO, "k8s", "multiworker-job.yaml")) as f:
        service, job = list(yaml.safe_load_all(f))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    workers = int({e["name"]: e["value"] for e in container["env"]}["NUM_WORKERS"])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == workers
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    # Retried: preempted (42) and peer lost (4); fatal: bad input (2), NaN (3).
    rules = {r["action"]: r["onExitCodes"]["values"]
             for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r}
    from launch import train
    assert sorted(rules["Ignore"]) == sorted([train.EXIT_PEER_LOST, EXIT_PREEMPTED])
    assert sorted(rules["FailJob"]) == [2, train.EXIT_NON_FINITE_LOSS]
    # The pod's script, run up to its exec, for pod 1 of 2.
    script = container["args"][0]
    script = script[: script.index("exec ")] + 'echo "$TF_CONFIG"\n'
    env = dict(os.environ, JOB_COMPLETION_INDEX="1", NUM_WORKERS=str(workers))
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout
    hosts = [f"keras-ft-{i}.keras-ft-workers:2222" for i in range(workers)]
    assert json.loads(out) == json.loads(multiworker.tf_config(hosts, 1))

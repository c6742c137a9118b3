"""`python -m launch.train` end to end: the workdir contract, resume, errors."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import error_line, run_train, write_image_folder
from keras_ft import trainer
from runs import record_logs, run_trains, tiny_config, train_error


@pytest.mark.slow
def test_workdir_contract_and_resume(tmp_path, images):
    workdir = tmp_path / "run"
    source = f"--config.data.source=folder:{images}"
    result = run_train(workdir, source)
    assert result.returncode == 0, result.stderr[-3000:]

    names = set(os.listdir(workdir))
    assert {"config.json", "metrics.json", "history.csv", "checkpoints", "export", "tensorboard"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary leftovers
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["backbone"] == "mobilenet_v2"
    assert config["model"]["image_size"] == 32
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["steps"] == 6
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and np.isfinite(metrics["val_loss"])
    assert metrics["train_images_per_sec"] > 0
    with open(workdir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    # Epoch ends only (every_seconds=600 does not come up): named by global step.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["ckpt-000000003", "ckpt-000000006"]
    assert os.listdir(workdir / "tensorboard")
    # The stage schedule ran: head first, then the top two blocks.
    assert "Stage 1/2 at epoch 1: head only" in result.stderr
    assert "Stage 2/2 at epoch 2: top 2 block(s)" in result.stderr
    # A clean log: TensorFlow's C++ start-up lines are dropped.
    for noise in ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub", "cuInit"):
        assert noise not in result.stderr

    served = tf.saved_model.load(str(workdir / "export"))
    assert {"serving_default", "serving_uint8"} <= set(served.signatures)
    png = tf.io.encode_png(np.full((40, 30, 3), 200, np.uint8))
    out = served.signatures["serving_default"](images=tf.stack([png, png]))
    assert out["probabilities"].shape == (2, 2)
    assert set(out["classes"].numpy().tolist()) <= {b"dark", b"light"}

    # Rerunning the finished run trains nothing more; a copy that lost its
    # last checkpoint (as if killed during epoch 2) resumes epoch 2 only.
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "ckpt-000000006")
    again, resumed = run_trains((workdir, source), (copy, source))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "All 2 epochs are done" in again.stderr
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == 6
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt-000000003: 1 epoch(s) and 0 step(s) done" in resumed.stderr
    assert "Training epochs 2..2 of 2" in resumed.stderr
    assert json.loads((copy / "metrics.json").read_text())["steps"] == 6
    with open(copy / "history.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]

    # A changed config cannot silently resume (checked in-process: the
    # trainer's ValueError is the line launch.train prints, exit 2).
    config = {"data.source": f"folder:{images}"}
    changed = train_error(tiny_config({**config, "optimizer.momentum": 0.5}), workdir)
    assert "optimizer.momentum: 0.9 -> 0.5" in changed

    # Nor can a workdir whose checkpoints are all unreadable silently start over.
    for name in os.listdir(workdir / "checkpoints"):
        os.remove(workdir / "checkpoints" / name / "state.json")
    unreadable = train_error(tiny_config(config), workdir)
    assert "is readable" in unreadable and "resume=False" in unreadable
    assert len(os.listdir(workdir / "checkpoints")) == 2  # nothing was deleted


def test_only_tensorflows_start_up_lines_are_dropped():
    from launch import cli

    kept = ["E0000 00:00:1796302791.9 25778 saver.cc:10] could not write /tmp/x",
            "W1203 12:59:05.9 1405 polymorphic_function.py:157] 5 out of the last 9 calls"]
    dropped = ["WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
               "I0000 00:00:1796302789.37 25778 port.cc:153] oneDNN custom operations are on. You may",
               "I0000 00:00:1796302789.37 25778 cudart_stub.cc:31] Could not find cuda drivers",
               "E0000 00:00:1796302791.91 25778 cuda_platform.cc:52] failed call to cuInit: INTERNAL"]
    assert [line for line in kept + dropped if not cli._STARTUP_NOISE.search(line)] == kept


@pytest.mark.parametrize(
    "overrides, message",
    [
        # absl's flag parsing, before TensorFlow is imported.
        (["--config.model.bakbone=x"], "unknown config key: bakbone"),
        # A ValueError of the trainer (here from spec.resolve).
        (["--config.model.backbone=resnet5"], "Unknown backbone 'resnet5'. Choose one of: resnet50"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, images, overrides, message):
    result = run_train(tmp_path / "run", f"--config.data.source=folder:{images}", *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in error_line(result)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.weights": "/no/such/weights.h5"}, "/no/such/weights.h5"),
        ({"distribute.strategy": "tpu9"}, "Unknown distribute.strategy 'tpu9'"),
    ],
)
def test_bad_config_values_are_the_trainers_value_errors(tmp_path, images, overrides, message):
    config = tiny_config({"data.source": f"folder:{images}", **overrides})
    assert message in train_error(config, tmp_path / "run")


def test_empty_class_folder_is_an_input_error(tmp_path):
    os.makedirs(tmp_path / "data" / "cats")
    write_image_folder(tmp_path / "data", {"dogs": 4})
    line = train_error(tiny_config({"data.source": f"folder:{tmp_path / 'data'}"}), tmp_path / "run")
    assert "cats" in line and "no image files" in line


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_bad_image_files_are_skipped_and_listed_or_stop_the_run(tmp_path, monkeypatch, policy):
    root = write_image_folder(tmp_path / "data", {"dark": 10, "light": 10})
    good = (tmp_path / "data" / "dark" / "000.png").read_bytes()
    (tmp_path / "data" / "dark" / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "data" / "light" / "notes.jpg").write_text("not an image")
    config = tiny_config({
        "data.source": f"folder:{root}", "data.bad_files": policy, "train.epochs": 1,
        "export.enabled": False, "data.class_weights": True,
    })
    if policy == "fail":
        line = train_error(config, tmp_path / "run")
        assert "2 bad image file(s)" in line and "cut.png" in line and "notes.jpg" in line
        return
    logs = record_logs(monkeypatch)
    trainer.train(config, str(tmp_path / "run"))
    scan = json.loads((tmp_path / "run" / "data_scan.json").read_text())
    listed = json.dumps(scan)
    assert "cut.png" in listed and "notes.jpg" in listed
    assert any("cut.png" in line for line in logs), logs  # the log lists them too
    # Balanced classes (the bad files aside): both weights are 1.
    assert "Class weights (inverse frequency): dark 1, light 1." in logs


@pytest.mark.slow
def test_resume_refuses_data_that_changed_under_the_checkpoints(tmp_path):
    root = write_image_folder(tmp_path / "data", {"dark": 10, "light": 10})
    config = {"data.source": f"folder:{root}", "train.epochs": 1,
              "train.steps_per_epoch": 0, "export.enabled": False}
    trainer.train(tiny_config(config), str(tmp_path / "run"))
    # The start (step 0) and the end of the one epoch of 4 steps.
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["ckpt-000000000", "ckpt-000000004"]
    write_image_folder(tmp_path / "more", {"dark": 8}, seed=1)
    for name in os.listdir(tmp_path / "more" / "dark"):
        shutil.move(tmp_path / "more" / "dark" / name, tmp_path / "data" / "dark" / f"new-{name}")
    line = train_error(tiny_config(config), tmp_path / "run")
    assert "has 4 steps per epoch, the data now gives 5" in line and "resume=False" in line

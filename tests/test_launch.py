"""`python -m launch.train` end to end: the workdir contract, resume, errors."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import error_line, run_train, write_image_folder


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

    served = tf.saved_model.load(str(workdir / "export"))
    assert {"serving_default", "serving_uint8"} <= set(served.signatures)
    png = tf.io.encode_png(np.full((40, 30, 3), 200, np.uint8))
    out = served.signatures["serving_default"](images=tf.stack([png, png]))
    assert out["probabilities"].shape == (2, 2)
    assert set(out["classes"].numpy().tolist()) <= {b"dark", b"light"}

    # Rerunning the finished run trains nothing more.
    again = run_train(workdir, source)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "All 2 epochs are done" in again.stderr
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == 6

    # Losing the last checkpoint (as if killed during epoch 2) resumes epoch 2 only.
    shutil.rmtree(workdir / "checkpoints" / "ckpt-000000006")
    resumed = run_train(workdir, source)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt-000000003: 1 epoch(s) and 0 step(s) done" in resumed.stderr
    assert "Training epochs 2..2 of 2" in resumed.stderr
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == 6
    with open(workdir / "history.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]

    # A changed config cannot silently resume.
    changed = run_train(workdir, source, "--config.optimizer.momentum=0.5")
    assert changed.returncode == 2
    assert "optimizer.momentum: 0.9 -> 0.5" in error_line(changed)

    # Nor can a workdir whose checkpoints are all unreadable silently start over.
    for name in os.listdir(workdir / "checkpoints"):
        os.remove(workdir / "checkpoints" / name / "state.json")
    unreadable = run_train(workdir, source)
    assert unreadable.returncode == 2
    assert "is readable" in error_line(unreadable) and "resume=False" in error_line(unreadable)
    assert len(os.listdir(workdir / "checkpoints")) == 2  # nothing was deleted


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.model.bakbone=x"], "unknown config key: bakbone"),
        (["--config.model.backbone=resnet5"], "Unknown backbone 'resnet5'. Choose one of: resnet50"),
        (["--config.model.weights=/no/such/weights.h5"], "/no/such/weights.h5"),
        (["--config.distribute.strategy=tpu9"], "Unknown distribute.strategy 'tpu9'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, images, overrides, message):
    result = run_train(tmp_path / "run", f"--config.data.source=folder:{images}", *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in error_line(result)
    assert "Traceback" not in result.stderr


def test_empty_class_folder_is_one_line_and_exit_2(tmp_path):
    os.makedirs(tmp_path / "data" / "cats")
    write_image_folder(tmp_path / "data", {"dogs": 4})
    result = run_train(tmp_path / "run", f"--config.data.source=folder:{tmp_path / 'data'}")
    assert result.returncode == 2
    assert "cats" in error_line(result) and "no image files" in error_line(result)


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_bad_image_files_are_skipped_and_listed_or_stop_the_run(tmp_path, policy):
    root = write_image_folder(tmp_path / "data", {"dark": 10, "light": 10})
    good = (tmp_path / "data" / "dark" / "000.png").read_bytes()
    (tmp_path / "data" / "dark" / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "data" / "light" / "notes.jpg").write_text("not an image")
    result = run_train(
        tmp_path / "run", f"--config.data.source=folder:{root}",
        f"--config.data.bad_files={policy}", "--config.train.epochs=1",
        "--config.export.enabled=False", "--config.data.class_weights=True",
    )
    if policy == "fail":
        assert result.returncode == 2
        line = error_line(result)
        assert "2 bad image file(s)" in line and "cut.png" in line and "notes.jpg" in line
        return
    assert result.returncode == 0, result.stderr[-3000:]
    scan = json.loads((tmp_path / "run" / "data_scan.json").read_text())
    listed = json.dumps(scan)
    assert "cut.png" in listed and "notes.jpg" in listed
    assert "cut.png" in result.stderr  # the log lists them too
    # Balanced classes (the bad files aside): both weights are 1.
    assert "Class weights (inverse frequency): dark 1, light 1." in result.stderr


@pytest.mark.slow
def test_resume_refuses_data_that_changed_under_the_checkpoints(tmp_path):
    root = write_image_folder(tmp_path / "data", {"dark": 10, "light": 10})
    common = [f"--config.data.source=folder:{root}", "--config.train.epochs=1",
              "--config.train.steps_per_epoch=0", "--config.export.enabled=False"]
    first = run_train(tmp_path / "run", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    write_image_folder(tmp_path / "more", {"dark": 8}, seed=1)
    for name in os.listdir(tmp_path / "more" / "dark"):
        shutil.move(tmp_path / "more" / "dark" / name, tmp_path / "data" / "dark" / f"new-{name}")
    again = run_train(tmp_path / "run", *common)
    assert again.returncode == 2
    line = error_line(again)
    assert "has 4 steps per epoch, the data now gives 5" in line and "resume=False" in line

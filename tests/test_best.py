"""The best checkpoint (`checkpoint.keep_best`, `export.which`) and early
stopping (`train.early_stopping_patience`), on a tiny run whose validation
loss rises after its first epoch; their state survives a kill -9."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, noise_images, train_command, train_env
from keras_ft import best as best_lib, checkpoint, job as job_lib, trainer
from runs import printed, tiny_config

# At tiny's rate of 0.01, held constant, the random-init model's validation
# loss on the session's images jumps after the head-only epoch (measured:
# 0.61, 5.8, 66, 51): the best epoch is neither the last nor kept by
# checkpoint.keep=2. (Under the default cosine schedule the last epoch, at
# rates near 0, recovers and is the best.)
RISING = {"train.epochs": 4, "checkpoint.keep_best": "val_loss", "schedule.name": "constant"}


def _config(images, **overrides):
    return tiny_config({"data.source": f"folder:{images}", **RISING, **overrides})


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, images):
    workdir = tmp_path_factory.mktemp("best_run")
    return trainer.run(_config(images, **{"export.which": "best"}), str(workdir)), workdir


def test_the_best_epoch_is_kept_and_exported(best_run):
    result, workdir = best_run
    losses = [row["val_loss"] for row in result.history]
    best = int(np.argmin(losses))
    assert best < len(losses) - 1, losses  # the loss rose: "last" would be wrong
    steps = 3 * (best + 1)  # tiny: 3 steps an epoch
    assert result.metrics["best"] == {
        "metric": "val_loss", "value": pytest.approx(losses[best]), "epoch": best + 1,
        "global_step": steps, "since": len(losses) - best - 1,
    }
    names = sorted(os.listdir(workdir / "checkpoints"))
    assert f"ckpt-{steps:09d}" not in names  # pruned by keep=2 ...
    assert os.listdir(workdir / "checkpoints" / "best") == [f"ckpt-{steps:09d}"]  # ... kept here
    # metrics.json is of the best weights, and so is the export.
    assert result.metrics["weights"]["which"] == "best"
    assert result.metrics["val_loss"] == pytest.approx(losses[best], rel=1e-5)
    assert result.metrics["steps"] == 12  # the training steps done, not the best's
    best_model, state, _ = job_lib.load_trained(str(workdir))  # export.which of the run
    assert state["global_step"] == steps
    assert checkpoint.fingerprint(best_model) == result.metrics["weights_sha256"]
    last_model, _, _ = job_lib.load_trained(str(workdir), which="last")
    x = np.round(noise_images(4, seed=5)).astype(np.uint8)
    served = tf.saved_model.load(str(workdir / "export")).signatures["serving_uint8"]
    probabilities = served(images=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(
        probabilities, tf.nn.softmax(best_model(x.astype(np.float32))).numpy(), atol=1e-4
    )  # (graph and eager float32 differ by ~2e-5)
    assert not np.allclose(probabilities, tf.nn.softmax(last_model(x.astype(np.float32))).numpy(),
                           atol=1e-2)


def test_early_stopping_ends_the_run_and_its_rerun(best_run, tmp_path, images, monkeypatch):
    losses = [row["val_loss"] for row in best_run[0].history]
    best = int(np.argmin(losses))
    config = _config(images, **{"train.early_stopping_patience": 1, "export.enabled": False})
    metrics = trainer.train(config, str(tmp_path))
    assert metrics["early_stopped"] is True
    assert metrics["epochs"] == best + 2 and metrics["steps"] == 3 * (best + 2)
    with open(tmp_path / "history.csv") as f:
        assert len(f.read().splitlines()) == 1 + best + 2
    # Rerun: it was complete; no step is trained again.
    again = trainer.train(_config(images, **{"train.early_stopping_patience": 1,
                                             "export.enabled": False}), str(tmp_path))
    assert again["steps"] == metrics["steps"] and again["early_stopped"] is True
    assert again["weights_sha256"] == metrics["weights_sha256"]
    assert again["train_images_per_sec"] is None


def test_a_kill_between_the_save_and_the_best_copy_is_repaired(best_run, tmp_path, images,
                                                                 monkeypatch):
    real = checkpoint.CheckpointManager.keep_as_best
    calls = []

    def dies_once(self, path):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt  # after the epoch's checkpoint, before its copy
        return real(self, path)

    monkeypatch.setattr(checkpoint.CheckpointManager, "keep_as_best", dies_once)
    config = _config(images, **{"export.which": "best", "export.enabled": False})
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints" / "best")
    metrics = trainer.train(_config(images, **{"export.which": "best", "export.enabled": False}),
                            str(tmp_path))
    assert calls[1].endswith("ckpt-000000003")  # repaired at the resume
    assert metrics["best"] == best_run[0].metrics["best"]
    assert metrics["weights_sha256"] == best_run[0].metrics["weights_sha256"]


@pytest.mark.slow
def test_the_best_survives_a_kill_9(best_run, tmp_path, images):
    result, _ = best_run
    best_step = result.metrics["best"]["global_step"]
    flags = [f"--config.data.source=folder:{images}", "--config.train.epochs=4",
             "--config.schedule.name=constant", "--config.checkpoint.keep_best=val_loss",
             "--config.export.which=best", "--config.export.enabled=False"]
    kill_at = best_step + 4  # inside a later epoch than the best one
    killed = subprocess.run(
        [sys.executable, "tests/faults.py", "kill", str(kill_at)]
        + train_command(tmp_path, *flags)[3:],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    state = checkpoint.CheckpointManager.read_state(
        checkpoint.CheckpointManager.all_in(str(tmp_path / "checkpoints"))[-1])
    assert state["best"]["global_step"] == best_step  # the best so far is checkpoint state
    resumed = subprocess.run(train_command(tmp_path, *flags), cwd=REPO, env=train_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from"] and metrics["best"]["global_step"] == best_step
    assert metrics["best"]["value"] == pytest.approx(result.metrics["best"]["value"], rel=1e-5)
    assert os.listdir(tmp_path / "checkpoints" / "best") == [f"ckpt-{best_step:09d}"]
    assert metrics["val_loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-5)


# ------------------------------------------------------------------- units


def test_best_metric_modes_nan_and_state():
    loss = best_lib.BestMetric("val_loss", patience=2)
    assert loss.update(1, 3, {"val_loss": 1.0}) and not loss.update(2, 6, {"val_loss": 1.5})
    assert not loss.update(3, 9, {"val_loss": float("nan")})  # NaN is never a best
    assert loss.stop and (loss.epoch, loss.global_step, loss.since) == (1, 3, 2)
    accuracy = best_lib.BestMetric("val_accuracy")
    assert accuracy.update(1, 3, {"val_accuracy": 0.5})
    assert accuracy.update(2, 6, {"val_accuracy": 0.75}) and not accuracy.stop  # higher is better
    restored = best_lib.BestMetric("val_accuracy")
    restored.restore(accuracy.state())
    assert restored.state() == accuracy.state()
    other = best_lib.BestMetric("val_loss")
    other.restore(accuracy.state())  # another metric's state is not taken
    assert other.value is None
    with pytest.raises(ValueError, match="'val_loss' is not in the epoch's logs"):
        best_lib.BestMetric("val_loss").update(1, 3, {"loss": 1.0})


@pytest.mark.parametrize("overrides, message", [
    ({"checkpoint.keep_best": "val_acc"},
     "checkpoint.keep_best='val_acc' is not a metric logged each epoch. Choose one of: "
     "val_loss, val_accuracy, loss, accuracy (or '' for none)."),
    ({"export.which": "best"}, "export.which='best' exports the best checkpoint: set "
     "checkpoint.keep_best"),
    ({"export.which": "newest"}, "Unknown export.which 'newest'. Choose one of: last, best."),
    ({"train.early_stopping_patience": -1}, "train.early_stopping_patience must be an integer >= 0"),
])
def test_bad_values_are_one_line_errors(overrides, message, tmp_path):
    from keras_ft import spec

    with pytest.raises(ValueError) as raised:
        spec.resolve(tiny_config(overrides))
    assert message in printed(raised.value)
    assert not os.listdir(tmp_path)  # nothing written

"""A run that learned nothing fails instead of exporting (keras_ft.health)."""

import json
import os

import pytest

from conftest import error_line, run_train
from keras_ft import health


def _metrics(value):
    return {"main_metric": "val_accuracy", "val_accuracy": value}


def test_chance_margin_is_two_standard_errors():
    assert health.chance_margin(0.5, 100) == pytest.approx(0.1)
    assert health.chance_margin(0.1, 300) == pytest.approx(2 * (0.09 / 300) ** 0.5)
    assert health.chance_margin(0.9, 10**6) == 0.01  # never below 1 point
    assert health.chance_margin(0.6, 5) == pytest.approx(0.2)  # nor above half the way to 1


@pytest.mark.parametrize("history, cause", [
    ([{"loss": 2.3, "accuracy": 0.3}, {"loss": 12.8, "accuracy": 0.1}], "learning rate is too high"),
    ([{"loss": 2.3, "accuracy": 0.5}, {"loss": 0.2, "accuracy": 0.95}], "bn_train_eval_gap"),
    ([{"loss": 2.3, "accuracy": 0.1}, {"loss": 2.3, "accuracy": 0.11}], "nothing was learned"),
    ([], "nothing was learned"),
])
def test_chance_level_fails_naming_the_likely_cause(history, cause):
    with pytest.raises(health.ChanceLevel, match=cause) as raised:
        health.check_chance_level(_metrics(0.12), 0.1, 300, history)
    assert "0.120 is chance level" in str(raised.value) and "Nothing was exported" in str(raised.value)


def test_results_above_chance_or_without_a_chance_level_pass():
    health.check_chance_level(_metrics(0.14), 0.1, 300, [])  # margin 0.035
    health.check_chance_level(_metrics(0.0), None, 300, [])  # the task has no check
    with pytest.raises(health.ChanceLevel):
        health.check_chance_level(_metrics(0.13), 0.1, 300, [])


def test_image_data_chance_level_is_the_most_frequent_validation_class(tmp_path):
    from conftest import write_image_folder
    from runs import tiny_config
    from keras_ft import spec as spec_lib, tasks

    folder = write_image_folder(tmp_path / "images", {"a": 6, "b": 12, "c": 6})
    config = tiny_config({"data.source": f"folder:{folder}", "data.val_fraction": 0.5})
    spec = spec_lib.resolve(config)
    data = tasks.get(spec.task).load_data(spec)
    assert data.chance_level() == pytest.approx(0.5)  # stratified: 6 of 12 are "b"


def test_a_chance_level_run_exits_5_and_exports_nothing(tmp_path, images):
    result = run_train(
        tmp_path, f"--config.data.source=folder:{images}", "--config.train.fail_at_chance=True",
        "--config.optimizer.learning_rate=1e-9", "--config.train.epochs=1",
        "--config.freeze.stages=({'epochs': 1, 'blocks': 0},)",
    )
    assert result.returncode == 5, result.stderr[-3000:]
    assert "is chance level" in error_line(result)
    assert not os.path.exists(tmp_path / "export")
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    chance, examples = metrics["chance_level"], metrics["val_images"]
    assert chance == 0.5 and metrics["val_accuracy"] <= chance + health.chance_margin(chance, examples)


# ------------------------------------------------------------- loss spikes


def _spiky_run(workdir, monkeypatch, corrupt_at=21, kill_in_recovery=False, **overrides):
    """A tiny run of 2 x 12 steps whose batch `corrupt_at` (0-based, global)
    weighs 100x in the loss the first time the stream is read: a transient
    fault that is also a one-step rate jump."""
    from keras_ft import trainer
    from keras_ft.tasks import image_classification
    from runs import tiny_config

    real = image_classification.ImageData.train_stream
    calls = []

    def train_stream(self, skip_batches=0, features_of=None):
        ds = real(self, skip_batches, features_of)
        calls.append(skip_batches)
        if len(calls) > 1:
            return ds
        return ds.enumerate(skip_batches).map(lambda i, batch: (
            batch[0], batch[1], tf.fill(tf.shape(batch[1])[:1], tf.where(i == corrupt_at, 100.0, 1.0))
        ))

    monkeypatch.setattr(image_classification.ImageData, "train_stream", train_stream)
    if kill_in_recovery:  # the process dies as the rollback starts
        restore = checkpoint.CheckpointManager.restore_latest
        restores = []

        def dies(self):
            restores.append(1)
            if len(restores) > 1:  # the first is the start's
                raise KeyboardInterrupt
            return restore(self)

        monkeypatch.setattr(checkpoint.CheckpointManager, "restore_latest", dies)
    # (tiny's random-init model is itself unstable at its rate of 0.01)
    config = tiny_config({"train.steps_per_epoch": 12, "optimizer.learning_rate": 0.001, **overrides})
    try:
        return trainer.train(config, str(workdir)), calls
    finally:
        monkeypatch.undo()


import tensorflow as tf  # noqa: E402
from keras_ft import checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def spiked(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    workdir = tmp_path_factory.mktemp("spiked")
    metrics, calls = _spiky_run(workdir, monkeypatch)
    return metrics, calls, workdir


def test_a_spike_rolls_back_to_the_last_checkpoint_at_a_lower_rate(spiked):
    metrics, calls, workdir = spiked
    (event,) = metrics["recoveries"]
    # Step 22 of 24 spiked; the run went back to the end of epoch 1 (step 12)
    # and trained epoch 2 again with stage 2's rate x0.3.
    assert event["global_step"] == 22 and event["stage"] == 1 and event["lr_factor"] == 0.3
    assert event["loss"] > 6 * event["level"]
    assert calls == [0, 12]  # the stream read again from the checkpoint's step
    assert metrics["steps"] == 24 and metrics["epochs"] == 2
    assert 1 < metrics["loss_spike_max_ratio"] < 6  # the normal steps stayed below
    with open(os.path.join(workdir, "checkpoints", "recoveries.json")) as f:
        assert json.load(f) == metrics["recoveries"]
    with open(os.path.join(workdir, "history.csv")) as f:
        assert len(f.read().splitlines()) == 3  # header and two epochs, not three
    # The rate is checkpoint state: the last checkpoint has stage 2 at x0.3.
    from keras_ft import job as job_lib

    model, state, _ = job_lib.load_trained(str(workdir))
    assert state["recoveries"] == metrics["recoveries"]
    assert float(model.optimizer.lr_scale.numpy()) == pytest.approx(0.5 * 0.3)


def test_a_kill_during_the_rollback_resumes_exactly(tmp_path, spiked, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        _spiky_run(tmp_path, monkeypatch, kill_in_recovery=True)
    with open(tmp_path / "checkpoints" / "recoveries.json") as f:
        assert len(json.load(f)) == 1  # recorded before the rollback began
    resumed, _ = _spiky_run(tmp_path, monkeypatch, corrupt_at=-1)  # the fault was transient
    assert resumed["recoveries"] == spiked[0]["recoveries"]
    assert resumed["weights_sha256"] == spiked[0]["weights_sha256"]


def test_spikes_beyond_max_recoveries_stop_the_run(tmp_path, monkeypatch):
    with pytest.raises(health.TooManySpikes, match="Rolled back 0 time"):
        _spiky_run(tmp_path, monkeypatch, **{"train.max_recoveries": 0})
    # Nothing after the last good checkpoint was saved.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "ckpt-000000000", "ckpt-000000012", "recoveries.json"
    ] or sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt-000000000", "ckpt-000000012"]


class _Tracker:
    """The loss metric's sums, as LossGuard reads them."""

    name = "loss"

    def __init__(self):
        self.total, self.count = tf.Variable(0.0), tf.Variable(0.0)


class _Model:
    def __init__(self):
        self.metrics = [_Tracker()]


def _feed(guard, losses, regime=None):
    """Steps of the given losses (batch size 1) through `guard`; the index of
    the one that raised LossSpike, or None."""
    tracker = guard.model.metrics[0]
    for i, loss in enumerate(losses):
        if regime is not None:
            guard.regime = lambda value=regime[i]: value
        guard.on_train_batch_begin(i)
        tracker.total.assign_add(loss)
        tracker.count.assign_add(1.0)
        try:
            guard.on_train_batch_end(i)
        except health.LossSpike:
            return i
    return None


def _guard(factor=6.0):
    guard = health.LossGuard(factor, steps_per_epoch=1000)
    guard.set_model(_Model())
    return guard


def test_the_guard_judges_each_step_against_its_recent_level():
    start = [10.0] * 20  # the starting level: 10
    assert _feed(_guard(), start + [1.0] * 30 + [7.0]) is None  # 7x, but below the start
    assert _feed(_guard(), start + [1.0] * 30 + [13.0]) is None  # 13x, not 2x the start
    assert _feed(_guard(), start + [1.0] * 30 + [21.0]) == 50  # 21x and over 2x the start
    assert _feed(_guard(), start + [4.0] * 30 + [21.0]) is None  # 5.25x: under the factor
    assert _feed(_guard(), [2.0] * 5 + [float("nan")]) == 5  # non-finite: at any time
    assert _feed(_guard(), [2.0] * 5 + [500.0]) is None  # too early to know a level
    assert _feed(_guard(factor=0.0), start + [500.0]) is None  # off: NaN/inf only
    # A new BatchNorm regime (a stage switch): a new level, so no ratio test
    # until 20 steps are seen again.
    regime = [1] * 50 + [2] * 30
    assert _feed(_guard(), start + [1.0] * 30 + [21.0] * 30, regime) is None
    assert _feed(_guard(), start + [1.0] * 30 + [21.0] * 30) == 50

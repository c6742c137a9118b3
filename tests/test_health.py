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

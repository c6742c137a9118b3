"""The run spec and the workdir's saved configs: checked once, old runs still load."""

import json

import keras
import numpy as np
import pytest

from configs import base, tiny
from keras_ft import augment, data, job, spec, tasks, workdir


def test_saved_config_over_todays_defaults():
    saved = base.get_config().to_dict()
    del saved["optimizer"]["clip_norm"]  # a key added after this run
    saved["model"]["old_key"] = 3  # a key removed since
    saved["model"]["backbone"] = "resnet50"
    saved["freeze"]["stages"] = [{"epochs": 2, "blocks": 0}, {"epochs": 1, "blocks": -1}]
    config = workdir.with_defaults(saved)
    assert config.model.backbone == "resnet50"
    assert config.optimizer.clip_norm == 0.0
    assert "old_key" not in config.model
    assert config.freeze.stages == ({"epochs": 2, "blocks": 0}, {"epochs": 1, "blocks": -1})


def test_old_key_names_load_under_their_new_names(tmp_path):
    """Configs saved before `schedule.*` and `data.tfds.*` were grouped."""
    saved = base.get_config().to_dict()
    saved.pop("schedule"), saved.pop("task")
    saved["data"].pop("tfds")
    saved["optimizer"].update(schedule="step", warmup_steps=7, decay_factor=0.5)
    saved["data"].update(tfds_split="train[:50%]", tfds_label_key="coarse_label")
    config = workdir.with_defaults(saved)
    assert (config.schedule.name, config.schedule.warmup_steps) == ("step", 7)
    assert config.schedule.decay_factor == 0.5
    assert config.data.tfds.split == "train[:50%]"
    assert config.data.tfds.label_key == "coarse_label"
    assert config.task == "image_classification"
    assert "schedule" not in config.optimizer and "tfds_split" not in config.data
    # Such a run resumes with the same settings under today's names ...
    (tmp_path / "config.json").write_text(json.dumps(saved))
    workdir.check_resumable(str(tmp_path), config.to_dict())
    # ... and not with another schedule.
    config.schedule.name = "cosine"
    config.schedule.warmup_steps = 0
    with pytest.raises(ValueError, match=r"schedule.name: 'step' -> 'cosine'"):
        workdir.check_resumable(str(tmp_path), config.to_dict())


def test_runs_from_before_resize_and_augment_get_the_defaults(tmp_path):
    saved = base.get_config().to_dict()
    del saved["data"]["resize"], saved["data"]["augment"]  # keys added after this run
    config = workdir.with_defaults(saved)
    assert config.data.resize == "resize"
    assert spec.resolve(config).data.augment == augment.Augment()  # flips only, as before
    # Resuming such a run with today's defaults is the same config ...
    (tmp_path / "config.json").write_text(json.dumps(saved))
    workdir.check_resumable(str(tmp_path), base.get_config().to_dict())
    # ... while turning MixUp on is a change.
    changed = base.get_config()
    changed.data.augment.mixup = 0.2
    with pytest.raises(ValueError, match=r"data.augment.mixup: 0.0 -> 0.2"):
        workdir.check_resumable(str(tmp_path), changed.to_dict())


def test_resumable_changes_only_warn(tmp_path):
    config = base.get_config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    config.optimizer.learning_rate = 0.001  # e.g. after a NaN stop
    config.distribute.strategy = "mirrored"
    workdir.check_resumable(str(tmp_path), config.to_dict())


def test_the_spec_resolves_derived_values_once():
    config = tiny.get_config()
    config.model.image_size = 0
    config.optimizer.learning_rate = 0.1
    config.optimizer.lr_scaling = "linear"
    config.optimizer.lr_base_batch_size = 8
    config.freeze.stages = (dict(epochs=1, blocks=0), dict(steps=4, blocks=-1, lr_scale=0.5))
    run = spec.resolve(config)
    assert run.model.image_size == 224  # mobilenet_v2's default
    assert run.resolved["model"]["image_size"] == 224  # what config.json records
    assert run.optimizer.rate == pytest.approx(0.1 * 4 / 8)
    assert run.freeze.stages[1].steps == 4 and run.freeze.deepest == -1
    assert run.total_steps(steps_per_epoch=3) == 6
    with pytest.raises(AttributeError):  # frozen
        run.seed = 1


@pytest.mark.parametrize("key, value, message", [
    ("task", "detection", "Unknown task 'detection'. Choose one of: image_classification"),
    ("seed", -1, "seed must be an integer in [0, 2147483647], got -1"),
    ("model.backbone", "resnet5", "Unknown backbone 'resnet5'"),
    ("model.dropout", 1.0, "model.dropout must be a number in [0, 1), got 1.0"),
    ("data.val_fraction", 0.0, "data.val_fraction must be a number in (0, 1), got 0.0"),
    ("data.bad_files", "ignore", "Unknown data.bad_files 'ignore'. Choose one of: skip, fail"),
    ("data.resize", "stretch", "Unknown data.resize 'stretch'. Choose one of: resize"),
    ("data.augment.cutmix", 2.0, "data.augment.cutmix must be a number in [0, 1]"),
    ("data.cache_images_mb", 5000, "data.cache_images_mb must be a number in [0, 1900]"),
    ("train.epochs", 0, "train.epochs must be an integer >= 1, got 0"),
    ("train.steps_per_epoch", -5, "train.steps_per_epoch must be an integer >= 0"),
    ("train.global_batch_size", 0, "train.global_batch_size must be an integer >= 1"),
    ("train.precision", "float16", "Unknown train.precision 'float16'. Choose one of: float32"),
    ("train.jit_compile", "yes", "train.jit_compile must be True, False or 'auto'"),
    ("optimizer.momentum", 1.0, "optimizer.momentum must be a number in [0, 1), got 1.0"),
    ("optimizer.accumulation_steps", 0, "optimizer.accumulation_steps must be an integer >= 1"),
    ("optimizer.lr_find.end_lr", 1e-6, "optimizer.lr_find.end_lr (1e-06) must be above optimizer.lr_find.start_lr"),
    ("freeze.batchnorm", "train", "Unknown freeze.batchnorm 'train'. Choose one of: auto, frozen"),
    ("freeze.bn_momentum", 1.0, "freeze.bn_momentum must be a number in [0, 1) (0 = each layer's own), got 1.0"),
    ("freeze.method", "adapter", "Unknown freeze.method 'adapter'. Choose one of: full"),
    ("freeze.stages", (), "freeze.stages is empty"),
    ("distribute.strategy", "gpu", "Unknown distribute.strategy 'gpu'. Choose one of: auto"),
    ("checkpoint.keep", 0, "checkpoint.keep must be an integer >= 1, got 0"),
    ("checkpoint.every_seconds", -1.0, "checkpoint.every_seconds must be a number >= 0"),
])
def test_every_bad_value_names_its_key_and_the_choices(key, value, message):
    from runs import resolve_error, tiny_config

    assert message in resolve_error(tiny_config({key: value}))


def test_auto_rate_with_accumulation_fails_at_once():
    config = tiny.get_config()
    config.optimizer.learning_rate = "auto"
    config.optimizer.accumulation_steps = 2
    with pytest.raises(ValueError, match="runs the range test one update per batch"):
        spec.resolve(config)


def test_mixing_compiles_a_categorical_loss_that_the_train_step_takes():
    config = tiny.get_config()
    config.data.augment.mixup = 0.2
    config.data.augment.cutmix = 1.0
    run = spec.resolve(config)
    task = tasks.get(run.task)
    model = job.build_model(run, task, ["a", "b"], 4)
    assert isinstance(model.loss, keras.losses.CategoricalCrossentropy)
    rng = np.random.default_rng(0)
    images = data.from_arrays(rng.integers(0, 256, (8, 32, 32, 3)), [0, 1] * 4, ["a", "b"])
    train = data.make_dataset(images, 32, 4, training=True, augment=run.data.augment, one_hot=True)
    val = data.make_dataset(images, 32, 4, training=False, one_hot=True)
    history = model.fit(
        train, validation_data=val, steps_per_epoch=2, epochs=1, shuffle=False, verbose=0
    )
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.history)
    assert all(np.isfinite(v[0]) for v in history.history.values())
    # Without mixing: integer labels, as always.
    plain_spec = spec.resolve(tiny.get_config())
    plain = job.build_model(plain_spec, task, ["a", "b"], 4)
    assert isinstance(plain.loss, keras.losses.SparseCategoricalCrossentropy)


def test_bad_values_fail_before_the_workdir_is_touched(tmp_path):
    from keras_ft import trainer

    config = tiny.get_config()
    config.data.resize = "stretch"
    with pytest.raises(ValueError, match="Unknown data.resize 'stretch'. Choose one of: resize"):
        trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_recipe_overrides_name_real_keys():
    from keras_ft import recipe

    r = recipe.Recipe.for_data(num_examples=50_000, image_size=(300, 300), batch_size=64)
    config = base.get_config()
    for key, value in r.overrides().items():
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        assert leaf in node, key
        node[leaf] = value
    spec.resolve(config)

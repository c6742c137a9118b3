import pytest

from configs import base
from keras_ft import augment, trainer


def test_saved_config_over_todays_defaults():
    saved = base.get_config().to_dict()
    del saved["optimizer"]["clip_norm"]  # a key added after this run
    saved["model"]["old_key"] = 3  # a key removed since
    saved["model"]["backbone"] = "resnet50"
    saved["freeze"]["stages"] = [{"epochs": 2, "blocks": 0}, {"epochs": 1, "blocks": -1}]
    config = trainer._with_defaults(saved)
    assert config.model.backbone == "resnet50"
    assert config.optimizer.clip_norm == 0.0
    assert "old_key" not in config.model
    assert config.freeze.stages == ({"epochs": 2, "blocks": 0}, {"epochs": 1, "blocks": -1})


def test_runs_from_before_resize_and_augment_get_the_defaults(tmp_path):
    import json

    saved = base.get_config().to_dict()
    del saved["data"]["resize"], saved["data"]["augment"]  # keys added after this run
    config = trainer._with_defaults(saved)
    assert config.data.resize == "resize"
    assert trainer.augmentation(config) == augment.Augment()  # flips only, as before
    # Resuming such a run with today's defaults is the same config ...
    (tmp_path / "config.json").write_text(json.dumps(saved))
    trainer._check_resumable(str(tmp_path), base.get_config().to_dict())
    # ... while turning MixUp on is a change.
    changed = base.get_config()
    changed.data.augment.mixup = 0.2
    with pytest.raises(ValueError, match=r"data.augment.mixup: 0.0 -> 0.2"):
        trainer._check_resumable(str(tmp_path), changed.to_dict())


def test_mixing_compiles_a_categorical_loss_that_the_train_step_takes():
    import keras
    import numpy as np

    from configs import tiny
    from keras_ft import data, stages

    config = tiny.get_config()
    config.data.augment.mixup = 0.2
    config.data.augment.cutmix = 1.0
    model = trainer.build_model(config, ["a", "b"], 32, stages.parse(config.freeze.stages), 4)
    assert isinstance(model.loss, keras.losses.CategoricalCrossentropy)
    rng = np.random.default_rng(0)
    images = data.from_arrays(rng.integers(0, 256, (8, 32, 32, 3)), [0, 1] * 4, ["a", "b"])
    augment_config = trainer.augmentation(config)
    train = data.make_dataset(images, 32, 4, training=True, augment=augment_config, one_hot=True)
    val = data.make_dataset(images, 32, 4, training=False, one_hot=True)
    history = model.fit(
        train, validation_data=val, steps_per_epoch=2, epochs=1, shuffle=False, verbose=0
    )
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.history)
    assert all(np.isfinite(v[0]) for v in history.history.values())
    # Without mixing: integer labels, as always.
    plain = trainer.build_model(tiny.get_config(), ["a", "b"], 32, stages.parse(config.freeze.stages), 4)
    assert isinstance(plain.loss, keras.losses.SparseCategoricalCrossentropy)


def test_bad_resize_or_augment_values_fail_before_any_work(tmp_path):
    from configs import tiny

    config = tiny.get_config()
    config.data.resize = "stretch"
    with pytest.raises(ValueError, match="Unknown data.resize 'stretch'. Choose one of: resize"):
        trainer.train(config, str(tmp_path / "run"))
    config = tiny.get_config()
    config.data.augment.cutmix = 2.0
    with pytest.raises(ValueError, match=r"data.augment.cutmix must be a number in \[0, 1\]"):
        trainer.train(config, str(tmp_path / "run"))

from configs import base
from keras_ft import trainer


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

"""A tiny text run for tests and smoke checks: the text quickstart's recipe,
shrunk, on a 2-layer BERT of a local preset.

    python -m launch.train --config=configs/text_tiny.py --workdir=/tmp/text_tiny \\
        --config.model.backbone=preset:/path/to/preset --config.data.source=csv:/path/to/texts.csv

The preset is any KerasHub BERT preset directory; the tests write a tiny one
(2 layers, hidden 32, a few dozen WordPiece tokens). Runtime: well under a
minute on 2 CPU cores. It checks mechanics, not accuracy.
"""

from configs import text_quickstart


def get_config(arg=None):
    config = text_quickstart.get_config(arg)
    config.data.val_fraction = 0.25
    config.data.max_length = 16
    config.train.global_batch_size = 4
    config.train.epochs = 2
    config.train.steps_per_epoch = 3
    config.optimizer.learning_rate = 1e-3
    config.schedule.warmup_fraction = 0.2
    config.freeze.stages = (
        dict(epochs=1, blocks=0),  # head only
        dict(epochs=1, blocks=2, lr_scale=0.5),  # then the pooler and the top layer
    )
    config.train.fail_at_chance = False  # a few steps: mechanics only
    return config

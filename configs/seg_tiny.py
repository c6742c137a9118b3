"""A tiny segmentation run for tests and smoke checks: MobileNetV2 at 32 px, random init.

    python -m launch.train --config=configs/seg_tiny.py --workdir=/tmp/seg_tiny \\
        --config.data.source=folder:/path/to/pairs

Runtime: well under a minute on 2 CPU cores. It checks mechanics, not accuracy.
"""

from configs import seg_quickstart


def get_config(arg=None):
    config = seg_quickstart.get_config(arg)
    config.model.weights = "none"  # random init (a string, so it stays overridable)
    config.model.image_size = 32
    config.data.val_fraction = 0.25
    config.train.global_batch_size = 4
    config.train.epochs = 2
    config.train.steps_per_epoch = 3
    config.freeze.stages = (
        dict(epochs=1, blocks=0),  # the decoder only
        dict(epochs=1, blocks=2, lr_scale=0.5),  # then the top two blocks
    )
    # As configs/tiny.py: statistics from the training images, so the random
    # backbone's features depend on the image.
    config.freeze.batchnorm = "reestimate"
    config.train.fail_at_chance = False
    return config

"""A tiny run for tests and smoke checks: MobileNetV2 at 32 px, random init.

    python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny \\
        --config.data.source=folder:/path/to/images

Runtime: well under a minute on 2 CPU cores. It checks mechanics, not accuracy.
"""

from configs import base


def get_config(arg=None):
    config = base.get_config(arg)
    config.model.backbone = "mobilenet_v2"
    config.model.weights = "none"  # random init (a string, so it stays overridable)
    config.model.image_size = 32
    config.data.val_fraction = 0.25
    config.train.global_batch_size = 4
    config.train.epochs = 2
    config.train.steps_per_epoch = 3
    config.freeze.stages = (
        dict(epochs=1, blocks=0),  # head only
        dict(epochs=1, blocks=2, lr_scale=0.5),  # then the top two blocks
    )
    # Random-init BatchNorm statistics (mean 0, variance 1) make the random
    # backbone attenuate every image to features of ~1e-12: the logits would
    # not depend on the image, and a wrong gradient, crop replay or export
    # resize would go unseen. Statistics from the training images give
    # features of order 1.
    config.freeze.batchnorm = "reestimate"
    # A few steps from random init often end at chance: mechanics only.
    config.train.fail_at_chance = False
    return config

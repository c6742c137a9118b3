"""A tiny detection run for tests and smoke checks: MobileNetV2 at 65 px, random init.

    python -m launch.train --config=configs/det_tiny.py --workdir=/tmp/det_tiny \\
        --config.data.source=coco:IMAGES_DIR,ANNOTATIONS.json

Runtime: well under a minute on 2 CPU cores. It checks mechanics, not accuracy.
"""

from configs import det_quickstart


def get_config(arg=None):
    config = det_quickstart.get_config(arg)
    config.model.weights = "none"  # random init (a string, so it stays overridable)
    config.model.image_size = 65  # strides 8/16/32: 9, 5 and 3 cells
    config.data.val_fraction = 0.25
    config.data.augment.random_resized_crop = ()
    config.train.global_batch_size = 4
    config.train.epochs = 2
    config.train.steps_per_epoch = 3
    config.detection.fpn_filters = 16
    config.detection.head_convs = 1
    config.freeze.stages = (
        dict(epochs=1, blocks=0),  # the head only
        dict(epochs=1, blocks=2, lr_scale=0.5),  # then the top two blocks
    )
    # As configs/tiny.py: statistics from the training images, so the random
    # backbone's features depend on the image.
    config.freeze.batchnorm = "reestimate"
    config.train.fail_at_chance = False
    config.checkpoint.keep_best = ""
    return config

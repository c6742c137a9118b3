"""Feature caching: train a head on a frozen backbone without running it.

While a stage trains the head only, the backbone is a fixed function of its
input (frozen, BatchNorm in inference mode). `compute` runs it once over the
training images in every view the augmentation can produce — with flips
only, exactly two: as is and mirrored — and over the validation images;
`training_stream` then replays the image stream of `data.make_dataset`
element by element (the same order, the same flip coin at each position)
with the cached feature in place of the image. `Classifier.train_step`
takes such a batch of features and runs only pooling's successors (dropout,
head), so a cached head-only epoch gives the uncached one's updates, up to
float rounding in the backbone, at the cost of the head.

Augmentations with unbounded views (random resized crop, RandAugment,
MixUp, CutMix) cannot be cached exactly and are refused: turn them off for
the cached stage or turn caching off. Backbones with dropout inside
(EfficientNet, ConvNeXt's stochastic depth) are cached in inference mode,
which an uncached frozen stage does not do: their cached run is the sound
one but not bitwise the uncached one (the log says so).
"""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_ft import augment as augment_lib, backbones, data as data_lib, progress


@dataclasses.dataclass
class Cache:
    """Pooled backbone features of a run's training and validation images.

    Attributes:
        train: float32 `[views, N, D]`: view 0 as is, view 1 mirrored (if the
            run flips).
        train_labels: `[N]` (or one-hot `[N, C]`).
        val: float32 `[M, D]`.
        val_labels: `[M]` (or one-hot `[M, C]`).
        seconds: how long computing them took.
    """

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    seconds: float

    @property
    def nbytes(self) -> int:
        return self.train.nbytes + self.val.nbytes


def check_cacheable(augment: augment_lib.Augment) -> None:
    """Raises ValueError if `augment` makes views a cache cannot hold."""
    unbounded = [
        name for name, on in (
            ("random_resized_crop", augment.random_resized_crop),
            ("randaugment_ops", augment.randaugment_ops),
            ("mixup", augment.mixup),
            ("cutmix", augment.cutmix),
        ) if on
    ]
    if unbounded:
        raise ValueError(
            "data.cache_features=True needs augmentation limited to flips; "
            f"data.augment.{', data.augment.'.join(unbounded)} make(s) a new view of "
            "every image at every step. Turn those off, or data.cache_features off."
        )


def _extract(model, images: data_lib.ImageSet, image_size, resize, batch_size, flip) -> np.ndarray:
    extractor = model.feature_extractor()
    ds = data_lib.make_dataset(images, image_size, batch_size, training=False, resize=resize)
    if flip:
        ds = ds.map(lambda x, y: (tf.image.flip_left_right(x), y))
    verbose = 1 if progress.mode() == "bar" else 0  # Keras' own bar, on a terminal
    return np.asarray(extractor.predict(ds, verbose=verbose), np.float32)  # compiled, in order


def compute(
    model,
    train_set: data_lib.ImageSet,
    val_set: data_lib.ImageSet,
    image_size: int,
    batch_size: int,
    resize: str = "resize",
    augment: augment_lib.Augment | None = None,
    one_hot: bool = False,
) -> Cache:
    """Runs the frozen backbone once over every view of every image.

    Args:
        model: a `keras_ft.Classifier` (its backbone as it is now).
        train_set, val_set: the run's split.
        image_size, batch_size, resize: as for `data.make_dataset`.
        augment: the run's augmentation (flips at most: `check_cacheable`).
        one_hot: labels as one-hot rows, as the run's loss expects.
    """
    augment = augment or augment_lib.Augment()
    check_cacheable(augment)
    if any(isinstance(l, keras.layers.Dropout) for l in backbones.all_layers(model.backbone)):
        logging.warning(
            "Backbone %s has dropout inside: its cached features are computed in "
            "inference mode, unlike an uncached frozen stage's.", model.backbone_name,
        )
    start = time.perf_counter()
    views = [False, True] if augment.flip else [False]
    train = np.stack(
        [_extract(model, train_set, image_size, resize, batch_size, f) for f in views]
    )
    val = _extract(model, val_set, image_size, resize, batch_size, False)
    num_classes = len(train_set.class_names)

    def labels(images):
        y = np.asarray(images.labels)
        return np.eye(num_classes, dtype=np.float32)[y] if one_hot else y

    cache = Cache(train, labels(train_set), val, labels(val_set), time.perf_counter() - start)
    logging.info(
        "Cached %d x %d training and %d validation features of size %d (%.1f MB) in %.1fs.",
        len(views), len(train_set), len(val_set), train.shape[-1], cache.nbytes / 2**20,
        cache.seconds,
    )
    return cache


def training_stream(
    cache: Cache,
    batch_size: int,
    seed: int,
    skip_batches: int = 0,
    augment: augment_lib.Augment | None = None,
) -> tf.data.Dataset:
    """The image stream of `data.make_dataset(training=True)`, with features.

    The same `(position, index)` order (`data.training_order`), and at each
    position the view the image stream's flip takes there: the flip op itself
    is run on a two-pixel probe, so the coin is the same by construction.
    """
    augment = augment or augment_lib.Augment()
    check_cacheable(augment)
    pipeline = augment_lib.Pipeline(augment)
    features = tf.constant(cache.train)
    labels = tf.constant(cache.train_labels)
    probe = tf.constant([[[0.0] * 3, [1.0] * 3]])  # [1, 2, 3]: left 0, right 1

    def lookup(position, index):
        view = tf.constant(0, tf.int64)
        if augment.flip:
            flipped = pipeline.image(probe, seed, position)[0, 0, 0] > 0.5
            view = tf.cast(flipped, tf.int64)
        return features[view, index], labels[index]

    ds = data_lib.training_order(len(cache.train_labels), batch_size, seed, skip_batches)
    ds = ds.map(lookup, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def validation_stream(cache: Cache, batch_size: int) -> tf.data.Dataset:
    """The validation features in order, batched as the image pass is."""
    return tf.data.Dataset.from_tensor_slices((cache.val, cache.val_labels)).batch(batch_size)

"""Object detection's tf.data streams: images sized once, boxes moved with
the pixels, anchors matched per image.

Every image is decoded and stretched to the model's S x S once
(`keras_ft.data.resize_image`, policy "resize") and kept in memory, its
boxes scaled with it and padded to the most objects of any image
(`boxes.PADDING` rows). The training stream is `keras_ft.data.training_order`
(a pure function of the seed: `skip_batches` resumes it exactly); each
example is augmented by draws from `(seed, position)` and matched to the
anchors (`boxes.match`), so batches are `(images [B, S, S, 3], targets
[B, A, 5])`.

Keras' box-aware augmentation layers (`RandomFlip`, `RandomCrop`,
`RandomZoom` with `bounding_box_format=`) draw from a stateful
`SeedGenerator`: a resumed run would not see the augmentations the
stopped one would have. The two augmentations here are written out with
stateless draws by position, like every other augmentation in keras_ft:

    flip                 left-right with probability 1/2 (the draw
                         `keras_ft.augment`'s flip makes for an image at the
                         same position): x1, x2 = S - x2, S - x1
    random_resized_crop  (min, max): a crop of that share of the area,
                         aspect ratio 3/4..4/3, resized back to S x S; boxes
                         are moved and clipped to it, and an object with
                         less than `KEEP_VISIBLE` of its box left in the
                         crop is dropped (no target for a sliver)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_ft import augment as augment_lib, data as data_lib, limits
from keras_ft.detection import boxes as boxes_lib

KEEP_VISIBLE = 0.4  # share of a box's area that must stay inside a crop


def decoded_image(data, i: int) -> np.ndarray:
    """Image `i` of `data` (a `sources.DetSet`, checked when it was read)
    decoded as training decodes it: uint8 `[H, W, 3]`."""
    try:
        blob = limits.read_regular(data.images[i], data.root)
    except limits.Refused as e:
        raise ValueError(f"Image {data.images[i]}: {e.reason} (changed since it was read).") from None
    return data_lib.decode_image(tf.constant(blob)).numpy()


def size_all(data, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image of `data` (a `keras_ft.detection.sources.DetSet`) sized
    once: float32 images `[N, S, S, 3]` in [0, 255], boxes `[N, M, 4]` xyxy
    in the S x S pixels (rows of `PADDING` past each image's objects), int32
    classes `[N, M]`; M is the most objects of any image, at least 1."""
    n = len(data)
    most = max([len(b) for b in data.boxes] + [1])
    images = np.zeros((n, image_size, image_size, 3), np.float32)
    boxes = np.full((n, most, 4), boxes_lib.PADDING, np.float32)
    classes = np.zeros((n, most), np.int32)
    for i in range(n):
        images[i] = data_lib.resize_image(decoded_image(data, i), image_size, "resize").numpy()
        h, w = data.sizes[i]
        k = len(data.boxes[i])
        if k:
            boxes[i, :k] = data.boxes[i] * image_size / np.array([w, h, w, h], np.float32)
            classes[i, :k] = data.classes[i]
    return images, boxes, classes


def flip(image, boxes, coin):
    """`image` `[S, S, 3]` and its boxes `[M, 4]` mirrored left-right where
    `coin` is True; padding rows stay padding."""
    side = tf.cast(tf.shape(image)[1], tf.float32)
    mirrored = tf.stack([side - boxes[:, 2], boxes[:, 1], side - boxes[:, 0], boxes[:, 3]], axis=-1)
    valid = tf.reduce_any(tf.not_equal(boxes, boxes_lib.PADDING), axis=-1, keepdims=True)
    mirrored = tf.where(valid, mirrored, boxes)
    return tf.where(coin, image[:, ::-1], image), tf.where(coin, mirrored, boxes)


def crop(image, boxes, window):
    """`image` `[S, S, 3]` cropped to `window` (y1, x1, y2, x2 as fractions
    of the side) and resized back to S x S (bilinear), with its boxes `[M, 4]`
    moved and clipped to the crop. A box left with less than `KEEP_VISIBLE`
    of its area becomes a padding row."""
    side = tf.cast(tf.shape(image)[0], tf.float32)
    out = tf.image.crop_and_resize(image[None], window[None], [0], tf.shape(image)[:2])[0]
    y1, x1, y2, x2 = tf.unstack(window * side)
    scale = tf.stack([side / (x2 - x1), side / (y2 - y1)] * 2)
    offset = tf.stack([x1, y1, x1, y1])
    moved = tf.clip_by_value((boxes - offset) * scale, 0.0, side)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept_area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1]) / (scale[0] * scale[1])
    valid = tf.reduce_any(tf.not_equal(boxes, boxes_lib.PADDING), axis=-1)
    keep = valid & (kept_area >= KEEP_VISIBLE * tf.maximum(area, 1e-6))
    return out, tf.where(keep[:, None], moved, boxes_lib.PADDING)


def crop_window(seed, area_range) -> tf.Tensor:
    """A random crop window (y1, x1, y2, x2 in [0, 1]) of `area_range` of
    the area, aspect ratio in [3/4, 4/3] (log-uniform), from `seed`."""
    draws = tf.random.stateless_uniform([4], seed=seed)
    area = area_range[0] + (area_range[1] - area_range[0]) * draws[0]
    ratio = tf.exp(np.log(3 / 4) + (np.log(4 / 3) - np.log(3 / 4)) * draws[1])
    w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    y1, x1 = (1.0 - h) * draws[2], (1.0 - w) * draws[3]
    return tf.stack([y1, x1, y1 + h, x1 + w])


def make_dataset(sized, anchor_boxes, anchor_spec, batch_size: int, training: bool,
                 seed: int = 0, skip_batches: int = 0, flip_images: bool = True,
                 crop_area: tuple = ()) -> tf.data.Dataset:
    """A batched stream of `(images, targets)` (module docstring).

    Args:
        sized: `size_all`'s arrays.
        anchor_boxes, anchor_spec: the model's anchors (`Detector`).
        batch_size: examples per batch (global).
        training: the endless augmented stream, or one pass in order.
        seed, skip_batches: the training stream's seed and start.
        flip_images: the random left-right flip (training only).
        crop_area: `(min, max)` share of the area for a random crop; () = off.
    """
    images, boxes, classes = (tf.constant(a) for a in sized)
    n = int(sized[0].shape[0])
    anchor_boxes = tf.constant(anchor_boxes)

    def targets(index, image, moved):
        return image, boxes_lib.match(anchor_boxes, moved, classes[index], anchor_spec)

    if not training:
        ds = tf.data.Dataset.range(n).map(lambda i: targets(i, images[i], boxes[i]),
                                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    if n < batch_size:
        raise ValueError(f"batch_size {batch_size} is more than the {n} training images; "
                         "lower train.global_batch_size or add images.")

    def load(position, index):
        image, moved = images[index], boxes[index]
        element = augment_lib.element_seed(seed, position)
        if crop_area:
            image, moved = crop(image, moved, crop_window(augment_lib.fold(element, 1), crop_area))
        if flip_images:
            coin = tf.random.stateless_uniform([], seed=element) < 0.5
            image, moved = flip(image, moved, coin)
        return targets(index, image, moved)

    ds = data_lib.training_order(n, batch_size, seed, skip_batches)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

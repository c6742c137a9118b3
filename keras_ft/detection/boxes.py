"""Anchors, anchor matching, box encoding and decoding, and NMS.

Boxes are `xyxy` in pixels of the model's S x S input: x1, y1, x2, y2 with
x2 > x1, y2 > y1, pixel edges (a box over pixels 0..9 is 0 to 10).

The box arithmetic is Keras' own (`keras.utils.bounding_boxes`: IoU, box to
delta encoding and back, in `center_yxhw` deltas). Two parts keras-hub 0.32
offers are written out here because they do not fit:

* `AnchorGenerator` puts anchor centres at `i * (S // ceil(S / stride))`,
  the corner of a cell and, at S = 129, a stride of 7 instead of 8: the
  anchors drift off the feature cells they are predicted from. Ours are at
  the cell centres, `(i + 0.5) * S / cells`, on the feature maps' real sizes
  (a backbone with valid padding has fewer cells than ceil(S / stride)).
* `BoxMatcher` with `force_match_for_each_col` force-matches the padding
  columns of a batch (boxes of -1) to anchor 0. `match` masks them.

NMS is `tf.image.combined_non_max_suppression`, which runs in a SavedModel
with a dynamic batch (keras-hub's `NonMaxSuppression` layer does not).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

BACKGROUND = -1.0  # class target of an anchor that matches no object
IGNORED = -2.0  # class target of an anchor between the thresholds: no loss
PADDING = -1.0  # a box row of -1 pads a batch's box lists
DELTAS = "center_yxhw"  # the encoding of `keras.utils.bounding_boxes`


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    """The anchors of a detector, per pyramid level (TF Model Garden's
    RetinaNet defaults: 3 scales, aspect ratios 0.5, 1, 2, size 4 strides).

    Attributes:
        levels: pyramid levels; level l has stride 2**l.
        num_scales: anchor sizes per octave: 2**(i / num_scales), i < num_scales.
        aspect_ratios: width / height of the anchors.
        anchor_size: the base anchor's side, in strides of its level.
        positive_iou: an anchor matches an object at this IoU or above.
        negative_iou: below this IoU with every object it is background;
            in between it is ignored by the loss.
    """

    levels: tuple[int, ...] = (3, 4, 5)
    num_scales: int = 3
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_size: float = 4.0
    positive_iou: float = 0.5
    negative_iou: float = 0.4

    @property
    def per_cell(self) -> int:
        """Anchors at each feature-map cell."""
        return self.num_scales * len(self.aspect_ratios)


def anchors(spec: AnchorSpec, image_size: int, grids: Sequence[tuple[int, int]]) -> np.ndarray:
    """Every anchor of an S x S input, float32 `[A, 4]` xyxy.

    Ordered as the detector's outputs are: level by level, then the cells
    of that level's `(rows, columns)` grid row by row, then the anchors of
    a cell (aspect ratio, then scale).
    """
    if len(grids) != len(spec.levels):
        raise ValueError(f"{len(grids)} grids for {len(spec.levels)} levels {spec.levels}.")
    out = []
    for level, (rows, cols) in zip(spec.levels, grids):
        base = spec.anchor_size * 2.0 ** level
        shapes = []
        for ratio in spec.aspect_ratios:
            for scale in range(spec.num_scales):
                size = base * 2.0 ** (scale / spec.num_scales)
                shapes.append((size * math.sqrt(ratio), size / math.sqrt(ratio)))  # w, h
        shapes = np.array(shapes, np.float64)
        cy = (np.arange(rows) + 0.5) * image_size / rows
        cx = (np.arange(cols) + 0.5) * image_size / cols
        cy, cx = np.meshgrid(cy, cx, indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel()], -1)[:, None, :]  # [cells, 1, 2]
        half = shapes[None, :, :] / 2  # [1, per_cell, 2]
        boxes = np.concatenate([centres - half, centres + half], -1)
        out.append(boxes.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def iou(boxes1, boxes2) -> tf.Tensor:
    """IoU of every pair, `[..., N, M]`, of xyxy boxes (Keras' `compute_iou`)."""
    return keras.utils.bounding_boxes.compute_iou(
        tf.convert_to_tensor(boxes1, tf.float32), tf.convert_to_tensor(boxes2, tf.float32), "xyxy")


def match(anchor_boxes, boxes, classes, spec: AnchorSpec) -> tf.Tensor:
    """The training targets of one image: float32 `[A, 5]`, the box deltas of
    each anchor's object (`encode`) and its class target.

    An anchor's object is the one it overlaps most. Its class target is that
    object's class at IoU >= `positive_iou`, `BACKGROUND` below
    `negative_iou`, `IGNORED` in between (RetinaNet, Lin et al., 2017).
    Then each object is also matched to the anchor it overlaps most, whatever
    the IoU, so that no object is left without an anchor (a small or thin
    object may reach 0.5 with none).

    Args:
        anchor_boxes: `[A, 4]` xyxy (`anchors`).
        boxes: `[M, 4]` xyxy; rows of `PADDING` pad the list and match nothing.
        classes: `[M]` class indices.
        spec: the thresholds.
    """
    anchor_boxes = tf.convert_to_tensor(anchor_boxes, tf.float32)
    # One padding row more, so that an image without objects has a column.
    boxes = tf.concat([tf.reshape(tf.cast(boxes, tf.float32), [-1, 4]),
                       tf.fill([1, 4], PADDING)], axis=0)
    classes = tf.concat([tf.reshape(tf.cast(classes, tf.float32), [-1]), [0.0]], axis=0)
    valid = tf.reduce_any(tf.not_equal(boxes, PADDING), axis=-1)  # [M]
    overlap = tf.where(valid[None, :], iou(anchor_boxes, boxes), -1.0)  # [A, M]
    has_objects = tf.reduce_any(valid)
    best = tf.where(has_objects, tf.reduce_max(overlap, axis=1), 0.0)  # [A]
    which = tf.argmax(overlap, axis=1, output_type=tf.int32)
    target = tf.where(best >= spec.positive_iou, tf.gather(classes, which),
                      tf.where(best < spec.negative_iou, BACKGROUND, IGNORED))
    # Each object's best anchor is its own positive, whatever the IoU.
    nearest = tf.argmax(overlap, axis=0, output_type=tf.int32)  # [M]
    objects = tf.boolean_mask(tf.range(tf.shape(boxes)[0]), valid)
    anchor_of = tf.gather(nearest, objects)[:, None]
    which = tf.tensor_scatter_nd_update(which, anchor_of, objects)
    target = tf.tensor_scatter_nd_update(target, anchor_of, tf.gather(classes, objects))
    matched = tf.gather(boxes, which)
    deltas = encode(anchor_boxes, tf.where(has_objects, matched, anchor_boxes))
    return tf.concat([deltas, target[:, None]], axis=-1)


def encode(anchor_boxes, boxes) -> tf.Tensor:
    """Deltas of `boxes` from `anchor_boxes` (both `[..., A, 4]` xyxy):
    centre offsets in anchor sides, log side ratios (`center_yxhw`)."""
    return keras.utils.bounding_boxes.encode_box_to_deltas(
        anchor_boxes, boxes, anchor_format="xyxy", box_format="xyxy", encoding_format=DELTAS)


def decode(anchor_boxes, deltas) -> tf.Tensor:
    """The xyxy boxes of `deltas` from `anchor_boxes` (`encode`'s inverse)."""
    return keras.utils.bounding_boxes.decode_deltas_to_boxes(
        anchor_boxes, deltas, anchor_format="xyxy", box_format="xyxy", encoded_format=DELTAS)


@dataclasses.dataclass(frozen=True)
class Detections:
    """NMS's output for a batch: boxes `[N, K, 4]` xyxy, scores `[N, K]`,
    classes int32 `[N, K]`, and `count` int32 `[N]` (rows past it are 0)."""

    boxes: tf.Tensor
    scores: tf.Tensor
    classes: tf.Tensor
    count: tf.Tensor


def detect(anchor_boxes, outputs, num_classes: int, max_detections: int = 100,
           score_threshold: float = 0.05, iou_threshold: float = 0.5) -> Detections:
    """The detections of a batch of the detector's outputs `[N, A, 4 + C]`.

    Per class: scores sigmoid(logit) above `score_threshold`, greedy NMS at
    `iou_threshold`; then the `max_detections` best over all classes (COCO
    counts 100 per image). Boxes are in the model's input pixels, unclipped.
    """
    outputs = tf.cast(outputs, tf.float32)
    boxes = decode(anchor_boxes, outputs[..., :4])
    scores = tf.sigmoid(outputs[..., 4:4 + num_classes])
    # combined_non_max_suppression reads its boxes as (y1, x1, y2, x2): the
    # IoU is the same for (x1, y1, x2, y2), and clip_boxes=False keeps pixels.
    nms = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :], scores, max_output_size_per_class=max_detections,
        max_total_size=max_detections, iou_threshold=iou_threshold,
        score_threshold=score_threshold, clip_boxes=False)
    return Detections(nms.nmsed_boxes, nms.nmsed_scores, tf.cast(nms.nmsed_classes, tf.int32),
                      nms.valid_detections)

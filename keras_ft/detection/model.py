"""Object detection's model: a registry backbone with a RetinaNet head.

`Detector` is a `keras_ft.model.FineTuneModel`, so the shared recipe
(staged freezing by the backbone's blocks, the BatchNorm policy,
discriminative rates, L2-SP, PEFT, exact resume) applies unchanged. The
head is the feature pyramid and the two subnets: it trains in every stage,
so stages read "heads only (blocks=0) -> the top k blocks -> all".

RetinaNet (Lin et al., 2017), sized for small inputs:

    images -> preprocessing -> backbone: C3, C4, C5 (strides 8, 16, 32,
        found by shape as segmentation finds its stride-4 features)
    FPN: 1x1 lateral convs to `fpn_filters`; top-down, each level plus the
        level above resized (nearest) to its size; a 3x3 conv per level: P3..P5
    shared over the levels:
        class subnet: `head_convs` 3x3 ReLU convs, then a 3x3 conv to
            anchors x classes, its bias -log((1 - p) / p), p = 0.01 (the
            focal-loss prior: every anchor starts as background with
            probability 0.99, so the loss of the ~10^4 easy negatives does
            not swamp the first steps)
        box subnet: `head_convs` 3x3 ReLU convs, then a 3x3 conv to anchors x 4
    outputs [N, A, 4 + C] float32: per anchor, its box deltas
        (`keras_ft.detection.boxes.encode`) and its class logits

The head has no normalisation layer (batches of a few images on a CPU); its
hidden convs keep the signal's variance (He init) and the output convs
start small (N(0, 0.01), as in the paper). The anchors are a constant of
the model (`anchor_boxes`), made from its feature maps' real sizes.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np

from keras_ft import backbones, model as model_lib, seg_model
from keras_ft.detection import boxes as boxes_lib

PRIOR = 0.01  # the class subnet's starting probability of any class


def _conv(filters: int, name: str, activation="relu", bias=None, small=False):
    return keras.layers.Conv2D(
        filters, 3, padding="same", activation=activation, name=name,
        kernel_initializer=keras.initializers.RandomNormal(stddev=1e-5) if small else "he_normal",
        bias_initializer=keras.initializers.Constant(bias) if bias is not None else "zeros")


class _Subnet:
    """One of RetinaNet's two subnets, its layers shared by every level."""

    def __init__(self, name: str, filters: int, convs: int, outputs: int, bias=None):
        self.hidden = [_conv(filters, f"{name}_conv{i + 1}") for i in range(convs)]
        self.out = _conv(outputs, f"{name}_out", activation=None, bias=bias, small=True)

    def __call__(self, x):
        for layer in self.hidden:
            x = layer(x)
        return self.out(x)


@keras.saving.register_keras_serializable(package="keras_ft")
class Detector(model_lib.FineTuneModel):
    """A backbone with a RetinaNet head (see the module docstring).

    Inputs are float RGB images in [0, 255] of shape `(N, S, S, 3)`; the
    backbone's preprocessing runs inside. Outputs: `(N, A, 4 + num_classes)`
    float32, per anchor of `anchor_boxes`.

    Args:
        backbone: a `keras.Model` without its top (`keras_ft.backbones.build`).
        num_classes: object classes (no background class).
        preprocessing: `Preprocess` mode for the backbone's weights.
        backbone_name: registry name of the backbone (its block map).
        class_names: optional names of the classes, in label order.
        fpn_filters: channels of the pyramid and of the subnets.
        head_convs: hidden 3x3 convs of each subnet.
        anchor_size, num_scales, aspect_ratios: the anchors (`AnchorSpec`).
    """

    def __init__(self, backbone: keras.Model, num_classes: int, preprocessing: str = "none",
                 backbone_name: str | None = None, class_names: Sequence[str] | None = None,
                 fpn_filters: int = 96, head_convs: int = 2, anchor_size: float = 4.0,
                 num_scales: int = 3, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 **kwargs):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        spec = boxes_lib.AnchorSpec(num_scales=num_scales, aspect_ratios=tuple(aspect_ratios),
                                    anchor_size=anchor_size)
        side = int(backbone.input_shape[1])
        names = [seg_model.stride_layer(backbone, 2 ** level) for level in spec.levels]
        if len(set(names)) < len(names):
            raise ValueError(
                f"Backbone '{backbone.name}' at image_size={side} has no distinct feature maps "
                f"at strides 8, 16 and 32 (layers {names}): use a larger model.image_size.")
        features = keras.Model(backbone.inputs, [backbone.get_layer(n).output for n in names],
                               name=backbone.name)
        inputs = keras.Input(shape=(side, side, 3), name="images")
        preprocess = backbones.Preprocess(preprocessing, name="preprocess")
        levels = features(preprocess(inputs))
        f, a = fpn_filters, spec.per_cell
        laterals = [keras.layers.Conv2D(f, 1, name=f"fpn_lateral{level}")(c)
                    for level, c in zip(spec.levels, levels)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):  # top-down
            above = keras.layers.Resizing(int(lateral.shape[1]), int(lateral.shape[2]),
                                          interpolation="nearest")(merged[0])
            merged.insert(0, keras.layers.Add()([lateral, above]))
        pyramid = [_conv(f, f"fpn_out{level}", activation=None)(m)
                   for level, m in zip(spec.levels, merged)]
        classes = _Subnet("class", f, head_convs, a * num_classes,
                          bias=-math.log((1 - PRIOR) / PRIOR))
        box = _Subnet("box", f, head_convs, a * 4)
        outputs = []
        for p in pyramid:
            cells = int(p.shape[1]) * int(p.shape[2]) * a
            outputs.append(keras.layers.Concatenate(axis=-1)([
                keras.layers.Reshape((cells, 4))(box(p)),
                keras.layers.Reshape((cells, num_classes))(classes(p))]))
        outputs = keras.layers.Concatenate(axis=1, name="outputs", dtype="float32")(outputs)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.num_classes = num_classes
        self.preprocessing = preprocessing
        self.class_names = list(class_names) if class_names else None
        self.fpn_filters, self.head_convs = f, head_convs
        self.anchor_spec = spec
        self.grids = [(int(p.shape[1]), int(p.shape[2])) for p in pyramid]
        self.anchor_boxes = boxes_lib.anchors(spec, side, self.grids)
        self.feature_layers = names
        self.start_finetuning(features, backbone_name, preprocess)

    @property
    def image_size(self) -> int:
        return int(self.input_shape[1])

    def detect(self, images, training: bool = False, **nms) -> boxes_lib.Detections:
        """Detections in the model's input pixels for images `[N, S, S, 3]`."""
        return boxes_lib.detect(self.anchor_boxes, self(images, training=training),
                                self.num_classes, **nms)

    def get_config(self):
        s = self.anchor_spec
        return {
            "name": self.name, "backbone_name": self.backbone_name, "image_size": self.image_size,
            "num_classes": self.num_classes, "preprocessing": self.preprocessing,
            "class_names": self.class_names, "fpn_filters": self.fpn_filters,
            "head_convs": self.head_convs, "anchor_size": s.anchor_size,
            "num_scales": s.num_scales, "aspect_ratios": list(s.aspect_ratios),
        }


def to_input_pixels(boxes, sizes, image_size: int):
    """Boxes `[N, K, 4]` xyxy in the model's S x S input, back in each image's
    own pixels (`sizes` `[N, 2]`: height, width), clipped to the image. The
    inverse of the stretch `keras_ft.data.resize_image` ("resize") made."""
    import tensorflow as tf

    sizes = tf.cast(sizes, tf.float32)
    h, w = sizes[:, 0:1], sizes[:, 1:2]  # [N, 1]
    scale = tf.stack([w, h, w, h], axis=-1) / float(image_size)  # [N, 1, 4]
    limit = tf.stack([w, h, w, h], axis=-1)
    return tf.clip_by_value(boxes * scale, 0.0, limit)


def export_saved_model(model: Detector, path: str, class_names: Sequence[str],
                       max_detections: int = 100, score_threshold: float = 0.05) -> str:
    """Exports `model` with signatures that serve raw images of any size.

    Signatures:
        serving_default  images: string [N] (encoded JPEG/PNG/BMP/GIF, each
                         of any size; N dynamic)
        serving_uint8    images: uint8 [N, H, W, 3] (one size)
    Both return, for up to `max_detections` objects per image (score above
    `score_threshold`, after per-class NMS at IoU 0.5): `boxes` float32
    [N, K, 4] (x1, y1, x2, y2 in the image's own pixels), `scores` [N, K],
    `classes` int32 [N, K], `class_names` string [N, K] and
    `num_detections` int32 [N]; rows past `num_detections` are zeros (names "").
    Each image is stretched to the model's S x S as in training
    (`keras_ft.data.resize_image`, policy "resize"). `loaded.task[0]` is
    "object_detection". Written atomically (`keras_ft.export.write_archive`).
    """
    import tensorflow as tf

    from keras_ft import data, export as export_lib

    side = model.image_size
    names = tf.constant(list(class_names))
    anchor_boxes = tf.constant(model.anchor_boxes)

    def predict(images, sizes):  # float [N, S, S, 3], int [N, 2]
        found = boxes_lib.detect(anchor_boxes, model(images, training=False), model.num_classes,
                                 max_detections=max_detections, score_threshold=score_threshold)
        valid = tf.sequence_mask(found.count, max_detections)
        return {
            "boxes": to_input_pixels(found.boxes, sizes, side) * tf.cast(valid, tf.float32)[..., None],
            "scores": found.scores,
            "classes": found.classes,
            "class_names": tf.where(valid, tf.gather(names, found.classes), ""),
            "num_detections": found.count,
        }

    def sized(image):
        decoded = data.decode_image(image)
        return data.resize_image(decoded, side), tf.shape(decoded)[:2]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_bytes(images):
        resized, sizes = tf.map_fn(
            sized, images, fn_output_signature=(tf.TensorSpec([side, side, 3], tf.float32),
                                                tf.TensorSpec([2], tf.int32)))
        return predict(resized, sizes)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_uint8(images):
        size = tf.shape(images)[1:3]
        sizes = tf.tile(size[None], [tf.shape(images)[0], 1])
        return predict(data.resize_image(images, side), sizes)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("serving_uint8", serve_uint8)
    archive.add_variable_collection("class_names", export_lib.class_names_variable(names))
    archive.add_variable_collection(
        "task", [tf.Variable("object_detection", trainable=False, name="task")])
    return export_lib.write_archive(archive, path)


def detections_as_numpy(found: boxes_lib.Detections) -> list[dict]:
    """Per image, its detections as numpy arrays: `boxes` [k, 4], `scores`
    [k], `classes` [k] (k = its count)."""
    out = []
    for i, k in enumerate(np.asarray(found.count)):
        out.append({"boxes": np.asarray(found.boxes[i, :k]), "scores": np.asarray(found.scores[i, :k]),
                    "classes": np.asarray(found.classes[i, :k])})
    return out

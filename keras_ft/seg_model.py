"""Semantic segmentation's model: a registry backbone with a DeepLabV3+ head.

`Segmenter` is a `keras_ft.model.FineTuneModel`, so the shared recipe
(staged freezing by the backbone's blocks, BatchNorm frozen, discriminative
rates, L2-SP, PEFT, exact resume) applies unchanged. The head is the
decoder: it trains in every stage, so the stage presets read "decoder only
(blocks=0) -> the top k blocks -> all".

DeepLabV3+ (Chen et al., 2018), sized for small inputs:

    images -> preprocessing -> backbone
      deepest features (stride 32) -> ASPP: 1x1 conv, three 3x3 separable
          convs at dilation `aspp_rates`, image pooling; concatenated -> 1x1 conv
      -> bilinear resize to the stride-4 features
      stride-4 features (the last backbone layer at 1/4 of the input) -> 1x1 conv (48)
      concatenated -> two 3x3 convs -> 1x1 conv to the classes
      -> bilinear resize to the input size: logits [N, S, S, classes]

The stride-4 layer is found by shape, for any backbone family; at an input
side S the features are ceil(S/4) and ceil(S/32) wide, and the resizes go
to those exact sizes, so S need not be a multiple of 32 (the imported
MobileNetV2 weights are exact at sides 32k+1, e.g. 97). The decoder has no
BatchNorm: its statistics would be those of batches of a few images.
"""

from __future__ import annotations

from typing import Sequence

import keras

from keras_ft import backbones, model as model_lib

LOW_LEVEL_STRIDE = 4


def stride_layer(backbone: keras.Model, stride: int) -> str:
    """The name of the last layer of `backbone` whose output is `stride`
    times smaller than its input (the end of that stage).

    Padding decides whether a stage's side is the ceiling or the floor of
    side/stride, or a pixel or two less ("valid" convolutions: Xception,
    InceptionV3): the feature map taken is the one whose side is nearest
    to side/stride, within 10% of it or 1.5 px.

    Raises:
        ValueError: no layer at that stride (the backbone or image size
            cannot give it), naming the sizes it has.
    """
    side = int(backbone.input_shape[1])
    want = side / stride
    layers = []
    for layer in backbone.layers:
        shape = getattr(layer, "output", None)
        shape = None if shape is None or isinstance(shape, (list, tuple)) else shape.shape
        if shape is not None and len(shape) == 4:
            layers.append((layer.name, int(shape[1])))
    sizes = sorted({size for _, size in layers}, reverse=True)
    near = [s for s in sizes if abs(s - want) <= max(1.5, 0.1 * want)]
    if not near:
        raise ValueError(
            f"Backbone '{backbone.name}' at image_size={side} has no feature map at stride "
            f"{stride} (about {want:.0f} px); its feature sizes are {sizes}. "
            "Use another backbone or a larger model.image_size."
        )
    best = min(near, key=lambda s: abs(s - want))
    return [name for name, size in layers if size == best][-1]


def _conv(filters: int, kernel: int, name: str, dilation: int = 1, separable: bool = False):
    """A ReLU convolution initialised to keep the signal's variance (He et
    al., 2015): the decoder has no normalisation layer to restore it.
    `separable`: DeepLabV3+'s "atrous separable convolution" (a tenth of the
    weights on 1,280 channels), its depthwise kernel N(0, 1/k^2) so that the
    k x k sum keeps the variance (Keras' he_normal would count the channels
    in the fan-in and shrink it ~1,000-fold)."""
    if not separable:
        return keras.layers.Conv2D(filters, kernel, padding="same", dilation_rate=dilation,
                                   activation="relu", kernel_initializer="he_normal", name=name)
    return keras.layers.SeparableConv2D(
        filters, kernel, padding="same", dilation_rate=dilation, activation="relu",
        depthwise_initializer=keras.initializers.RandomNormal(stddev=1.0 / kernel),
        pointwise_initializer="he_normal", name=name)


@keras.saving.register_keras_serializable(package="keras_ft")
class Segmenter(model_lib.FineTuneModel):
    """A backbone with a DeepLabV3+ decoder (see the module docstring).

    Inputs are float RGB images in [0, 255] of shape `(N, S, S, 3)`; the
    backbone's preprocessing runs inside. Outputs: per-pixel logits
    `(N, S, S, num_classes)`, float32.

    Args:
        backbone: a `keras.Model` without its top (`keras_ft.backbones.build`).
        num_classes: classes per pixel, background included.
        preprocessing: `Preprocess` mode for the backbone's weights.
        backbone_name: registry name of the backbone (its block map).
        class_names: optional names of the classes, in label order.
        aspp_filters: width of the ASPP branches and the decoder.
        aspp_rates: dilations of the ASPP's three 3x3 branches.
        dropout: dropout after the ASPP projection.
    """

    def __init__(self, backbone: keras.Model, num_classes: int, preprocessing: str = "none",
                 backbone_name: str | None = None, class_names: Sequence[str] | None = None,
                 aspp_filters: int = 128, aspp_rates: Sequence[int] = (1, 2, 3),
                 dropout: float = 0.1, **kwargs):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background and one class), got {num_classes}.")
        side = int(backbone.input_shape[1])
        low_name = stride_layer(backbone, LOW_LEVEL_STRIDE)
        # One model over the backbone's layers with both outputs: the block
        # map sees the same layers as the backbone's.
        features = keras.Model(backbone.inputs, [backbone.get_layer(low_name).output, backbone.output],
                               name=backbone.name)
        inputs = keras.Input(shape=(side, side, 3), name="images")
        preprocess = backbones.Preprocess(preprocessing, name="preprocess")
        low, deep = features(preprocess(inputs))
        f = aspp_filters
        branches = [_conv(f, 1, "aspp_1x1")(deep)]
        branches += [_conv(f, 3, f"aspp_rate{r}", dilation=r, separable=True)(deep)
                     for r in aspp_rates]
        pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(deep)
        pooled = _conv(f, 1, "aspp_pool_conv")(pooled)
        branches.append(keras.layers.UpSampling2D(
            size=(int(deep.shape[1]), int(deep.shape[2])), name="aspp_pool_up")(pooled))
        x = keras.layers.Concatenate(name="aspp_concat")(branches)
        x = _conv(f, 1, "aspp_project")(x)
        x = keras.layers.Dropout(dropout, name="aspp_dropout")(x)
        x = keras.layers.Resizing(int(low.shape[1]), int(low.shape[2]), interpolation="bilinear",
                                  name="decoder_up")(x)
        skip = _conv(48, 1, "decoder_skip")(low)
        x = keras.layers.Concatenate(name="decoder_concat")([x, skip])
        x = _conv(f, 3, "decoder_conv1")(x)
        x = _conv(f, 3, "decoder_conv2")(x)
        x = keras.layers.Conv2D(num_classes, 1, name="classes")(x)
        outputs = keras.layers.Resizing(side, side, interpolation="bilinear", name="logits",
                                        dtype="float32")(x)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.num_classes = num_classes
        self.preprocessing = preprocessing
        self.class_names = list(class_names) if class_names else None
        self.aspp_filters, self.aspp_rates, self.dropout = f, tuple(aspp_rates), dropout
        self.low_level_layer = low_name
        self.start_finetuning(features, backbone_name, preprocess)

    @property
    def image_size(self) -> int:
        return int(self.input_shape[1])

    def get_config(self):
        return {
            "name": self.name, "backbone_name": self.backbone_name, "image_size": self.image_size,
            "num_classes": self.num_classes, "preprocessing": self.preprocessing,
            "class_names": self.class_names, "aspp_filters": self.aspp_filters,
            "aspp_rates": list(self.aspp_rates), "dropout": self.dropout,
        }


def export_saved_model(model: Segmenter, path: str, class_names: Sequence[str]) -> str:
    """Exports `model` with signatures that serve raw images at their own size.

    Signatures:
        serving_default  image: string [] (one encoded JPEG/PNG/BMP/GIF of
                         any size) -> `classes` uint8 [H, W] (the class index
                         of each pixel) and `probabilities` float32 [H, W, C],
                         at the image's own H x W.
        serving_uint8    images: uint8 [N, H, W, 3] (one size) -> `classes`
                         uint8 [N, H, W], `probabilities` float32 [N, H, W, C].
    The image is resized to the model's S x S as in training
    (`keras_ft.data.resize_image`, policy "resize"); the logits are resized
    back to H x W (bilinear) before the softmax. `loaded.class_names[0]`
    holds the class names; `loaded.task[0]` is "semantic_segmentation".
    Written atomically (`keras_ft.export.write_archive`).
    """
    import tensorflow as tf

    from keras_ft import data, export as export_lib

    side = model.image_size

    def predict(images):  # uint8 [N, H, W, 3]
        size = tf.shape(images)[1:3]
        logits = model(data.resize_image(images, side), training=False)
        logits = tf.image.resize(logits, size, method="bilinear")
        probabilities = tf.nn.softmax(logits, axis=-1)
        return {"probabilities": probabilities,
                "classes": tf.cast(tf.argmax(probabilities, axis=-1), tf.uint8)}

    @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="image")])
    def serve_bytes(image):
        out = predict(data.decode_image(image)[tf.newaxis])
        return {k: v[0] for k, v in out.items()}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_uint8(images):
        return predict(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("serving_uint8", serve_uint8)
    archive.add_variable_collection(
        "class_names", export_lib.class_names_variable(tf.constant(list(class_names))))
    archive.add_variable_collection(
        "task", [tf.Variable("semantic_segmentation", trainable=False, name="task")])
    return export_lib.write_archive(archive, path)

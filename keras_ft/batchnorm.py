"""BatchNorm while fine-tuning: the policy, and the switch to batch statistics.

The policy (`freeze.batchnorm`, `BN_POLICIES`), resolved once per run by
`resolve_batchnorm` into a `BatchNormPolicy`:

    auto        the default. Where a stage trains a block, its BatchNorm
                layers normalise with batch statistics, entered by the
                calibrated switch below; frozen blocks stay in inference
                mode. Only when each layer normalises at least
                `AUTO_MIN_BATCH` examples per step (the batch per replica, or
                the global batch with synchronized BatchNorm); with fewer,
                batch statistics are noise and it runs as `frozen`.
    frozen      every BatchNorm layer in inference mode, its moving
                statistics never changing, even in blocks that train (the
                Keras transfer-learning guide's advice); γ and β still train.
    trainable   as `auto` with a large batch, but the switch is plain: the
                layers start normalising with batch statistics as they are.
    reestimate  every layer's statistics recomputed on training images
                before training (`freezing.reestimate_batchnorm`), then frozen.

Why batch statistics where blocks train (docs/batchnorm.md has the
measurements): in inference mode a BatchNorm channel multiplies what reaches
it by γ/sqrt(var + ε), and pretrained networks have channels whose moving
variance is tiny (the imported MobileNetV2: gains up to 1,902). Once the
convolutions below such a channel train, its output moves up to that many
times as far: fine-tuning every block under `frozen` collapsed to chance on
some seeds. On batch statistics the layer rescales whatever reaches it, so
it cannot amplify a change of the weights below it. That is what PyTorch's
`model.train()` gives, and what the field's all-layer recipes use. Their
moving statistics follow with momentum `freeze.bn_momentum` (0.9, PyTorch's
0.1; Keras' MobileNetV2 uses 0.999, which keeps 80% of ImageNet's statistics
after 200 steps, so every epoch's validation would measure a model that does
not exist); precise BN recomputes them at the end.

The calibrated switch (`calibrate`): a layer in inference mode computes
γ(x − μ)/s + β with the pretrained mean μ and s = sqrt(var + ε). On batch
statistics it computes γ(x − μ_b)/s_b + β instead, and the training data's
statistics μ_b, s_b are not ImageNet's: switching as it is changes what the
network computes, and the head trained on the old features starts over
(measured: LP-FT fell from 0.80 to 0.70 at the switch). Before the switch,
`calibrate` measures μ_b and s_b of each layer's input on training images,
with the network as it computes now, and sets

    γ' = γ·s_b/s,   β' = β + γ(μ_b − μ)/s,   moving statistics = μ_b, s_b²,

so on the training data's statistics the layer's output is unchanged, in
either mode, and so is every layer's above it. The moving average of the
weights (`optimizer.ema_decay`) and the L2-SP reference θ0 get the same
map, so both still describe the same functions. A layer switches when its
block starts training, so its optimizer slots are still zero.
"""

from __future__ import annotations

import dataclasses
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_ft import backbones

BN_POLICIES = ("auto", "frozen", "trainable", "reestimate")
BN_MOMENTUM = 0.9  # freeze.bn_momentum's default (PyTorch's momentum=0.1)
AUTO_MIN_BATCH = 16  # examples a BatchNorm layer must normalise over for "auto"
#   to use batch statistics. Wu & He (2018, "Group Normalization", fig. 1):
#   ImageNet error of a BatchNorm ResNet-50 is flat from 32 down to 16 images
#   per replica and rises below (+0.9 points at 8, +4.9 at 4)


def is_bn(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


@dataclasses.dataclass(frozen=True)
class BatchNormPolicy:
    """How BatchNorm layers run: the `freeze.batchnorm` policy of a run,
    resolved (`resolve_batchnorm`).

    Attributes:
        name: the configured policy, one of `BN_POLICIES`.
        batch_statistics: layers in the blocks a stage trains normalise with
            batch statistics (else every backbone layer is in inference mode).
        calibrate: they enter batch statistics by the calibrated switch.
        momentum: the momentum of their moving statistics, or None to keep
            each layer's own.
        reason: why, for the log (empty unless `name` is "auto").
    """

    name: str
    batch_statistics: bool
    calibrate: bool = False
    momentum: float | None = None
    reason: str = ""

    def describe(self) -> str:
        """E.g. "auto: batch statistics where blocks train (32 examples ...)"."""
        what = "batch statistics where blocks train" if self.batch_statistics else (
            "inference mode everywhere")
        if self.calibrate:
            what += ", entered by the calibrated switch"
        return f"{self.name}: {what}" + (f" ({self.reason})" if self.reason else "")


def resolve_batchnorm(
    policy: "str | BatchNormPolicy",
    examples_per_norm: int | None = None,
    momentum: float = BN_MOMENTUM,
) -> BatchNormPolicy:
    """`freeze.batchnorm` for a run whose BatchNorm layers each normalise
    `examples_per_norm` examples per step (the batch per replica, or the
    global batch with synchronized BatchNorm; None: unknown, taken as
    enough). `momentum` is `freeze.bn_momentum` (0 = each layer's own)."""
    if isinstance(policy, BatchNormPolicy):
        return policy
    if policy not in BN_POLICIES:
        raise ValueError(f"Unknown freeze.batchnorm {policy!r}. Choose one of: "
                         f"{', '.join(BN_POLICIES)}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"freeze.bn_momentum must be in [0, 1), got {momentum}.")
    kept = momentum or None
    if policy != "auto":
        return BatchNormPolicy(policy, policy == "trainable", False, kept)
    if examples_per_norm is None or examples_per_norm >= AUTO_MIN_BATCH:
        enough = "" if examples_per_norm is None else (
            f"{examples_per_norm} examples per BatchNorm layer and step >= {AUTO_MIN_BATCH}")
        return BatchNormPolicy("auto", True, True, kept, enough)
    return BatchNormPolicy("auto", False, False, kept, (
        f"{examples_per_norm} examples per BatchNorm layer and step < {AUTO_MIN_BATCH}: batch "
        "statistics would be noise; a larger batch, or distribute.sync_batchnorm over "
        "replicas, lets it use them"))


def describe(model, policy: BatchNormPolicy) -> str:
    """What the backbone's BatchNorm layers do in the stage now applied, and
    why, for the stage's log line."""
    layers = [l for _, block in model.block_map() for l in block if is_bn(l)]
    if not layers:
        return "no BatchNorm layer in the backbone"
    on_batch = [l for l in layers if l.trainable]
    head = f"BatchNorm {policy.name}"
    why = f" ({policy.reason})" if policy.reason else ""
    if not on_batch:
        if policy.batch_statistics:
            return f"{head}: all {len(layers)} layer(s) in inference mode (no block trains)"
        return f"{head}: all {len(layers)} layer(s) in inference mode{why}"
    momentum = f"momentum {on_batch[0].momentum:g}"
    return (f"{head}: {len(on_batch)} layer(s) in the trained blocks on batch statistics "
            f"({momentum}), {len(layers) - len(on_batch)} in inference mode{why}")


# ------------------------------------------------------------ traced passes

_TRACED = weakref.WeakKeyDictionary()  # model -> {what, modes: traced function}


def traced(model, what: tuple, make):
    """`make()`, a `tf.function` over `model`, made once per model, `what`
    and BatchNorm modes (an eager pass costs ~10x a traced one; a new trace
    per call would also make TensorFlow warn of retracing)."""
    key = what + tuple(l.trainable for l in backbones.all_layers(model) if is_bn(l))
    functions = _TRACED.setdefault(model, {})
    if key not in functions:
        functions[key] = make()
    return functions[key]


def _input_moments(model, layers):
    """A traced function of a batch of model inputs giving, for each of
    `layers`, the mean and (biased) variance of its input per channel, the
    network in inference mode."""
    def make():
        probe = keras.Model(model.backbone.inputs, [l.input for l in layers])

        @tf.function(reduce_retracing=True)
        def moments(x):
            outputs = probe(model.backbone_inputs(x), training=False)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            return [tf.nn.moments(tf.cast(o, tf.float32), axes=list(range(len(o.shape) - 1)))
                    for o in outputs]
        return moments

    return traced(model, ("inputs",) + tuple(id(l) for l in layers), make)


# ------------------------------------------------------- the calibrated switch


def calibrate(model, layers, dataset, num_batches: int) -> int:
    """The calibrated switch (module docstring) for BatchNorm `layers` about
    to normalise with batch statistics: measures their inputs over
    `num_batches` batches of `dataset` (training images, no augmentation;
    fewer if it ends first) and re-parameterises γ, β and the moving
    statistics so that each layer computes what it computed before.

    Returns:
        The number of batches used (0 without layers).
    """
    layers = list(layers)
    if not layers:
        return 0
    if num_batches < 1:
        raise ValueError(f"BatchNorm calibration needs num_batches >= 1, got {num_batches}.")
    unscaled = [l.name for l in layers if not (l.scale and l.center)]
    if unscaled:
        raise ValueError(f"BatchNorm layer(s) {', '.join(unscaled)} have no γ or β to calibrate: "
                         "use freeze.batchnorm='trainable'.")
    moments = _input_moments(model, layers)
    sums = [np.zeros((2,) + tuple(l.moving_mean.shape)) for l in layers]  # Σ w·mean, Σ w·E[x²]
    weight = seen = 0
    for batch in dataset.take(num_batches):
        size = int(tf.shape(batch[0])[0])
        for total, (mean, variance) in zip(sums, moments(batch[0])):
            mean = mean.numpy().astype(np.float64)
            total += size * np.stack([mean, variance.numpy().astype(np.float64) + mean**2])
        weight, seen = weight + size, seen + 1
    if not seen:
        raise ValueError("The dataset gave no batch to calibrate BatchNorm on.")
    copies = _copies(model)
    for total, layer in zip(sums, layers):
        mean_b = total[0] / weight
        var_b = np.maximum(total[1] / weight - mean_b**2, 0.0)
        mean = layer.moving_mean.numpy().astype(np.float64)
        s = np.sqrt(layer.moving_variance.numpy().astype(np.float64) + layer.epsilon)
        ratio, shift = np.sqrt(var_b + layer.epsilon) / s, (mean_b - mean) / s
        for gamma, beta in [(layer.gamma, layer.beta)] + [
                (c[layer.gamma.path], c[layer.beta.path]) for c in copies
                if layer.gamma.path in c and layer.beta.path in c]:
            g = gamma.numpy().astype(np.float64)
            beta.assign((beta.numpy() + g * shift).astype(beta.dtype))
            gamma.assign((g * ratio).astype(gamma.dtype))
        layer.moving_mean.assign(mean_b.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(var_b.astype(layer.moving_variance.dtype))
    return seen


def _copies(model) -> list[dict]:
    """Other copies of the weights that must describe the same functions:
    the moving average (`optimizer.ema_decay`) and the L2-SP reference θ0,
    each as {path of the model's variable: its copy}."""
    copies = []
    ema = getattr(model, "ema", None)
    if ema is not None:
        copies.append({v.path: a for v, a in zip(ema.variables, ema.averages)})
    reference = getattr(model, "_reference", None)
    if reference is not None:
        copies.append(dict(reference.by_path))
    return copies

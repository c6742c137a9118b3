"""BatchNorm as one fused op, in the activations' own dtype.

Keras 3 runs a BatchNormalization layer in inference mode (frozen: keras_ft's
`freeze.batchnorm="frozen"`, evaluation, the export) as separate elementwise
ops, after casting bfloat16/float16 inputs to float32 and back. When its
γ/β train, the backward pass adds a reduction per variable over the whole
activation. Under `mixed_bfloat16` on a CPU that is a float32 round trip of
every activation at every BatchNorm layer, and it is what kept TensorFlow's
bfloat16 speed-up far below PyTorch's on the same cores
(benchmarks/README.md).

`install(model)` gives each eligible BatchNormalization layer a call that
computes the same function with TensorFlow's `FusedBatchNormV3`: one pass
forward, one backward (`FusedBatchNormGradV3` yields the input, γ and β
gradients together), on the bfloat16 activations directly, with the
statistics, γ and β in float32 as Keras keeps them.

- Inference mode (`is_training=False`): the moving statistics.
- Training mode, i.e. batch statistics (`freeze.batchnorm="auto"` or
  "trainable" in the blocks that train; `is_training=True`): the batch's
  mean and biased variance, as Keras normalises with, and the moving
  statistics updated as Keras updates them (the op's variance output is
  Bessel-corrected; it is converted back). Keras computes the moments, the
  normalisation and their gradients as a dozen separate ops: measured 1.5x
  slower per full MobileNetV2 fine-tuning step on 2 CPU cores
  (benchmarks/README.md), which made batch statistics cost 1.6x frozen
  BatchNorm; fused, they cost ~1.1x. (`FUSE_TRAINING = False` restores
  Keras' own call in training mode, for that comparison.)

For a layer it cannot take (not the channels-last 4-D case, masked,
synchronized: a cross-replica mean needs Keras' all-reduce), the layer's
own Keras call runs. Nothing is saved differently: the override is not part
of the layer's config, so a reloaded model computes with Keras' op
sequence (the same function; float32 results agree to ~1e-5).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_ft import backbones


MIN_EPSILON = 1.001e-5  # tf.compat.v1.nn.fused_batch_norm's floor
FUSED_DTYPES = (tf.float32, tf.bfloat16, tf.float16)  # what the fused op takes
FUSE_TRAINING = True  # False: training mode runs Keras' own call (benchmarks)


def _eligible(layer) -> bool:
    return (isinstance(layer, keras.layers.BatchNormalization)
            and not getattr(layer, "synchronized", False)
            and layer.axis in (-1, 3) and not getattr(layer, "renorm", False))


def install(model: keras.Model) -> int:
    """Fuses the BatchNorm of `model`'s layers; returns how many layers now
    use it (idempotent)."""
    count = 0
    for layer in backbones.all_layers(model):
        if not _eligible(layer) or getattr(layer, "_keras_ft_fused", False):
            continue
        keras_call = layer.call

        def call(inputs, training=None, mask=None, _layer=layer, _keras_call=keras_call):
            # Checked at each call: `distribute.sync_batchnorm` synchronizes
            # layers after the model (and this override) is built.
            if (mask is not None or len(inputs.shape) != 4 or inputs.dtype not in FUSED_DTYPES
                    or getattr(_layer, "synchronized", False)):
                return _keras_call(inputs, training=training, mask=mask)
            if training and _layer.trainable:
                if not FUSE_TRAINING:
                    return _keras_call(inputs, training=training, mask=mask)
                return _fused_training(_layer, inputs)
            return _fused_inference(_layer, inputs)

        layer.call = call
        layer._keras_ft_fused = True
        count += 1
    return count


def _fused_training(layer, inputs):
    """Batch statistics, as Keras' training-mode call computes them (the
    epsilon floor aside: 1e-5 becomes 1.001e-5, a 0.05% change of 1/sqrt
    only where a channel's batch variance is as small as epsilon)."""
    channels = inputs.shape[-1]
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels])
    offset = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels])
    epsilon = max(float(layer.epsilon), MIN_EPSILON)
    outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        inputs, scale, offset, epsilon=epsilon, is_training=True, data_format="NHWC")
    # The op returns the Bessel-corrected variance; Keras' moving statistics
    # average the biased one (what the layer normalised with).
    n = tf.cast(tf.size(inputs) // channels, tf.float32)
    variance = tf.stop_gradient(variance) * (n - 1.0) / tf.maximum(n, 1.0)
    mean = tf.stop_gradient(mean)
    m = layer.momentum
    layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * m + mean * (1.0 - m))
    layer.moving_variance.assign(
        tf.cast(layer.moving_variance, tf.float32) * m + variance * (1.0 - m))
    return outputs


def _fused_inference(layer, inputs):
    channels = inputs.shape[-1]
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels])
    offset = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels])
    # The fused op raises epsilon to at least 1.001e-5 (PyTorch's weights use
    # 1e-5): the difference moves into the variance, so var + eps is the same.
    epsilon = max(float(layer.epsilon), MIN_EPSILON)
    variance = tf.cast(layer.moving_variance, tf.float32) + (float(layer.epsilon) - epsilon)
    outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
        inputs, scale, offset, mean=tf.cast(layer.moving_mean, tf.float32), variance=variance,
        epsilon=epsilon, is_training=False, data_format="NHWC")
    return outputs

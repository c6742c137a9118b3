"""Inference-mode BatchNorm as one fused op (keras_ft.fused_bn)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ft
from keras_ft import freezing, fused_bn
from keras_ft.stages import Stage


def _models(policy="float32"):
    """A keras_ft classifier (fused) and the same weights with Keras' own
    BatchNorm ops, with statistics of real activations and varied γ/β."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        fused = keras_ft.build_classifier("mobilenet_v2", 3, image_size=32, dropout=0.0)
        keras.utils.set_random_seed(0)
        plain = keras_ft.build_classifier("mobilenet_v2", 3, image_size=32, dropout=0.0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for layer in plain.backbone.layers:  # back to Keras' call
        if getattr(layer, "_keras_ft_fused", False):
            del layer.call
    x, _ = _batch()
    freezing.reestimate_batchnorm(fused, tf.data.Dataset.from_tensors((x, np.zeros(8))))
    rng = np.random.default_rng(1)
    for layer in fused.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.beta.assign(rng.uniform(-0.5, 0.5, layer.beta.shape))
    plain.set_weights(fused.get_weights())
    return fused, plain


def _batch():
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32), np.arange(8) % 3


def test_every_backbone_batchnorm_is_fused_and_the_graph_uses_the_fused_op():
    fused, plain = _models()
    bn = [l for l in fused.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bn and all(getattr(l, "_keras_ft_fused", False) for l in bn)
    assert fused_bn.install(fused) == 0  # idempotent
    graph_text = str(tf.function(lambda x: fused(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 32, 32, 3], tf.float32)).graph.as_graph_def())
    plain_text = str(tf.function(lambda x: plain(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 32, 32, 3], tf.float32)).graph.as_graph_def())
    assert graph_text.count('op: "FusedBatchNormV3"') == len(bn)
    assert 'op: "FusedBatchNormV3"' not in plain_text


@pytest.mark.parametrize("policy, tolerance", [("float32", 5e-4), ("mixed_bfloat16", 0.2)])
def test_same_function_and_gradients_as_keras_batchnorm(policy, tolerance):
    fused, plain = _models(policy)
    x, y = _batch()
    for model in (fused, plain):
        freezing.apply_stage(model, Stage(epochs=1, blocks=-1), bn_policy="frozen")

    def outputs_and_grads(model):
        variables = model.stage_variables()
        with tf.GradientTape() as tape:
            logits = model(x, training=True)  # frozen BatchNorm: inference mode
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
        grads = tape.gradient(loss, [v.value for v in variables])
        return logits.numpy(), {v.path: g.numpy() for v, g in zip(variables, grads)}

    (out_f, grads_f), (out_p, grads_p) = outputs_and_grads(fused), outputs_and_grads(plain)
    scale = np.abs(out_p).max()
    np.testing.assert_allclose(out_f, out_p, atol=tolerance * scale)
    assert grads_f.keys() == grads_p.keys()
    gammas = [p for p in grads_p if p.endswith("gamma")]
    assert gammas  # γ/β train in the frozen policy: their gradients go through the fused op
    # By norm: bfloat16 rounds differently in each (measured up to 5%); a wrong
    # gradient (none, or the wrong variable) is off by 100%.
    for path, g in grads_p.items():
        error = np.linalg.norm(grads_f[path] - g) / (np.linalg.norm(g) + 1e-12)
        assert error < tolerance, (path, error)


def test_small_epsilon_is_kept_exactly():
    # PyTorch-imported weights use epsilon 1e-5, below the fused op's floor.
    fused, plain = _models()
    for model in (fused, plain):
        for layer in model.backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.epsilon = 1e-5
                layer.moving_variance.assign(np.full(layer.moving_variance.shape, 1e-5))
    x, _ = _batch()
    np.testing.assert_allclose(fused(x, training=False).numpy(), plain(x, training=False).numpy(),
                               rtol=1e-4, atol=1e-4 * np.abs(plain(x).numpy()).max())


def test_training_mode_batchnorm_still_updates_its_statistics():
    fused, _ = _models()
    freezing.apply_stage(fused, Stage(epochs=1, blocks=-1), bn_policy="trainable")
    layer = next(l for l in fused.backbone.layers if isinstance(l, keras.layers.BatchNormalization))
    before = layer.moving_mean.numpy().copy()
    x, _ = _batch()
    fused(x, training=True)
    assert not np.array_equal(layer.moving_mean.numpy(), before)

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


def _outputs_and_grads(model, x, y):
    variables = model.stage_variables()
    with tf.GradientTape() as tape:
        logits = model(x, training=True)  # per the stage's BatchNorm policy
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    grads = tape.gradient(loss, [v.value for v in variables])
    return logits.numpy(), {v.path: g.numpy() for v, g in zip(variables, grads)}


def _errors(model, truth, x, y) -> tuple[float, dict]:
    """Relative error of `model`'s logits (by max) and gradients (by norm)
    against `truth`'s."""
    (out, grads), (out_t, grads_t) = _outputs_and_grads(model, x, y), _outputs_and_grads(truth, x, y)
    assert grads.keys() == grads_t.keys()
    assert [p for p in grads_t if p.endswith("gamma")]  # γ/β train: through the fused op
    # A β followed by a linear layer and BatchNorm on batch statistics has a
    # zero gradient (the mean is subtracted again): its rounding noise is
    # measured against the typical gradient, not against zero.
    floor = 1e-3 * np.median([np.linalg.norm(g) for g in grads_t.values()])
    return np.abs(out - out_t).max() / np.abs(out_t).max(), {
        path: np.linalg.norm(grads[path] - g) / (np.linalg.norm(g) + floor)
        for path, g in grads_t.items()}


def _check_against_keras(bn_policy, precision, blocks=-1):
    """The fused model against Keras' own BatchNorm ops. In float32, directly:
    they agree to summation order (measured < 5e-4), a wrong gradient (none,
    or the wrong variable) is off by 100%. In bfloat16 both round, each its
    own way, so each is measured against the float32 model with the same
    weights, and the fused one must be at least about as close as Keras'.

    On batch statistics, only the top `blocks` train: through many layers
    normalising a few examples each, float32 gradients of a random network
    are chaotic (measured: Keras' own and the fused op's both 1-2% off
    float64 in every block, from ReLU6 kinks), and the comparison would
    measure that instead."""
    x, y = _batch()
    fused, plain = _models(precision)
    models = [fused, plain]
    if precision != "float32":
        truth, _ = _models("float32")
        truth.set_weights(fused.get_weights())
        models.append(truth)
    for model in models:
        freezing.apply_stage(model, Stage(epochs=1, blocks=blocks), bn_policy=bn_policy)
    if precision == "float32":
        out_error, grad_errors = _errors(fused, plain, x, y)
        assert out_error < 1e-3
        assert max(grad_errors.values()) < 1e-3, max(grad_errors.items(), key=lambda kv: kv[1])
        return fused, plain
    out_f, grads_f = _errors(fused, truth, x, y)
    out_p, grads_p = _errors(plain, truth, x, y)
    assert out_f <= 1.5 * out_p + 0.02, (out_f, out_p)
    mean_f, mean_p = np.mean(list(grads_f.values())), np.mean(list(grads_p.values()))
    assert mean_f <= 1.5 * mean_p + 0.02, (mean_f, mean_p)
    return fused, plain


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_same_function_and_gradients_as_keras_batchnorm(precision):
    _check_against_keras("frozen", precision)


def _bn(model):
    return [l for l in model.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]


def test_training_mode_same_function_gradients_and_statistics_as_keras():
    # Batch statistics ("auto"/"trainable" where blocks train): the fused op
    # normalises with the biased batch variance, as Keras does, and the moving
    # statistics move as Keras moves them (the op's own variance output is
    # Bessel-corrected: not converting it is a 1/(n-1) error, caught here at
    # the last layers' 8 examples x 1 x 1).
    fused, plain = _check_against_keras("auto", "float32", blocks=3)  # one training call each
    untouched, _ = _models()  # the same weights and statistics, before that call
    graph = str(tf.function(lambda x: fused(x, training=True)).get_concrete_function(
        tf.TensorSpec([8, 32, 32, 3], tf.float32)).graph.as_graph_def())
    assert graph.count('op: "FusedBatchNormV3"') == len(_bn(fused))
    trained = [i for i, layer in enumerate(_bn(fused)) if layer.trainable]
    assert len(trained) == 2 * 3 + 1  # blocks 15 and 16 (3 each), Conv_1
    for i in trained:
        f, p, old = _bn(fused)[i], _bn(plain)[i], _bn(untouched)[i]
        assert f.momentum == p.momentum == 0.9  # freeze.bn_momentum's default
        assert not np.array_equal(f.moving_variance.numpy(), old.moving_variance.numpy())
        for a, b in ((f.moving_mean, p.moving_mean), (f.moving_variance, p.moving_variance)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_training_mode_in_bfloat16_is_as_close_to_float32_as_keras():
    _check_against_keras("auto", "mixed_bfloat16", blocks=3)


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

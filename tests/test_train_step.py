"""The custom train step applies exactly the SGD update written out in numpy.

The model is `conftest.tiny_classifier`: its features and logits vary from
image to image, so gradients on the head kernel and the backbone are real
(of a random-init net with its BatchNorm statistics as initialised they are
~1e-12, and any update rule would pass).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ft
from conftest import assert_depends_on_images, noise_images, tiny_classifier
from keras_ft import freezing

LR, WEIGHT_DECAY = 0.01, 0.5
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1])
# MobileNetV2's top two blocks by Keras' layer names, not keras_ft's block
# map: what `Stage(blocks=2)` must train, written down independently.
TOP_TWO_BLOCKS = ("block_16_", "Conv_1")


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _compiled(blocks, momentum, nesterov):
    model = tiny_classifier(3, dropout=0.0)
    freezing.apply_stage(model, freezing.Stage(epochs=1, blocks=blocks), bn_policy="frozen")
    model.compile(
        keras_ft.SGD(LR, momentum=momentum, nesterov=nesterov, weight_decay=WEIGHT_DECAY),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _sgd(theta, grad, velocity, momentum, nesterov):
    """One update of the docstring of `keras_ft.optim`, in float64; updates
    `velocity` in place. Weight decay only for variables of 2 or more dims."""
    velocity *= momentum
    velocity += grad
    step = grad + momentum * velocity if nesterov else velocity
    decay = WEIGHT_DECAY if theta.ndim > 1 else 0.0
    return theta - LR * decay * theta - LR * step


def _assert_moved_as(variable, before, expected, where=""):
    """`variable` moved from `before` to `expected`, to 0.1% of the largest
    entry of the move. Measured: within 5e-5 of it (float32 kernels, graph vs
    eager). A momentum of 0.8 for 0.9 is off by >= 1% from the second step,
    leaving out the decay of a conv kernel by >= 2%, a variable left out by 100%."""
    moved, should = variable.numpy() - before, expected - before
    scale = np.abs(should).max()
    assert scale > 1e-5, f"{where}{variable.path} hardly moves: {scale:.2g}"
    np.testing.assert_allclose(moved, should, rtol=0, atol=1e-3 * scale, err_msg=where + variable.path)


@pytest.mark.parametrize("nesterov", [False, True])
def test_two_head_steps_match_numpy(nesterov):
    mu = 0.9
    model = _compiled(0, mu, nesterov)
    x, y = noise_images(8), LABELS
    backbone_before = [w.numpy().copy() for w in model.backbone.weights]
    # With the backbone frozen (BatchNorm in inference mode), the head sees
    # fixed features: the loss gradient is known in closed form.
    features = model.feature_extractor().predict(x, verbose=0).astype(np.float64)
    assert_depends_on_images(features)
    w0, b0 = (v.numpy().astype(np.float64) for v in model.head.weights)
    w, b = w0, b0
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    onehot = np.eye(3)[y]
    for _ in range(2):
        loss = model.train_on_batch(x, y)
        g = (_softmax(features @ w + b) - onehot) / len(y)
        w = _sgd(w, features.T @ g, vw, mu, nesterov)  # the kernel is decayed
        b = _sgd(b, g.sum(axis=0), vb, mu, nesterov)  # the bias is not
    _assert_moved_as(model.head.kernel, w0, w)
    _assert_moved_as(model.head.bias, b0, b)
    assert np.isfinite(loss)
    for before, after in zip(backbone_before, model.backbone.weights):
        np.testing.assert_array_equal(before, after.numpy())


def _gradients(model, x, y, variables):
    """d(mean cross-entropy)/d(variables) by a plain tape over the forward
    pass in inference mode, apart from the model's train step."""
    tf_variables = [v.value for v in variables]

    # A graph, as the train step is: eager and graph kernels round apart, and
    # a ReLU6 input within rounding of 0 or 6 then takes the other gradient.
    @tf.function
    def gradients(x):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(tf_variables)
            logits = model(x, training=False)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(y), logits)
            )
        return tape.gradient(loss, tf_variables)

    return [g.numpy().astype(np.float64) for g in gradients(tf.constant(x))]


@pytest.mark.parametrize("momentum, nesterov", [(0.9, False), (0.9, True), (0.0, False)])
def test_three_steps_on_the_top_blocks_match_numpy(momentum, nesterov):
    """Stage 2 of configs/tiny.py: the top two blocks and the head train,
    BatchNorm frozen. Every trained variable (conv and depthwise kernels,
    BatchNorm γ/β, the head) follows the SGD recursion in numpy on gradients
    taken by a plain tape; everything else stays bitwise as it was."""
    model = _compiled(2, momentum, nesterov)
    x, y = noise_images(8, seed=1), LABELS
    trained = [
        v for layer in model.backbone.layers if layer.name.startswith(TOP_TWO_BLOCKS)
        for v in layer.weights if "moving" not in v.path
    ] + list(model.head.weights)
    assert len(trained) == 14  # 4 kernels, 4 x (γ, β), head kernel and bias
    names = {v.path for v in trained}
    frozen = [(v, v.numpy().copy()) for v in model.weights if v.path not in names]
    velocity = [np.zeros(v.shape) for v in trained]
    for step in range(3):
        theta = [v.numpy().astype(np.float64) for v in trained]
        grads = _gradients(model, x, y, trained)
        expected = [_sgd(t, g, v, momentum, nesterov) for t, g, v in zip(theta, grads, velocity)]
        model.train_on_batch(x, y)
        for variable, before, want in zip(trained, theta, expected):
            _assert_moved_as(variable, before, want, f"step {step + 1}: ")
    for variable, value in frozen:  # lower blocks and every moving statistic
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_fit_reports_loss_and_metrics_and_runs_callbacks():
    keras.utils.set_random_seed(0)
    model = keras_ft.build_classifier("mobilenet_v2", 2, image_size=32)
    model.compile(
        keras_ft.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    seen = []
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    y = np.array([0, 1] * 4)
    history = model.fit(
        x, y, batch_size=4, epochs=2, verbose=0, validation_data=(x, y),
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=lambda e, l: seen.append(e))],
    )
    assert seen == [0, 1]
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(np.isfinite(history.history["loss"]))
    assert model.optimizer.iterations.numpy() == 4

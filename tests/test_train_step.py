"""The custom train step applies exactly the SGD update written out in numpy."""

import keras
import numpy as np
import pytest

import keras_ft
from keras_ft import freezing


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("nesterov", [False, True])
def test_two_head_steps_match_numpy(nesterov):
    lr, mu, wd = 0.05, 0.9, 0.01
    keras.utils.set_random_seed(1)
    model = keras_ft.build_classifier("mobilenet_v2", 3, image_size=32, dropout=0.0)
    freezing.apply_stage(model, freezing.Stage(epochs=1, blocks=0))
    model.compile(
        keras_ft.SGD(lr, momentum=mu, nesterov=nesterov, weight_decay=wd),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    backbone_before = [w.numpy().copy() for w in model.backbone.weights]
    # With the backbone frozen (BatchNorm in inference mode), the head sees
    # fixed features: the loss gradient is known in closed form.
    features = keras.Model(model.inputs, model.get_layer("pool").output).predict(x, verbose=0)
    w, b = (v.numpy().astype(np.float64) for v in model.head.weights)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    onehot = np.eye(3)[y]
    for _ in range(2):
        loss = model.train_on_batch(x, y)
        g = (_softmax(features @ w + b) - onehot) / len(y)
        gw, gb = features.T @ g, g.sum(axis=0)
        vw, vb = mu * vw + gw, mu * vb + gb
        step_w = gw + mu * vw if nesterov else vw
        step_b = gb + mu * vb if nesterov else vb
        w = w - lr * wd * w - lr * step_w  # the kernel is decayed
        b = b - lr * step_b  # the bias is not
    np.testing.assert_allclose(model.head.kernel.numpy(), w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.head.bias.numpy(), b, rtol=1e-4, atol=1e-6)
    assert np.isfinite(loss)
    for before, after in zip(backbone_before, model.backbone.weights):
        np.testing.assert_array_equal(before, after.numpy())


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

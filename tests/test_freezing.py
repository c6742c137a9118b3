"""Freezing by block, BatchNorm policies, LR multipliers, L2-SP, PEFT methods."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ft
from keras_ft import backbones, freezing, stages
from keras_ft.stages import Stage

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_model(lr=0.05, momentum=0.9, compile=True, normalize=True, **kwargs):
    keras.utils.set_random_seed(0)
    model = keras_ft.build_classifier("mobilenet_v2", 3, image_size=32, dropout=0.0)
    if normalize:
        # Random weights with BatchNorm at its initial statistics saturate
        # ReLU6 (zero gradients); statistics of real activations fix that.
        x, y = batch(16, seed=1)
        freezing.reestimate_batchnorm(model, tf.data.Dataset.from_tensors((x, y)))
    if compile:
        model.compile(keras_ft.SGD(lr, momentum=momentum, **kwargs), loss=LOSS)
    return model


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32), np.arange(n) % 3


def snapshot(model):
    return {v.path: v.numpy().copy() for v in model.weights}


def block_of_variable(model):
    out = {}
    for block, layers in backbones.block_map(model.backbone, "mobilenet_v2"):
        for layer in layers:
            for v in layer.weights:
                out[v.path] = block
    return out


@pytest.mark.parametrize("bn_policy", ["frozen", "trainable"])
def test_frozen_prefix_is_bitwise_unchanged_and_the_rest_moves(bn_policy):
    model = make_model()
    freezing.apply_stage(model, Stage(epochs=1, blocks=2), bn_policy=bn_policy)
    before = snapshot(model)
    x, y = batch()
    for _ in range(3):
        model.train_on_batch(x, y)
    blocks = block_of_variable(model)
    trained_blocks = {"block_16", "Conv_1"}  # the top 2 of MobileNetV2's 19
    for v in model.weights:
        changed = not np.array_equal(before[v.path], v.numpy())
        block = blocks.get(v.path, "head")
        is_stat = "moving_" in v.path
        if block == "head":
            assert changed, v.path
        elif block not in trained_blocks:
            assert not changed, f"frozen {v.path} changed"
        elif is_stat:  # moving statistics move only under the trainable policy
            assert changed == (bn_policy == "trainable"), v.path
        else:
            assert changed, f"trainable {v.path} did not change"


def test_apply_stage_on_a_compiled_model_retraces_the_train_step():
    # The step is traced with the stage's variables: applying a new stage
    # after a first step must change what the next step trains.
    model = make_model()
    x, y = batch()
    freezing.apply_stage(model, Stage(epochs=1, blocks=0))
    model.train_on_batch(x, y)
    for blocks, backbone_moves in ((-1, True), (0, False)):
        freezing.apply_stage(model, Stage(epochs=1, blocks=blocks))
        before = snapshot(model)
        model.train_on_batch(x, y)
        changed = {v.path for v in model.backbone.weights
                   if not np.array_equal(before[v.path], v.numpy())}
        assert bool(changed) == backbone_moves, (blocks, sorted(changed)[:3])


def test_stage_variables_and_keras_flags_for_head_only():
    model = make_model()
    info = freezing.apply_stage(model, Stage(epochs=1, blocks=0))
    assert [v.path for v in model.stage_variables()] == [v.path for v in model.head.weights]
    assert info.trainable_params == 1280 * 3 + 3 and info.lowest_block is None
    assert all(not l.trainable for l in model.backbone.layers)


def test_block_lr_multipliers_scale_each_blocks_update():
    lr = 0.1
    model = make_model(lr=lr, momentum=0.0)
    plain = make_model(lr=lr, momentum=0.0)  # the same weights, every multiplier 1
    names = [b for b, _ in backbones.block_map(model.backbone, "mobilenet_v2")]
    block_lr = stages.block_lr_multipliers(len(names), 0.5)
    block_lr[names.index("block_14")] = 0.0  # multiplier 0 freezes a block
    # BatchNorm frozen: the step is then a function of the weights alone.
    freezing.apply_stage(model, Stage(epochs=1, blocks=4), bn_policy="frozen", block_lr=block_lr)
    freezing.apply_stage(plain, Stage(epochs=1, blocks=4), bn_policy="frozen")
    x, y = batch()
    variables = model.stage_variables()
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    grads = dict(zip([v.path for v in variables], tape.gradient(loss, variables)))
    before = snapshot(model)
    model.train_on_batch(x, y)
    plain.train_on_batch(x, y)
    blocks = block_of_variable(model)
    checked = set()
    for v, p in zip(model.weights, plain.weights):
        block = blocks.get(v.path, "head")
        delta = v.numpy() - before[v.path]
        if v.path not in grads:
            assert not delta.any() or "moving_" in v.path, v.path
            continue
        g = grads[v.path].numpy()
        multiplier = 1.0 if block == "head" else block_lr[names.index(block)]
        # Against an eager gradient (kernels that round differently; a ReLU6
        # input at its clip point can flip): the fitted step size, within 1%
        # (neighbouring blocks differ by 2x).
        fitted = float(np.sum(delta * g) / np.sum(g * g)) / -lr
        assert fitted == pytest.approx(multiplier, rel=1e-2), (v.path, fitted, multiplier)
        # Against the same step without multipliers: every element, up to the
        # rounding of θ in float32 and of a gradient through a block that
        # trains in one model and not the other (0.1% of the largest update).
        plain_delta = p.numpy() - before[v.path]
        np.testing.assert_allclose(
            delta, multiplier * plain_delta, rtol=1e-3,
            atol=max(4 * np.finfo(np.float32).eps * np.abs(before[v.path]).max(),
                     1e-3 * multiplier * np.abs(plain_delta).max()), err_msg=v.path,
        )
        checked.add(block)
    assert {"head", "block_15", "block_16", "Conv_1"} <= checked
    assert "block_14" not in checked
    assert block_lr[names.index("Conv_1")] == 0.5 and block_lr[names.index("block_16")] == 0.25


def test_stage_switch_inside_one_fit_keeps_optimizer_state():
    model = make_model()
    optimizer_vars = [id(v) for v in model.optimizer.variables]
    head_velocity = model.optimizer.momentums[
        model.optimizer._get_variable_index(model.head.kernel)
    ]
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((len(model.stage_variables()), float(np.abs(head_velocity.numpy()).sum())))

    x, y = batch(16)
    schedule = freezing.StageSchedule(stages.gradual(every=1, blocks=2))
    model.fit(
        x, y, batch_size=8, epochs=3, verbose=0,
        callbacks=[schedule, Probe(), keras.callbacks.EarlyStopping(monitor="loss", patience=5)],
    )
    assert [id(v) for v in model.optimizer.variables] == optimizer_vars  # nothing rebuilt
    counts = [n for n, _ in seen]
    assert counts[0] < counts[1] < counts[2]  # one more block each epoch
    assert all(velocity > 0 for _, velocity in seen)
    assert model.optimizer.iterations.numpy() == 6


def test_step_based_stage_switch_mid_epoch():
    model = make_model()
    x, y = batch(32)
    schedule = freezing.StageSchedule([{"steps": 3, "blocks": 0}, {"steps": 1, "blocks": -1}])
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[schedule])
    assert schedule.current == 1
    assert history.history["stage"] == [2, 2]
    assert schedule.info.lowest_block == "stem"


def test_step_based_stages_count_the_steps_done_before_a_resumed_fit():
    model = make_model()
    x, y = batch(16)
    switches = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            switches.append(schedule.current)

    # A 4-step epoch resumed after 2 steps: its fit() runs 2 more, which are
    # steps 3 and 4 of the run; the second stage starts at step 4.
    schedule = freezing.StageSchedule(
        [{"steps": 3, "blocks": 0}, {"steps": 1, "blocks": -1}], steps_per_epoch=4
    )
    schedule.resume_at(2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[schedule, Probe()])
    assert switches == [0, 1]
    assert schedule.describe() == "2/2: all blocks, lr x 1"
    assert schedule.first_step == 0  # the next epoch starts at its first step


def test_reestimate_changes_only_moving_statistics():
    model = make_model(compile=False, normalize=False)
    before = snapshot(model)
    x, _ = batch(16)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(16))).batch(8)
    assert freezing.reestimate_batchnorm(model, dataset, num_batches=5) == 2
    for v in model.weights:
        changed = not np.array_equal(before[v.path], v.numpy())
        assert changed == ("moving_" in v.path), v.path
    # The mean of the stem's BatchNorm is now the data's own per-channel mean.
    features = model.backbone.get_layer("Conv1")(model.get_layer("preprocess")(x))
    expected = features.numpy().reshape(-1, features.shape[-1]).mean(axis=0)
    got = model.backbone.get_layer("bn_Conv1").moving_mean.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert all(l.momentum == 0.999 for l in model.backbone.layers if isinstance(l, keras.layers.BatchNormalization))


@pytest.mark.parametrize("method", ["bitfit", "bn_only", "lora"])
def test_parameter_efficient_methods_train_only_what_they_claim(method):
    model = make_model(compile=False)
    if method == "lora":
        assert freezing.enable_lora(model, rank=2, blocks=-1) > 0
    model.compile(keras_ft.SGD(0.05), loss=LOSS)
    info = freezing.apply_stage(model, Stage(epochs=1, blocks=-1), method=method)
    assert 0 < info.fraction < 0.2
    before = snapshot(model)
    x, y = batch()
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    head = {v.path for v in model.head.weights}
    # Trained variables only: BatchNorm in the trained blocks normalises with
    # batch statistics ("auto"), so its moving statistics move too.
    changed = {v.path for v in model.weights if not np.array_equal(before[v.path], v.numpy())
               and "moving_" not in v.path}
    assert head <= changed
    for path in changed - head:
        leaf = path.rsplit("/", 1)[-1]
        if method == "bitfit":
            assert leaf in ("bias", "beta"), path
        elif method == "bn_only":
            assert leaf in ("gamma", "beta"), path
        else:
            assert "lora_kernel" in leaf, path
    assert len(changed - head) > 10
    expected = sum(int(np.prod(v.shape)) for v in model.stage_variables())
    assert info.trainable_params == expected


def test_l2sp_penalty_and_block_drift():
    model = make_model(compile=False)
    reference = model.snapshot_reference()
    assert len(reference) > 100
    kernel = model.backbone.get_layer("Conv_1").kernel
    kernel.assign(kernel.numpy() + 0.5)
    model.l2sp_alpha = 0.2
    penalty = float(model.l2sp_penalty([kernel]))
    assert penalty == pytest.approx(0.5 * 0.2 * 0.25 * np.prod(kernel.shape), rel=1e-5)

    drift = freezing.BlockDrift()
    drift.set_model(model)
    drift.on_train_begin()
    logs = {}
    drift.on_epoch_end(0, logs)
    assert logs["drift/block_15"] == 0.0
    ref = model.reference_of(kernel).numpy()
    expected = np.linalg.norm(kernel.numpy() - ref) / np.sqrt(
        sum(np.sum(model.reference_of(v).numpy() ** 2) for v in model.backbone.get_layer("Conv_1").weights)
        + sum(np.sum(model.reference_of(v).numpy() ** 2) for v in model.backbone.get_layer("Conv_1_bn").weights
              if model.reference_of(v) is not None)
    )
    assert logs["drift/Conv_1"] == pytest.approx(expected, rel=1e-4)


def test_l2sp_pulls_toward_pretrained_weights():
    drifts = []
    # lr x alpha = 0.5: the penalty's own step shrinks θ - θ0 (above 2(1 + μ),
    # heavy-ball SGD on it would oscillate and grow instead).
    for alpha in (0.0, 10.0):
        model = make_model(lr=0.05)
        model.snapshot_reference()
        model.l2sp_alpha = alpha
        freezing.apply_stage(model, Stage(epochs=1, blocks=-1))
        x, y = batch()
        for _ in range(5):
            model.train_on_batch(x, y)
        drifts.append(sum(
            float(np.sum((v.numpy() - model.reference_of(v).numpy()) ** 2))
            for v in model.backbone.weights if model.reference_of(v) is not None
        ))
    assert drifts[1] < 0.5 * drifts[0], drifts


def test_schedule_alongside_keras_callbacks_and_keras_file_roundtrip(tmp_path, monkeypatch):
    from runs import record_logs

    lines = record_logs(monkeypatch)
    model = make_model()
    x, y = batch(16)
    statistics = lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # noqa: E731
    model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x, y),
        callbacks=[
            # The default policy ("auto"), its calibrated switch in a plain fit().
            freezing.StageSchedule(stages.lp_ft(probe_epochs=1), statistics=statistics),
            keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_loss"),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=3),
            keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        ],
    )
    assert any(l.startswith("Calibrated switch to batch statistics: 52 BatchNorm layer(s) "
                            "re-parameterised on 2 training batches") for l in lines), lines
    assert (tmp_path / "best.keras").exists() and list((tmp_path / "tb").iterdir())
    model.save(tmp_path / "last.keras")
    loaded = keras.saving.load_model(tmp_path / "last.keras", safe_mode=True)
    assert isinstance(loaded, keras_ft.Classifier) and loaded.backbone_name == "mobilenet_v2"
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)

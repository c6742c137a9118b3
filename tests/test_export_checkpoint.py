"""SavedModel export parity, and atomic checkpoints with fallback."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ft
from conftest import assert_depends_on_images, tiny_classifier
from keras_ft import checkpoint, data, export, preemption


@pytest.fixture(scope="module")
def model():
    """MobileNetV2 at 32 px whose probabilities vary from image to image."""
    m = tiny_classifier(3, class_names=["a", "b", "c"])
    m.compile(keras_ft.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def sized_by_hand(batch, size, policy):
    """What `policy` makes of uint8 `[N, H, W, 3]`, written out apart from
    `data.resize_image` (configs/base.py, `data.resize`): bilinear resizes
    with antialiasing, clipped to [0, 255]; crops and pads by index."""
    _, h, w, _ = batch.shape

    def resize(x, height, width):
        x = tf.image.resize(x.astype(np.float32), (height, width), method="bilinear", antialias=True)
        return np.clip(x.numpy(), 0.0, 255.0)

    if policy == "resize":  # the whole image, squeezed
        return resize(batch, size, size)
    if policy == "center_crop":  # the largest centered square, resized
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return resize(batch[:, top:top + side, left:left + side], size, size)
    if policy == "resize_then_crop":  # short side to size / 0.875, then the center
        scale = round(size / 0.875) / min(h, w)
        height, width = round(h * scale), round(w * scale)
        top, left = (height - size) // 2, (width - size) // 2
        return resize(batch, height, width)[:, top:top + size, left:left + size]
    assert policy == "pad"  # long side to size, centered on black
    height, width = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
    out = np.zeros((len(batch), size, size, 3), np.float32)
    top, left = (size - height) // 2, (size - width) // 2
    out[:, top:top + height, left:left + width] = resize(batch, height, width)
    return out


def probabilities(model, images):
    """Softmax of the model's logits, computed in a graph as the export runs
    it (eager kernels differ by ~1e-5 on MobileNetV2)."""
    return tf.function(lambda x: tf.nn.softmax(model(x, training=False)))(
        tf.constant(images, tf.float32)
    ).numpy()


def test_export_matches_model_on_bytes_and_uint8_of_any_size(tmp_path, model):
    path = export.export_saved_model(model, str(tmp_path / "export"), ["a", "b", "c"], 32)
    served = tf.saved_model.load(path)
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (50, 21), (7, 90)]:
        batch = rng.integers(0, 256, (6, h, w, 3)).astype(np.uint8)
        expected = probabilities(model, sized_by_hand(batch, 32, "resize"))
        assert_depends_on_images(expected, at_least=0.02)  # or parity would mean nothing
        out = served.signatures["serving_uint8"](images=tf.constant(batch))
        np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
        names = np.array([b"a", b"b", b"c"])[expected.argmax(axis=1)]
        assert out["classes"].numpy().tolist() == names.tolist()
        pngs = tf.stack([tf.io.encode_png(image) for image in batch])
        out = served.signatures["serving_default"](images=pngs)
        np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    # Writing again replaces the export in one rename; no temporary folder stays.
    export.export_saved_model(model, path, ["a", "b", "c"], 32)
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.fixture(scope="module")
def pixel_model():
    """A small model whose output moves with every pixel (and exports in a
    second, where MobileNetV2 takes ten: one export per policy)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 4, strides=4)(x)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    m = keras.Model(inputs, outputs)
    assert_depends_on_images(m(np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3))))
    return m


@pytest.mark.parametrize("policy", data.RESIZE_POLICIES)
def test_export_sizes_images_with_the_runs_resize_policy(tmp_path, pixel_model, policy):
    model = pixel_model
    path = export.export_saved_model(model, str(tmp_path / "export"), "abc", 32, resize=policy)
    served = tf.saved_model.load(path)
    rng = np.random.default_rng(1)
    for h, w in [(50, 21), (12, 45), (64, 40)]:  # (64, 40): every policy shrinks it
        batch = rng.integers(0, 256, (4, h, w, 3)).astype(np.uint8)
        sized = sized_by_hand(batch, 32, policy)
        # Training and evaluation size images with the same function.
        np.testing.assert_allclose(data.resize_image(batch, 32, policy).numpy(), sized, atol=1e-3)
        expected = probabilities(model, sized)
        assert_depends_on_images(expected, at_least=0.01)
        out = served.signatures["serving_uint8"](images=tf.constant(batch))
        np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
        pngs = tf.stack([tf.io.encode_png(image) for image in batch])
        out = served.signatures["serving_default"](images=pngs)
        np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
        if policy != "resize":  # not what the default gives: the policy is in the graph
            plain = probabilities(model, sized_by_hand(batch, 32, "resize"))
            assert np.abs(out["probabilities"].numpy() - plain).max() > 1e-2


def test_corrupt_image_is_an_error_not_a_crash(tmp_path, model):
    served = tf.saved_model.load(export.export_saved_model(model, str(tmp_path / "e"), "abc", 32))
    good = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError):
        served.signatures["serving_default"](images=tf.stack([good, tf.constant(b"not an image")]))
    out = served.signatures["serving_default"](images=tf.stack([good]))
    assert out["probabilities"].shape == (1, 3)


def test_checkpoints_are_atomic_kept_and_fall_back(tmp_path, model):
    directory = str(tmp_path / "ckpt")
    os.makedirs(os.path.join(directory, ".tmp-crashed"))  # a save that died
    manager = checkpoint.CheckpointManager(directory, keep=2, model=model, optimizer=model.optimizer)
    assert os.listdir(directory) == []  # swept
    kernel = model.head.kernel
    original = kernel.numpy().copy()
    for epoch in (1, 2, 3):
        kernel.assign(original + epoch)
        manager.save(epoch, {"history": [{"loss": float(epoch)}] * epoch})
    assert [os.path.basename(p) for p in manager.all()] == ["ckpt-000000002", "ckpt-000000003"]

    kernel.assign(original)
    state = manager.restore_latest()
    assert state["global_step"] == 3 and len(state["history"]) == 3
    np.testing.assert_array_equal(kernel.numpy(), original + 3)

    # Truncate the newest checkpoint's data: the previous one is used.
    newest = manager.all()[-1]
    data_file = [f for f in os.listdir(newest) if f.startswith("ckpt.data")][0]
    with open(os.path.join(newest, data_file), "r+b") as f:
        f.truncate(10)
    state = manager.restore_latest()
    assert state["global_step"] == 2
    np.testing.assert_array_equal(kernel.numpy(), original + 2)


def test_a_non_finite_variable_is_never_saved(tmp_path, model):
    directory = str(tmp_path / "ckpt")
    manager = checkpoint.CheckpointManager(directory, model=model, optimizer=model.optimizer)
    manager.save(1, {})
    kernel = model.head.kernel
    original = kernel.numpy().copy()
    poisoned = original.copy()
    poisoned[0, 0] = np.inf
    kernel.assign(poisoned)
    try:
        with pytest.raises(checkpoint.NonFiniteState, match=r"step 2: 1 variable\(s\).*head"):
            manager.save(2, {})
    finally:
        kernel.assign(original)
    assert os.listdir(directory) == ["ckpt-000000001"]  # nothing written, nothing lost


def test_model_objects_hold_the_random_state_of_dropout(model):
    objects = checkpoint.model_objects(model, model.snapshot_reference())
    (state,) = objects["rng"]  # the one dropout layer's
    assert state.path.endswith("seed_generator_state")
    assert objects["optimizer"] is model.optimizer


def test_sigterm_is_recorded_not_fatal_while_watched():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with preemption.Watch() as watch:
        assert not watch.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.requested
    assert signal.getsignal(signal.SIGTERM) == before
    assert "nothing new to save" in str(checkpoint.Preempted(None, 0))


def test_training_checkpoint_saves_steps_epoch_ends_and_metric_sums(tmp_path, model):
    import json

    directory = str(tmp_path / "ckpt")
    manager = checkpoint.CheckpointManager(
        directory, keep=10, **checkpoint.model_objects(model, model.snapshot_reference())
    )
    history = []
    # every_seconds tiny: a save after every step; the epoch's last step is
    # saved once, by the epoch end.
    saver = checkpoint.TrainingCheckpoint(manager, history, 3, every_seconds=1e-9)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (12, 32, 32, 3)).astype(np.float32)
    y = np.arange(12) % 3
    start = int(model.optimizer.iterations.numpy())
    model.fit(x, y, batch_size=4, epochs=2, steps_per_epoch=3, verbose=0, callbacks=[saver])
    assert int(model.optimizer.iterations.numpy()) == start + 6
    assert [os.path.basename(p) for p in manager.all()] == [
        f"ckpt-{s:09d}" for s in range(1, 7)
    ]

    def state(step):
        with open(os.path.join(directory, f"ckpt-{step:09d}", checkpoint.STATE_FILE)) as f:
            return json.load(f)

    mid, end = state(5), state(3)
    assert (mid["epoch"], mid["step"], len(mid["history"])) == (1, 2, 1)
    assert (end["epoch"], end["step"], len(end["history"])) == (1, 0, 1)
    assert end["metric_sums"] is None
    # Loss tracker (total, count): two 4-image steps of the second epoch.
    total, count = mid["metric_sums"][:2]
    assert count == 8 and np.isfinite(total) and total > 0
    assert len(history) == 2 and "loss" in history[0]

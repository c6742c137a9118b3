import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def keras_ft_home(tmp_path_factory):
    """Samples are written into a fresh folder, as on a new machine."""
    home = str(tmp_path_factory.mktemp("keras_ft_home"))
    os.environ["KERAS_FT_HOME"] = home
    return home


def write_image_folder(root, counts, size=20, seed=0):
    """Writes `counts[class]` PNG and JPEG files per class sub-folder.

    Each class has its own mean colour plus noise, so a model can learn it.
    """
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n):
            base = np.full((size, size + c, 3), 40 + 80 * c, np.float32)
            image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            if i % 2:
                blob, ext = tf.io.encode_jpeg(image, quality=95), "jpg"
            else:
                blob, ext = tf.io.encode_png(image), "png"
            with open(os.path.join(root, name, f"{i:03d}.{ext}"), "wb") as f:
                f.write(blob.numpy())
    return str(root)


def train_command(workdir, *overrides, config="configs/tiny.py") -> list[str]:
    """`python -m launch.train` on `config` with `--config.KEY=VALUE` overrides."""
    return [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
            *overrides]


def train_env() -> dict:
    """The environment launch.train runs in from tests (TensorFlow's C++ logs quiet)."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def run_train(workdir, *overrides, config="configs/tiny.py"):
    return subprocess.run(
        train_command(workdir, *overrides, config=config), cwd=REPO, env=train_env(),
        capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """A small folder of real PNG/JPEG files in two classes."""
    return write_image_folder(tmp_path_factory.mktemp("images"), {"dark": 10, "light": 10})


def error_line(result):
    """The one `error: ...` line a failed launch script printed."""
    lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# ------------------------------------------------- a tiny model that sees images


def assert_depends_on_images(outputs, at_least=0.05):
    """Per-image outputs `[N, C]` differ materially from image to image.

    A random-init MobileNetV2 with its BatchNorm statistics as initialised
    (mean 0, variance 1) attenuates every image to pooled features of ~1e-12:
    its outputs are the head's bias whatever the image, and a test on them
    cannot tell a right gradient, resize or replay from a wrong one. Every
    fixture that stands for "a model" checks this, so none can silently
    become image-blind again.
    """
    outputs = np.asarray(outputs, np.float64)
    spread = outputs.std(axis=0).max()  # across images, the most varying output
    assert spread > at_least, f"outputs barely depend on the image: std {spread:.3g}"
    return spread


def noise_images(n, size=32, seed=0):
    """`n` seeded uniform-noise float32 images in [0, 255]."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def tiny_classifier(num_classes=3, seed=0, **kwargs):
    """`keras_ft.build_classifier("mobilenet_v2", ...)` at 32 px, random init,
    with BatchNorm statistics re-estimated on 4 batches of seeded noise.

    Its logits vary from image to image by ~1-2 (checked here, on images it
    was not re-estimated on): what the mechanics tests need. `kwargs` go to
    `build_classifier` (`dropout`, `class_names`).
    """
    from keras_ft import build_classifier, freezing

    keras.utils.set_random_seed(seed)
    model = build_classifier("mobilenet_v2", num_classes, image_size=32, **kwargs)
    x = noise_images(32, seed=seed + 1000)
    batches = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x), np.int32))).batch(8)
    assert freezing.reestimate_batchnorm(model, batches, num_batches=4) == 4
    assert_depends_on_images(model(noise_images(8, seed=seed + 2000), training=False), at_least=0.3)
    return model


def folder_bytes(root) -> dict:
    """{relative path: bytes} of every file under `root`: two folders
    written alike compare equal byte for byte."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out

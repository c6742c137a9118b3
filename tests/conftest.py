import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def run_train(workdir, *overrides, config="configs/tiny.py"):
    cmd = [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        cmd + list(overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
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

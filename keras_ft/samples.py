"""Small real image sets built offline from files that ship in packages.

They make the quickstart and the end-to-end tests run on real photographs with
no network. Each is written once, as PNG files in one sub-folder per class,
under `$KERAS_FT_HOME/samples/NAME` (default `~/.cache/keras_ft`), and then
read like any user's image folder.

    lfw_faces   scikit-image's `lfw_subset()`: 100 face crops from Labeled
                Faces in the Wild and 100 non-face crops of real photos,
                25x25 gray (Viola-Jones training data). Classes: face,
                not_face.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf


def _lfw_faces() -> dict[str, np.ndarray]:
    try:
        from skimage import data as skdata
    except ImportError as e:
        raise ValueError(
            "The sample 'lfw_faces' needs scikit-image: pip install scikit-image"
        ) from e
    images = skdata.lfw_subset()  # [200, 25, 25] floats in [0, 1]
    images = np.round(images * 255.0).astype(np.uint8)[..., None]
    # scikit-image documents the first 100 as faces, the next 100 as non-faces.
    return {"face": images[:100], "not_face": images[100:]}


SAMPLES = {"lfw_faces": _lfw_faces}


def home() -> str:
    return os.environ.get(
        "KERAS_FT_HOME", os.path.join(os.path.expanduser("~"), ".cache", "keras_ft")
    )


def materialize(name: str) -> str:
    """Writes sample `name` as an image folder (once) and returns its path."""
    if name not in SAMPLES:
        raise ValueError(
            f"Unknown sample {name!r}. Choose one of: {', '.join(sorted(SAMPLES))}."
        )
    path = os.path.join(home(), "samples", name)
    if os.path.isdir(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written beside its final place and renamed in one step, so a reader
    # never sees a half-written folder.
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(path))
    try:
        for class_name, images in SAMPLES[name]().items():
            os.makedirs(os.path.join(tmp, class_name))
            for i, image in enumerate(images):
                png = tf.io.encode_png(image).numpy()
                with open(os.path.join(tmp, class_name, f"{i:04d}.png"), "wb") as f:
                    f.write(png)
        os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Renaming onto a folder another process has just written fails: fine.
        if not (isinstance(e, OSError) and os.path.isdir(path)):
            raise
    return path

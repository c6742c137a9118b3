"""Small real image sets built offline from files that ship in packages.

They make the quickstart and the end-to-end tests run on real photographs with
no network. Each is written once, as PNG files in one sub-folder per class,
under `$KERAS_FT_HOME/samples/NAME` (default `~/.cache/keras_ft`), and then
read like any user's image folder.

    lfw_faces   scikit-image's `lfw_subset()`: 100 face crops from Labeled
                Faces in the Wild and 100 non-face crops of real photos,
                25x25 gray (Viola-Jones training data). Classes: face,
                not_face.
    fashion_mnist_N
                the first N images of each of the 10 classes of
                Fashion-MNIST's training file (28x28 gray photos of clothes;
                N up to 6000), from Debian's `dataset-fashion-mnist`
                package (`apt-get install dataset-fashion-mnist`). A harder
                task than lfw_faces: it separates good recipes from bad.
"""

from __future__ import annotations

import gzip
import os
import re
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


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)


def read_idx(path: str, magic: int) -> np.ndarray:
    """A gzipped IDX array (the MNIST file format) of unsigned bytes, checked:
    magic number, dimensions and size must agree."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(
            f"{path} declares shape {shape} but holds {len(raw) - header} bytes of data: "
            "the file is damaged (reinstall dataset-fashion-mnist)."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _fashion_mnist(per_class: int) -> dict[str, np.ndarray]:
    images_path = os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")
    labels_path = os.path.join(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz")
    if not (os.path.exists(images_path) and os.path.exists(labels_path)):
        raise ValueError(
            f"The Fashion-MNIST samples need Debian's Fashion-MNIST files in "
            f"{FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist"
        )
    images = read_idx(images_path, 0x00000803)
    labels = read_idx(labels_path, 0x00000801)
    if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{images_path} and {labels_path} do not match: reinstall the package.")
    out = {}
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        chosen = images[labels == label][:per_class]
        if len(chosen) < per_class:
            raise ValueError(
                f"Fashion-MNIST has {len(chosen)} training images of class {name}, "
                f"fewer than the {per_class} asked for."
            )
        out[name] = chosen[..., None]
    return out


SAMPLES = {"lfw_faces": _lfw_faces}
# Families of samples: a name pattern and a function of its number.
FAMILIES = {re.compile(r"fashion_mnist_([1-9][0-9]*)"): _fashion_mnist}


def _maker(name: str):
    """The function of no arguments that builds sample `name`."""
    if name in SAMPLES:
        return SAMPLES[name]
    for pattern, make in FAMILIES.items():
        match = pattern.fullmatch(name)
        if match:
            return lambda: make(int(match.group(1)))
    raise ValueError(
        f"Unknown sample {name!r}. Choose one of: {', '.join(sorted(SAMPLES))}, "
        "fashion_mnist_N (N images per class)."
    )


def home() -> str:
    return os.environ.get(
        "KERAS_FT_HOME", os.path.join(os.path.expanduser("~"), ".cache", "keras_ft")
    )


def materialize(name: str) -> str:
    """Writes sample `name` as an image folder (once) and returns its path."""
    make = _maker(name)  # a known name: never a path

    def build(path):
        sample = make()  # fails before anything is written

        def fill(tmp):
            for class_name, images in sample.items():
                os.makedirs(os.path.join(tmp, class_name))
                for i, image in enumerate(images):
                    png = tf.io.encode_png(image).numpy()
                    with open(os.path.join(tmp, class_name, f"{i:04d}.png"), "wb") as f:
                        f.write(png)

        return write_folder(path, fill)

    return cached_folder(name, build)


def write_folder(root: str, fill) -> str:
    """Calls `fill(tmp)` on a new folder beside `root`, then renames it to
    `root` in one step, so a reader never sees a half-written folder; on any
    error the temporary folder is removed. Returns `root`."""
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
    try:
        fill(tmp)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def cached_folder(name: str, build) -> str:
    """`$KERAS_FT_HOME/samples/NAME`, made by `build(path)` the first time
    (with `write_folder`: there means complete) and found there after."""
    path = os.path.join(home(), "samples", name)
    if os.path.isdir(path):
        return path
    try:
        return build(path)
    except OSError:
        # Another process has just renamed the same folder into place: fine.
        if os.path.isdir(path):
            return path
        raise

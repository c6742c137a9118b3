"""A small real semantic-segmentation set built offline: garments on photos.

Fashion-MNIST garments (Debian's `dataset-fashion-mnist`, read with
`samples.read_idx`) are pasted onto crops of the real photographs bundled with
scikit-image, so segmentation code can train and be tested on real pixels with
no network. `materialize()` writes it once under
`$KERAS_FT_HOME/samples/fashion_seg_{count}_{size}`:

    images/NNNN.png   SIZE x SIZE RGB
    masks/NNNN.png    SIZE x SIZE 8-bit class indices (mode "L", 0 to 4)
    classes.txt       the class names, line i = class i

Classes: 0 background, 1 trouser, 2 bag, 3 sneaker, 4 t_shirt (Fashion-MNIST's
"t-shirt_top"): four garments whose outlines differ most.

The recipe, all from `numpy.random.default_rng`:

1. The plan, from `default_rng(seed)`, in this order: each sample's number of
   garments, uniform in 1..3; the garments' classes, dealt from a deck
   shuffled anew every 4 cards, so garments 4k to 4k + 3 hold each class
   once (balanced classes: the first samples that hold 4 garments in all
   hold every class, unless one is covered up); for each class, a random
   order of its 6000 training images, taken in turn, so no image is used
   twice until a class has had 6000 garments (never below 8000 samples).
2. Sample i, from its own `default_rng([seed, i])`, in this order:
   a. Background: one of the 8 `PHOTOS` bundled in scikit-image's wheel,
      `skimage.data.` astronaut, brick, camera, chelsea, coffee, grass,
      gravel, rocket (uniform; gray ones repeated to RGB); then a square
      crop whose side is uniform in [short side // 4, short side] (a random
      scale: 75 to 512 px of the photo become SIZE px), at a uniform
      position, resized to SIZE x SIZE (PIL bilinear).
   b. Each garment in turn, later ones on top: a side uniform in
      [round(SIZE / 3), round(7 * SIZE / 12)] (32 to 56 px at SIZE 96),
      the 28 x 28 image resized to it (PIL bilinear); a top-left corner
      uniform over the positions that keep it whole inside the image; a
      tint uniform in [0.3, 1.0] per RGB channel, independent of the class,
      so colour does not give the class away. Its pixels are where the
      resized intensity exceeds `ALPHA_THRESHOLD` (40 of 255); there the
      image becomes round(intensity * tint) and the mask its class (a
      garment's darkest parts, stripes included, show the photo and stay
      background).

Same seed, same bytes. 400 samples of 96 px take a few seconds (0.5 s of
which reads Fashion-MNIST).
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

from keras_ft import samples

# (our name, Fashion-MNIST's name); class i + 1 is garment i.
GARMENTS = (
    ("trouser", "trouser"),
    ("bag", "bag"),
    ("sneaker", "sneaker"),
    ("t_shirt", "t-shirt_top"),
)
CLASSES = ("background",) + tuple(name for name, _ in GARMENTS)
# The scikit-image photographs that ship inside its wheel (checked offline
# with scikit-image 0.26; others, such as `eagle`, need a download).
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "rocket")
PER_CLASS = 6000  # Fashion-MNIST's training file holds 6000 images of each class
ALPHA_THRESHOLD = 40  # of 255: darker pixels of a garment image are its backdrop
MAX_GARMENTS = 3
MIN_SIZE = 24  # the smallest garments are then 8 px
MAX_COUNT = 9999  # files are named NNNN.png


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    try:
        from skimage import data as skdata
    except ImportError as e:
        raise ValueError(
            "The fashion_seg samples need scikit-image: pip install scikit-image"
        ) from e
    photos = []
    for name in PHOTOS:
        photo = getattr(skdata, name)()
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=-1)
        photo.setflags(write=False)  # shared by every call
        photos.append(photo)
    return tuple(photos)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Step 2a: a random crop of a random photo, as `size` x `size` RGB."""
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    short = min(photo.shape[:2])
    side = int(rng.integers(short // 4, short + 1))
    top = int(rng.integers(photo.shape[0] - side + 1))
    left = int(rng.integers(photo.shape[1] - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(photo[top:top + side, left:left + side]))
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


def background(index: int, size: int = 96, seed: int = 0) -> np.ndarray:
    """The background of sample `index` of `build(..., size, seed)` alone:
    the image before any garment is pasted on, `[size, size, 3]` uint8."""
    return _background(np.random.default_rng([seed, index]), size)


def _plan(count: int, seed: int, most: int = MAX_GARMENTS) -> list[list[tuple[int, int]]]:
    """Step 1: per sample, its garments as (class index, image number); each
    sample holds 1 to `most` garments (`detection.samples` asks for 4)."""
    rng = np.random.default_rng(seed)
    numbers = rng.integers(1, most + 1, size=count)
    total = int(numbers.sum())
    decks = [rng.permutation(len(GARMENTS)) for _ in range(-(-total // len(GARMENTS)))]
    classes = np.concatenate(decks)[:total] + 1
    orders = [rng.permutation(PER_CLASS) for _ in GARMENTS]
    taken = [0] * len(GARMENTS)
    garments = []
    for c in classes:
        garments.append((int(c), int(orders[c - 1][taken[c - 1] % PER_CLASS])))
        taken[c - 1] += 1
    starts = np.concatenate([[0], np.cumsum(numbers)])
    return [garments[starts[i]:starts[i + 1]] for i in range(count)]


def _sample(index, garments, sources, size, seed) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: sample `index`'s image and mask."""
    rng = np.random.default_rng([seed, index])
    image = _background(rng, size).copy()
    mask = np.zeros((size, size), np.uint8)
    low, high = round(size / 3), round(7 * size / 12)
    for c, number in garments:
        side = int(rng.integers(low, high + 1))
        top, left = (int(v) for v in rng.integers(size - side + 1, size=2))
        tint = rng.uniform(0.3, 1.0, size=3)
        gray = Image.fromarray(sources[c - 1][number])
        gray = np.asarray(gray.resize((side, side), Image.BILINEAR)).astype(np.float64)
        on = gray > ALPHA_THRESHOLD
        colour = np.rint(gray[..., None] * tint).astype(np.uint8)
        window = (slice(top, top + side), slice(left, left + side))
        image[window][on] = colour[on]
        mask[window][on] = c
    return image, mask


def _check(count: int, size: int) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be 1 to {MAX_COUNT}, not {count}.")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, not {size}.")


def build(root: str, count: int = 400, size: int = 96, seed: int = 0) -> str:
    """Writes the garments-on-photos segmentation set to `root`.

    The recipe is in this module's docstring. The folder appears complete or
    not at all: it is written beside `root` and renamed in one step.

    Args:
        root: the folder to create; it must not exist.
        count: the number of samples, 1 to 9999.
        size: the side of the square images in pixels, 24 or more.
        seed: the same seed writes byte-identical files.

    Returns:
        `root`, holding `images/NNNN.png`, `masks/NNNN.png` and `classes.txt`.

    Raises:
        ValueError: on bad arguments, or when Fashion-MNIST is not installed
            (`apt-get install dataset-fashion-mnist`).
        FileExistsError: when `root` exists.
    """
    _check(count, size)
    root = os.path.abspath(root)
    if os.path.exists(root):
        raise FileExistsError(f"{root} exists: build writes a new folder.")
    fashion = samples._fashion_mnist(PER_CLASS)  # fails before anything is written
    sources = [fashion[fashion_name][..., 0] for _, fashion_name in GARMENTS]
    _photos()

    def fill(tmp):
        os.makedirs(os.path.join(tmp, "images"))
        os.makedirs(os.path.join(tmp, "masks"))
        for i, garments in enumerate(_plan(count, seed)):
            image, mask = _sample(i, garments, sources, size, seed)
            Image.fromarray(image).save(os.path.join(tmp, "images", f"{i:04d}.png"))
            Image.fromarray(mask).save(os.path.join(tmp, "masks", f"{i:04d}.png"))
        with open(os.path.join(tmp, "classes.txt"), "w") as f:
            f.write("".join(name + "\n" for name in CLASSES))

    return samples.write_folder(root, fill)


def materialize(count: int = 400, size: int = 96) -> str:
    """Builds the set with seed 0 once, under the samples cache
    (`$KERAS_FT_HOME/samples/fashion_seg_{count}_{size}`), and returns its
    path; later calls return the folder already there."""
    _check(count, size)
    return samples.cached_folder(f"fashion_seg_{count}_{size}",
                                 lambda path: build(path, count, size, seed=0))

"""Small real object-detection sets built offline, written in COCO format.

Two sets, so detection code can train and be tested on real pixels with no
network:

`fashion_det`: Fashion-MNIST garments pasted on the real photographs bundled
with scikit-image, as in `keras_ft.seg_samples` (whose functions it uses),
with exact boxes. `materialize()` writes it once under
`$KERAS_FT_HOME/samples/fashion_det_{count}_{size}`:

    images/NNNN.png     SIZE x SIZE RGB, NNNN = 0000, 0001, ...
    annotations.json    COCO: images (id NNNN + 1, file_name "NNNN.png",
                        width, height), annotations (id from 1, image_id,
                        category_id, bbox [x, y, w, h] in float pixels,
                        area = the object's visible pixel count, iscrowd 0),
                        categories (id 1 to 4, name, supercategory)

Categories: 1 trouser, 2 bag, 3 sneaker, 4 t_shirt (the garments of
`seg_samples.GARMENTS`; detection has no background class). It needs Debian's
`dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`).

The recipe, all from `numpy.random.default_rng`:

1. The plan: `seg_samples._plan(count, seed, most=4)`: each sample's number
   of garments, uniform in 1..4; their classes dealt from a deck shuffled
   anew every 4 cards (balanced classes); for each class a random order of
   its 6000 training images, taken in turn (no image is used twice until a
   class has had 6000 garments: about 9600 samples).
2. Sample i, from its own `default_rng([seed, i])`, in this order:
   a. The background: `seg_samples._background` (a random square crop of one
      of the 8 photos of `seg_samples.PHOTOS`, resized to SIZE x SIZE).
   b. Each garment in turn, later ones on top (so some are partly hidden):
      a side uniform in [round(SIZE / 4), round(SIZE / 2)] (32 to 64 px at
      SIZE 128), the 28 x 28 image resized to it (PIL bilinear); a top-left
      corner uniform over the positions that keep it whole inside the image;
      a tint uniform in [0.3, 1.0] per RGB channel. Its pixels are where the
      resized intensity exceeds `seg_samples.ALPHA_THRESHOLD` (40 of 255);
      there the image becomes round(intensity * tint), and an instance map
      the garment's number (each pasted pixel overwrites the one below).
3. The annotations: a garment's visible pixels are those the instance map
   still gives it. Its box is their bounding box in pixel-edge coordinates
   (x1 = the leftmost visible column, x2 = the rightmost + 1; the same for
   y), its area their count. A garment with fewer than `MIN_VISIBLE` (20)
   visible pixels, or with less than `MIN_VISIBLE_FRACTION` (30%) of its
   own pasted pixels still visible, is hidden: it has no annotation (its
   visible scraps stay in the image).

Same seed, same bytes.

`coins`: crops of scikit-image's `data.coins()` (303 x 384 gray photo of 24
Greek coins, in the wheel: no Debian package needed), one category, 1 coin.
`coin_boxes()` finds the 24 coins by scikit-image's region-based
segmentation (sobel elevation map, watershed from markers below 30 and above
150, holes filled, regions of `MIN_COIN_AREA` px or more; exactly 24 is
checked every time). `materialize_coins()` writes, under
`$KERAS_FT_HOME/samples/coins_{count}_{size}`:

    train/images/NNNN.png, train/annotations.json
    val/images/NNNN.png,   val/annotations.json      (COCO, as above)

Train crops lie entirely in the photo's columns [0, 256), val crops in
[256, 384): no pixel is in both. `build_coins` draws crop i of split s
(0 train, 1 val) from `default_rng([seed, s, i])`: a side uniform in
[96, min(200, strip width)] px (so val crops, in a 128-px strip, are 96 to
128 px), a top-left corner uniform over the positions inside its strip; the
crop resized to SIZE x SIZE (PIL bilinear), gray repeated to RGB. A coin is
annotated when at least 60% of its box's area lies inside the crop (coins cut
by the strips' border belong to the side holding most of them); its box is
clipped to the crop and scaled to SIZE, its area is the count of its pixels
inside the crop, scaled likewise. Same seed, same bytes.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
from PIL import Image

from keras_ft import samples, seg_samples

CATEGORIES = tuple(name for name, _ in seg_samples.GARMENTS)  # category i + 1
MAX_GARMENTS = 4
MIN_VISIBLE = 20  # visible pixels below which a garment is hidden
MIN_VISIBLE_FRACTION = 0.3  # of its own pasted pixels
MIN_SIZE = 32  # the smallest garments are then 8 px
MAX_COUNT = 9999  # files are named NNNN.png

COIN_COUNT = 24  # coins in skimage.data.coins()
MIN_COIN_AREA = 100  # px: the watershed's specks are smaller than any coin
COIN_MARKERS = (30, 150)  # below: surely background; above: surely coin
VAL_LEFT = 256  # val crops lie in columns [VAL_LEFT, 384), train ones left of it
CROP_SIDES = (96, 200)  # px of the photo
MIN_INSIDE = 0.6  # of a coin's box area, for it to be annotated in a crop
VAL_FRACTION = 0.2
MIN_COINS_SIZE = 24


def _check(count: int, size: int, min_size: int, min_count: int = 1) -> None:
    if not min_count <= count <= MAX_COUNT:
        raise ValueError(f"count must be {min_count} to {MAX_COUNT}, not {count}.")
    if size < min_size:
        raise ValueError(f"size must be at least {min_size} px, not {size}.")


# --------------------------------------------------------------- fashion_det


def _sample(index, garments, sources, size, seed):
    """Step 2 of the recipe: sample `index`'s image, its instance map (0 for
    the photo, k + 1 where garment k shows) and each garment's pasted pixel
    count."""
    rng = np.random.default_rng([seed, index])
    image = seg_samples._background(rng, size).copy()
    ids = np.zeros((size, size), np.uint8)
    pasted = []
    low, high = round(size / 4), round(size / 2)
    for k, (c, number) in enumerate(garments):
        side = int(rng.integers(low, high + 1))
        top, left = (int(v) for v in rng.integers(size - side + 1, size=2))
        tint = rng.uniform(0.3, 1.0, size=3)
        gray = Image.fromarray(sources[c - 1][number])
        gray = np.asarray(gray.resize((side, side), Image.BILINEAR)).astype(np.float64)
        on = gray > seg_samples.ALPHA_THRESHOLD
        colour = np.rint(gray[..., None] * tint).astype(np.uint8)
        window = (slice(top, top + side), slice(left, left + side))
        image[window][on] = colour[on]
        ids[window][on] = k + 1
        pasted.append(int(np.count_nonzero(on)))
    return image, ids, pasted


def _boxes(ids: np.ndarray, pasted: list[int]) -> list[tuple[int, tuple[int, int, int, int], int]]:
    """Step 3: per garment still shown, (its number k, its box
    (x1, y1, x2, y2) in pixel edges, its visible pixel count)."""
    out = []
    for k, total in enumerate(pasted):
        rows, cols = np.nonzero(ids == k + 1)
        visible = len(rows)
        if visible < MIN_VISIBLE or visible < MIN_VISIBLE_FRACTION * total:
            continue  # hidden
        box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        out.append((k, box, visible))
    return out


def _sources() -> list[np.ndarray]:
    fashion = samples._fashion_mnist(seg_samples.PER_CLASS)
    return [fashion[fashion_name][..., 0] for _, fashion_name in seg_samples.GARMENTS]


def instances(index: int, count: int = 400, size: int = 128, seed: int = 0):
    """Sample `index` of `build(..., count, size, seed)` with what lies under
    its annotations: `(image, ids, classes)`, where `image` is the
    `[size, size, 3]` uint8 image written, `ids` the `[size, size]` instance
    map (0 where the photo shows, k + 1 where garment k of the sample shows)
    and `classes[k]` garment k's category id. Hidden garments are included."""
    _check(count, size, MIN_SIZE)
    if not 0 <= index < count:
        raise ValueError(f"index must be 0 to {count - 1}, not {index}.")
    garments = seg_samples._plan(count, seed, most=MAX_GARMENTS)[index]
    image, ids, _ = _sample(index, garments, _sources(), size, seed)
    return image, ids, [c for c, _ in garments]


def _categories(names) -> list[dict]:
    return [
        {"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(names)
    ]


def _write_json(path: str, coco: dict) -> None:
    with open(path, "w") as f:
        json.dump(coco, f, indent=1)
        f.write("\n")


def _new_root(root: str) -> str:
    root = os.path.abspath(root)
    if os.path.exists(root):
        raise FileExistsError(f"{root} exists: build writes a new folder.")
    return root


def build(root: str, count: int = 400, size: int = 128, seed: int = 0) -> str:
    """Writes the garments-on-photos detection set to `root`, in COCO format.

    The recipe is in this module's docstring. Garments mostly covered by
    later ones are hidden: they have no annotation.

    Args:
        root: the folder to create; it must not exist.
        count: the number of images, 1 to 9999.
        size: the side of the square images in pixels, 32 or more.
        seed: the same seed writes byte-identical files.

    Returns:
        `root`, holding `images/NNNN.png` and `annotations.json`.

    Raises:
        ValueError: on bad arguments, or when Fashion-MNIST is not installed
            (`apt-get install dataset-fashion-mnist`).
        FileExistsError: when `root` exists.
    """
    _check(count, size, MIN_SIZE)
    root = _new_root(root)
    sources = _sources()  # fails before anything is written
    seg_samples._photos()

    def write(tmp):
        os.makedirs(os.path.join(tmp, "images"))
        images, annotations = [], []
        for i, garments in enumerate(seg_samples._plan(count, seed, most=MAX_GARMENTS)):
            image, ids, pasted = _sample(i, garments, sources, size, seed)
            name = f"{i:04d}.png"
            Image.fromarray(image).save(os.path.join(tmp, "images", name))
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for k, (x1, y1, x2, y2), visible in _boxes(ids, pasted):
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": garments[k][0],
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "area": float(visible),
                    "iscrowd": 0,
                })
        _write_json(os.path.join(tmp, "annotations.json"), {
            "images": images,
            "annotations": annotations,
            "categories": _categories(CATEGORIES),
        })

    return samples.write_folder(root, write)


def materialize(count: int = 400, size: int = 128) -> str:
    """Builds `fashion_det` with seed 0 once, under the samples cache
    (`$KERAS_FT_HOME/samples/fashion_det_{count}_{size}`), and returns its
    path; later calls return the folder already there."""
    _check(count, size, MIN_SIZE)
    return samples.cached_folder(f"fashion_det_{count}_{size}",
                                 lambda path: build(path, count, size, seed=0))


# --------------------------------------------------------------------- coins


@functools.lru_cache(maxsize=1)
def _coins() -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, int, int, int], ...]]:
    """The photo, its coin label map (0 background, j + 1 coin j) and the
    coins' boxes (x1, y1, x2, y2) in pixel edges, in scikit-image's label
    order (top to bottom, then left to right, by first pixel)."""
    try:
        from scipy import ndimage
        from skimage import data as skdata
        from skimage import filters, measure, segmentation
    except ImportError as e:
        raise ValueError("The coins samples need scikit-image: pip install scikit-image") from e
    photo = skdata.coins()
    markers = np.zeros(photo.shape, np.uint8)
    markers[photo < COIN_MARKERS[0]] = 1
    markers[photo > COIN_MARKERS[1]] = 2
    regions = segmentation.watershed(filters.sobel(photo), markers) == 2
    regions = ndimage.binary_fill_holes(regions)
    labels = np.zeros(photo.shape, np.int32)
    boxes = []
    for region in measure.regionprops(measure.label(regions)):
        if region.area < MIN_COIN_AREA:
            continue
        y1, x1, y2, x2 = region.bbox  # exclusive ends: pixel edges already
        labels[tuple(region.coords.T)] = len(boxes) + 1
        boxes.append((int(x1), int(y1), int(x2), int(y2)))
    if len(boxes) != COIN_COUNT:
        raise ValueError(
            f"Found {len(boxes)} coins in skimage.data.coins(), not {COIN_COUNT}: this "
            "scikit-image's photo or segmentation differs from the one checked (0.26)."
        )
    photo.setflags(write=False)
    labels.setflags(write=False)
    return photo, labels, tuple(boxes)


def coin_boxes() -> list[tuple[int, int, int, int]]:
    """The 24 coins' boxes in `skimage.data.coins()`, as (x1, y1, x2, y2)
    pixel edges (x2 = rightmost column + 1)."""
    return list(_coins()[2])


def _strip(split: int, width: int) -> tuple[int, int]:
    """Columns [start, stop) of the photo that crops of `split` lie in."""
    return (0, VAL_LEFT) if split == 0 else (VAL_LEFT, width)


def _crop(split: int, index: int, seed: int) -> tuple[int, int, int]:
    """Crop `index` of `split`: (top, left, side) in the photo."""
    photo = _coins()[0]
    start, stop = _strip(split, photo.shape[1])
    rng = np.random.default_rng([seed, split, index])
    side = int(rng.integers(CROP_SIDES[0], min(CROP_SIDES[1], stop - start, photo.shape[0]) + 1))
    top = int(rng.integers(photo.shape[0] - side + 1))
    left = start + int(rng.integers(stop - start - side + 1))
    return top, left, side


def _coin_annotations(top: int, left: int, side: int, size: int) -> list[tuple[list[float], float]]:
    """The (bbox [x, y, w, h], area) of the coins annotated in a crop, in
    the resized crop's pixels."""
    _, labels, boxes = _coins()
    scale = size / side
    window = labels[top:top + side, left:left + side]
    out = []
    for j, (x1, y1, x2, y2) in enumerate(boxes):
        cx1, cy1 = max(x1, left), max(y1, top)
        cx2, cy2 = min(x2, left + side), min(y2, top + side)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        if (cx2 - cx1) * (cy2 - cy1) < MIN_INSIDE * (x2 - x1) * (y2 - y1):
            continue
        bbox = [
            round((cx1 - left) * scale, 3), round((cy1 - top) * scale, 3),
            round((cx2 - cx1) * scale, 3), round((cy2 - cy1) * scale, 3),
        ]
        area = round(int(np.count_nonzero(window == j + 1)) * scale * scale, 3)
        out.append((bbox, area))
    return out


def build_coins(root: str, count: int = 200, size: int = 96, seed: int = 0) -> str:
    """Writes `count` random crops of scikit-image's coins photo to `root`,
    with the coins' boxes, in COCO format, split by columns into train and
    val (the recipe is in this module's docstring).

    Args:
        root: the folder to create; it must not exist.
        count: the number of crops in all, 2 to 9999; `round(count / 5)`
            (at least 1) are val crops, the rest train crops.
        size: the side of the square images in pixels, 24 or more.
        seed: the same seed writes byte-identical files.

    Returns:
        `root`, holding `train/` and `val/`, each with `images/NNNN.png` and
        `annotations.json`.

    Raises:
        ValueError: on bad arguments, or when the photo's coins are not the
            24 expected.
        FileExistsError: when `root` exists.
    """
    _check(count, size, MIN_COINS_SIZE, min_count=2)
    root = _new_root(root)
    photo = _coins()[0]  # fails before anything is written
    n_val = max(1, round(count * VAL_FRACTION))

    def write(tmp):
        for split, (folder, n) in enumerate((("train", count - n_val), ("val", n_val))):
            os.makedirs(os.path.join(tmp, folder, "images"))
            images, annotations = [], []
            for i in range(n):
                top, left, side = _crop(split, i, seed)
                crop = np.ascontiguousarray(photo[top:top + side, left:left + side])
                crop = Image.fromarray(crop)
                crop = crop.resize((size, size), Image.BILINEAR).convert("RGB")
                name = f"{i:04d}.png"
                crop.save(os.path.join(tmp, folder, "images", name))
                images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
                for bbox, area in _coin_annotations(top, left, side, size):
                    annotations.append({
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": 1,
                        "bbox": bbox,
                        "area": area,
                        "iscrowd": 0,
                    })
            _write_json(os.path.join(tmp, folder, "annotations.json"), {
                "images": images,
                "annotations": annotations,
                "categories": _categories(("coin",)),
            })

    return samples.write_folder(root, write)


def materialize_coins(count: int = 200, size: int = 96) -> str:
    """Builds `coins` with seed 0 once, under the samples cache
    (`$KERAS_FT_HOME/samples/coins_{count}_{size}`), and returns its path;
    later calls return the folder already there."""
    _check(count, size, MIN_COINS_SIZE, min_count=2)
    return samples.cached_folder(f"coins_{count}_{size}",
                                 lambda path: build_coins(path, count, size, seed=0))

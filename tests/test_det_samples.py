import collections
import functools
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import folder_bytes
from keras_ft import samples, seg_samples
from keras_ft.detection import samples as det_samples

COUNT, SIZE = 16, 64
COINS_COUNT, COINS_SIZE = 10, 64
APT = "apt-get install dataset-fashion-mnist"


def _has_fashion_mnist():
    return os.path.exists(os.path.join(samples.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))


def _coco(root):
    """The parsed annotations.json of `root`, checked for consistent ids."""
    with open(os.path.join(root, "annotations.json")) as f:
        coco = json.load(f)
    images, annotations = coco["images"], coco["annotations"]
    image_ids = [im["id"] for im in images]
    assert image_ids == list(range(1, len(images) + 1))
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    assert sorted(os.listdir(os.path.join(root, "images"))) == [im["file_name"] for im in images]
    for im in images:
        assert im["file_name"] == f"{im['id'] - 1:04d}.png"
        with Image.open(os.path.join(root, "images", im["file_name"])) as image:
            assert image.mode == "RGB"
            assert image.size == (im["width"], im["height"])
    category_ids = {c["id"] for c in coco["categories"]}
    for a in annotations:
        assert a["image_id"] in image_ids
        assert a["category_id"] in category_ids
        assert a["iscrowd"] == 0
        x, y, w, h = a["bbox"]
        size = images[a["image_id"] - 1]["width"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= size + 1e-6 and y + h <= size + 1e-6  # inside the image
        assert 0 < a["area"] <= w * h + 1e-6
    return coco


def _by_image(coco):
    out = collections.defaultdict(list)
    for a in coco["annotations"]:
        out[a["image_id"] - 1].append(a)
    return out


# --------------------------------------------------------------- fashion_det


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not _has_fashion_mnist():
        pytest.skip(APT)
    return det_samples.build(str(tmp_path_factory.mktemp("det") / "set"), COUNT, SIZE, seed=0)


def test_layout_and_coco(built):
    coco = _coco(built)
    assert sorted(os.listdir(built)) == ["annotations.json", "images"]
    assert len(coco["images"]) == COUNT
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [
        (1, "trouser"), (2, "bag"), (3, "sneaker"), (4, "t_shirt")
    ]
    assert all(im["width"] == im["height"] == SIZE for im in coco["images"])


def test_same_seed_same_bytes(built, tmp_path):
    again = det_samples.build(str(tmp_path / "again"), COUNT, SIZE, seed=0)
    other = det_samples.build(str(tmp_path / "other"), COUNT, SIZE, seed=1)
    assert folder_bytes(again) == folder_bytes(built)
    assert folder_bytes(other).keys() == folder_bytes(built).keys()
    assert folder_bytes(other) != folder_bytes(built)
    assert folder_bytes(other)["annotations.json"] != folder_bytes(built)["annotations.json"]


@functools.lru_cache(maxsize=1)
def _sources():
    return det_samples._sources()


def _rebuilt(i, seed=0, count=COUNT, size=SIZE):
    """Sample i rebuilt through the module's own steps: image, instance map,
    per-garment pasted counts, garments (class, image number)."""
    garments = seg_samples._plan(count, seed, most=det_samples.MAX_GARMENTS)[i]
    image, ids, pasted = det_samples._sample(i, garments, _sources(), size, seed)
    return image, ids, pasted, garments


def test_boxes_are_the_visible_pixels_bounds(built):
    coco = _coco(built)
    by_image = _by_image(coco)
    hidden = 0
    for i in range(COUNT):
        image, ids, pasted, garments = _rebuilt(i)
        written = np.asarray(Image.open(os.path.join(built, "images", f"{i:04d}.png")))
        np.testing.assert_array_equal(written, image)
        assert 1 <= len(garments) <= 4
        expected = []
        for k, (c, _) in enumerate(garments):
            rows, cols = np.nonzero(ids == k + 1)
            if len(rows) < 20 or len(rows) < 0.3 * pasted[k]:
                hidden += 1
                continue
            box = [float(cols.min()), float(rows.min()),
                   float(cols.max() + 1 - cols.min()), float(rows.max() + 1 - rows.min())]
            expected.append((c, box, float(len(rows))))
        got = [(a["category_id"], a["bbox"], a["area"]) for a in by_image[i]]
        assert got == expected, i
    # 1 to 4 garments per image, plus a few hidden ones.
    assert len(coco["annotations"]) + hidden == sum(len(g) for g in seg_samples._plan(
        COUNT, 0, most=det_samples.MAX_GARMENTS))


def test_box_edges_are_garment_pixels(built):
    """Each of a box's four edge lines holds a pixel of its garment, and
    there the image is not the photo underneath."""
    by_image = _by_image(_coco(built))
    for i in range(COUNT):
        image, ids, _, garments = _rebuilt(i)
        photo = seg_samples.background(i, SIZE, seed=0)
        changed = np.any(image != photo, axis=-1)
        shown = [k for k in range(len(garments))
                 if np.count_nonzero(ids == k + 1) >= det_samples.MIN_VISIBLE]
        for a in by_image[i]:
            x, y, w, h = (int(v) for v in a["bbox"])
            # the one garment of this class whose visible pixels fill the box
            (k,) = [k for k in shown if garments[k][0] == a["category_id"]
                    and np.count_nonzero(ids[y:y + h, x:x + w] == k + 1) == a["area"]
                    and np.count_nonzero(ids == k + 1) == a["area"]][:1]
            own = (ids == k + 1) & changed
            assert own[y, x:x + w].any() and own[y + h - 1, x:x + w].any()
            assert own[y:y + h, x].any() and own[y:y + h, x + w - 1].any()
            # nothing of it lies outside the box
            outside = ids == k + 1
            outside[y:y + h, x:x + w] = False
            assert not outside.any()


def test_occluded_garments_shrink(built):
    """A garment's box is its full pasted box when nothing covers it, and a
    smaller one when later garments cover its edges."""
    shrunk = 0
    for i in range(COUNT):
        _, ids, pasted, garments = _rebuilt(i)
        boxes = {k: box for k, box, _ in det_samples._boxes(ids, pasted)}
        for k in boxes:
            # the sample cut after garment k: garment k on top, whole
            _, alone, _ = det_samples._sample(
                i, garments[:k + 1], _sources(), SIZE, 0)
            rows, cols = np.nonzero(alone == k + 1)
            assert len(rows) == pasted[k]
            full = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            x1, y1, x2, y2 = boxes[k]
            assert full[0] <= x1 and full[1] <= y1 and x2 <= full[2] and y2 <= full[3]
            if k == len(garments) - 1:
                assert boxes[k] == full  # the top garment is whole
            shrunk += boxes[k] != full
    assert shrunk >= 1


def test_classes_balanced(built):
    counts = collections.Counter(a["category_id"] for a in _coco(built)["annotations"])
    assert set(counts) == {1, 2, 3, 4}
    assert min(counts.values()) >= 0.5 * max(counts.values())
    # the plan deals each class once per 4 garments
    plan = seg_samples._plan(400, 0, most=det_samples.MAX_GARMENTS)
    dealt = collections.Counter(c for garments in plan for c, _ in garments)
    assert max(dealt.values()) - min(dealt.values()) <= 1
    numbers = collections.Counter(len(g) for g in plan)
    assert set(numbers) == {1, 2, 3, 4}


def test_instances_matches_thefolder_bytes(built):
    image, ids, classes = det_samples.instances(3, COUNT, SIZE, seed=0)
    written = np.asarray(Image.open(os.path.join(built, "images", "0003.png")))
    np.testing.assert_array_equal(image, written)
    assert ids.shape == (SIZE, SIZE) and ids.max() <= len(classes)
    assert all(1 <= c <= 4 for c in classes)


def test_arguments_and_existing_root(built, tmp_path):
    with pytest.raises(FileExistsError):
        det_samples.build(built, COUNT, SIZE)
    with pytest.raises(ValueError, match="count"):
        det_samples.build(str(tmp_path / "a"), 0, SIZE)
    with pytest.raises(ValueError, match="size"):
        det_samples.build(str(tmp_path / "b"), COUNT, 16)
    assert not os.listdir(tmp_path)


def test_missing_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=APT):
        det_samples.build(str(tmp_path / "set"), 4, SIZE)
    assert os.listdir(tmp_path) == []


def test_materialize_caches(tmp_path, monkeypatch):
    if not _has_fashion_mnist():
        pytest.skip(APT)
    monkeypatch.setenv("KERAS_FT_HOME", str(tmp_path))
    path = det_samples.materialize(4, SIZE)
    assert path == os.path.join(str(tmp_path), "samples", f"fashion_det_4_{SIZE}")
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temp left
    mtime = os.stat(os.path.join(path, "annotations.json")).st_mtime_ns
    assert det_samples.materialize(4, SIZE) == path
    assert os.stat(os.path.join(path, "annotations.json")).st_mtime_ns == mtime


# --------------------------------------------------------------------- coins


def test_coin_boxes_on_the_full_photo():
    from scipy import ndimage
    from skimage import data, filters, measure

    photo = data.coins()
    boxes = det_samples.coin_boxes()
    assert len(boxes) == 24
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        assert 0 <= x1 < x2 <= photo.shape[1] and 0 <= y1 < y2 <= photo.shape[0]
        assert 30 <= x2 - x1 <= 80 and 30 <= y2 - y1 <= 80  # a coin's size
        for other in boxes[i + 1:]:  # the coins lie apart
            assert min(x2, other[2]) <= max(x1, other[0]) or min(y2, other[3]) <= max(y1, other[1])
        # Checked on its own: around the box, the bright pixels (Otsu's
        # threshold of the window, holes filled) make one large region
        # whose bounds are the box's, within 3 px.
        pad = 4
        top, left = max(0, y1 - pad), max(0, x1 - pad)
        window = photo[top:y2 + pad, left:x2 + pad]
        bright = ndimage.binary_fill_holes(window > filters.threshold_otsu(window))
        regions = [r for r in measure.regionprops(measure.label(bright))
                   if r.area > 0.1 * (x2 - x1) * (y2 - y1)]
        assert len(regions) == 1, i
        ry1, rx1, ry2, rx2 = regions[0].bbox
        got = np.array([rx1 + left, ry1 + top, rx2 + left, ry2 + top])
        assert np.abs(got - np.array([x1, y1, x2, y2])).max() <= 3, i
        assert regions[0].area >= 0.6 * (x2 - x1) * (y2 - y1)


@pytest.fixture(scope="module")
def coins(tmp_path_factory):
    return det_samples.build_coins(
        str(tmp_path_factory.mktemp("coins") / "set"), COINS_COUNT, COINS_SIZE, seed=0)


def test_coins_layout_and_coco(coins):
    assert sorted(os.listdir(coins)) == ["train", "val"]
    train, val = _coco(os.path.join(coins, "train")), _coco(os.path.join(coins, "val"))
    assert (len(train["images"]), len(val["images"])) == (COINS_COUNT - 2, 2)
    for coco in (train, val):
        assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "coin")]
        assert coco["annotations"]


def test_coins_same_seed_same_bytes(coins, tmp_path):
    again = det_samples.build_coins(str(tmp_path / "again"), COINS_COUNT, COINS_SIZE, seed=0)
    other = det_samples.build_coins(str(tmp_path / "other"), COINS_COUNT, COINS_SIZE, seed=1)
    assert folder_bytes(again) == folder_bytes(coins)
    assert folder_bytes(other) != folder_bytes(coins)


def test_coins_crops_disjoint_and_boxes(coins):
    """Train crops lie in columns [0, 256), val crops in [256, 384); each
    image is its crop resized; its boxes are the coins at least 60% inside,
    clipped and scaled."""
    from skimage import data

    photo = data.coins()
    boxes = det_samples.coin_boxes()
    columns = {}
    for split, folder in enumerate(("train", "val")):
        root = os.path.join(coins, folder)
        coco = _coco(root)
        by_image = _by_image(coco)
        columns[folder] = set()
        for i, im in enumerate(coco["images"]):
            top, left, side = det_samples._crop(split, i, 0)
            assert 96 <= side <= 200 and 0 <= top and top + side <= photo.shape[0]
            columns[folder].update(range(left, left + side))
            crop = Image.fromarray(photo[top:top + side, left:left + side])
            expected = np.asarray(crop.resize((COINS_SIZE, COINS_SIZE), Image.BILINEAR))
            written = np.asarray(Image.open(os.path.join(root, "images", im["file_name"])))
            np.testing.assert_array_equal(written, np.repeat(expected[..., None], 3, axis=-1))
            scale = COINS_SIZE / side
            want = []
            for x1, y1, x2, y2 in boxes:
                cx1, cy1 = max(x1, left), max(y1, top)
                cx2, cy2 = min(x2, left + side), min(y2, top + side)
                inside = max(cx2 - cx1, 0) * max(cy2 - cy1, 0)
                if inside >= 0.6 * (x2 - x1) * (y2 - y1):
                    want.append([(cx1 - left) * scale, (cy1 - top) * scale,
                                 (cx2 - cx1) * scale, (cy2 - cy1) * scale])
            got = [a["bbox"] for a in by_image[i]]
            assert len(got) == len(want), (folder, i)
            np.testing.assert_allclose(got, np.reshape(want, (-1, 4)), atol=1e-3)
    assert max(columns["train"]) < 256 <= min(columns["val"])
    assert max(columns["val"]) < photo.shape[1]


def test_coins_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="count"):
        det_samples.build_coins(str(tmp_path / "a"), 1, COINS_SIZE)
    with pytest.raises(ValueError, match="size"):
        det_samples.build_coins(str(tmp_path / "b"), COINS_COUNT, 8)
    monkeypatch.setenv("KERAS_FT_HOME", str(tmp_path / "home"))
    path = det_samples.materialize_coins(4, 32)
    assert path == os.path.join(str(tmp_path / "home"), "samples", "coins_4_32")
    assert det_samples.materialize_coins(4, 32) == path
    with pytest.raises(FileExistsError):
        det_samples.build_coins(path, 4, 32)

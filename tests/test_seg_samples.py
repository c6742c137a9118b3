import os

import numpy as np
import pytest
from PIL import Image

from conftest import folder_bytes
from keras_ft import samples, seg_samples

COUNT, SIZE = 12, 64

needs_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(samples.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist",
)


def _read(root, i):
    image = Image.open(os.path.join(root, "images", f"{i:04d}.png"))
    mask = Image.open(os.path.join(root, "masks", f"{i:04d}.png"))
    assert (image.mode, mask.mode) == ("RGB", "L")
    return np.asarray(image), np.asarray(mask)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not os.path.exists(os.path.join(samples.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("apt-get install dataset-fashion-mnist")
    return seg_samples.build(str(tmp_path_factory.mktemp("seg") / "set"), COUNT, SIZE, seed=0)


def test_layout_and_classes(built):
    assert sorted(os.listdir(built)) == ["classes.txt", "images", "masks"]
    with open(os.path.join(built, "classes.txt")) as f:
        assert f.read().splitlines() == ["background", "trouser", "bag", "sneaker", "t_shirt"]
    names = [f"{i:04d}.png" for i in range(COUNT)]
    assert sorted(os.listdir(os.path.join(built, "images"))) == names
    assert sorted(os.listdir(os.path.join(built, "masks"))) == names
    seen = set()
    for i in range(COUNT):
        image, mask = _read(built, i)
        assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
        assert mask.max() <= 4 and mask.any()  # every sample holds a garment
        seen |= set(np.unique(mask).tolist())
    assert seen == {0, 1, 2, 3, 4}


def test_masks_mark_exactly_the_pasted_pixels(built):
    """Outside the mask the image is its background photo crop, untouched;
    inside, the garment's pixels replaced it."""
    for i in range(COUNT):
        image, mask = _read(built, i)
        back = seg_samples.background(i, SIZE, seed=0)
        assert back.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(image[mask == 0], back[mask == 0])
        changed = np.any(image != back, axis=-1)
        # A tinted garment pixel may equal the photo's by chance: rarely.
        assert changed[mask > 0].mean() > 0.95, i
        assert 0.01 < (mask > 0).mean() < 0.9


def test_colour_does_not_give_the_class(built):
    """Garments are tinted at random: within every class, pixels' hues vary."""
    chroma = {c: [] for c in range(1, 5)}
    for i in range(COUNT):
        image, mask = _read(built, i)
        rgb = image.astype(np.float64)
        rg = rgb[..., :2] / np.maximum(rgb.sum(-1, keepdims=True), 1)
        for c in chroma:
            chroma[c].append(rg[mask == c])
    for c, values in chroma.items():
        assert np.concatenate(values).std(0).min() > 0.02, c  # 0 if untinted


def test_class_balance_and_distinct_sources():
    plan = seg_samples._plan(400, seed=0)
    assert all(1 <= len(garments) <= 3 for garments in plan)
    flat = [g for garments in plan for g in garments]
    classes = np.array([c for c, _ in flat])
    # Dealt from a deck of 4: every 4 consecutive garments hold each class once.
    for start in range(0, len(classes) - 3, 4):
        assert sorted(classes[start:start + 4]) == [1, 2, 3, 4]
    assert len(set(flat)) == len(flat)  # no Fashion-MNIST image used twice


@needs_fashion_mnist
def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    again = folder_bytes(seg_samples.build(str(tmp_path / "again"), COUNT, SIZE, seed=0))
    assert again == folder_bytes(built)
    other = folder_bytes(seg_samples.build(str(tmp_path / "other"), COUNT, SIZE, seed=1))
    assert other.keys() == again.keys()
    assert sum(other[k] != again[k] for k in again if k.startswith("masks")) >= COUNT - 1
    assert sorted(os.listdir(tmp_path)) == ["again", "other"]  # no temp folder left


@needs_fashion_mnist
def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE), np.uint8)

    monkeypatch.setattr(seg_samples, "_sample", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        seg_samples.build(str(tmp_path / "set"), COUNT, SIZE)
    assert os.listdir(tmp_path) == []
    (tmp_path / "there").mkdir()
    with pytest.raises(FileExistsError):
        seg_samples.build(str(tmp_path / "there"), COUNT, SIZE)


@needs_fashion_mnist
def test_materialize_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_FT_HOME", str(tmp_path))
    path = seg_samples.materialize(3, 32)
    assert path == str(tmp_path / "samples" / "fashion_seg_3_32")
    assert _read(path, 2)[1].shape == (32, 32)
    monkeypatch.setattr(seg_samples, "build", lambda *a, **k: pytest.fail("rebuilt"))
    assert seg_samples.materialize(3, 32) == path
    assert os.listdir(tmp_path / "samples") == ["fashion_seg_3_32"]


def test_missing_fashion_mnist_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "FASHION_MNIST_DIR", str(tmp_path / "missing"))
    monkeypatch.setenv("KERAS_FT_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist") as e:
        seg_samples.materialize(4, 32)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "home" / "samples" / "fashion_seg_4_32")


@pytest.mark.parametrize("count, size, match", [
    (0, 96, "count must be 1 to 9999, not 0"),
    (10000, 96, "count must be 1 to 9999"),
    (4, 16, "size must be at least 24 px, not 16"),
])
def test_bad_arguments(tmp_path, count, size, match):
    with pytest.raises(ValueError, match=match):
        seg_samples.build(str(tmp_path / "set"), count, size)
    assert os.listdir(tmp_path) == []

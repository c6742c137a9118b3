"""Segmentation data: sources, the up-front pair checks, the split, the stream."""

import json
import os
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from keras_ft import augment, data, seg_data
from keras_ft.seg_data import SegSet


def _save(path, array, palette=False):
    """Writes `array` with PIL: uint8 [H, W] (mode L, or P with `palette`) or [H, W, 3]."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(np.asarray(array))
    if palette:
        image.putpalette([v for i in range(256) for v in (i, 255 - i, 3 * i % 256)])  # L -> P
    image.save(path)
    return str(path)


def _pair(k, size=(6, 9)):
    """Pair `k`: its own size (so a swapped mask fails the size check) and
    values, mask values 0..2 with one row of 255."""
    height, width = size[0] + k, size[1]
    rng = np.random.default_rng(k)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = ((np.arange(height * width).reshape(height, width) + k) % 3).astype(np.uint8)
    mask[0] = 255
    return image, mask


def _write_pairs(root, stems, exts=(".png",), palette=False):
    """`root/images/STEM.EXT` and `root/masks/STEM.png` for each stem; returns the masks."""
    masks = {}
    for k, stem in enumerate(stems):
        image, mask = _pair(k)
        _save(os.path.join(root, "images", stem + exts[k % len(exts)]), image)
        _save(os.path.join(root, "masks", stem + ".png"), mask, palette=palette and k % 2)
        masks[stem] = mask
    return masks


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


# ------------------------------------------------------------------ sources


def test_folder_pairs_by_stem_with_classes_txt(tmp_path):
    masks = _write_pairs(tmp_path, ["b", "a", "c", "d"], exts=(".jpg", ".png", ".bmp", ".JPEG"),
                         palette=True)
    (tmp_path / "images" / "notes.txt").write_text("not an image")  # ignored
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n\n")
    pairs, report = seg_data.load_seg_source(f"folder:{tmp_path}")
    assert [_stem(p) for p in pairs.images] == ["a", "b", "c", "d"]
    assert [_stem(p) for p in pairs.masks] == ["a", "b", "c", "d"]
    assert pairs.images[3].endswith("d.JPEG") and pairs.val_mask is None
    assert pairs.class_names == ["sky", "road", "car"]
    assert pairs.labels.tolist() == [0, 0, 0, 0] and pairs.labels.dtype == np.int32
    # Palette PNGs (b, d) are read as their indices, as gray ones (a, c) are.
    for i, path in enumerate(pairs.masks):
        np.testing.assert_array_equal(seg_data._decoded_mask(pairs, i), masks[_stem(path)])
    every = np.concatenate([m.ravel() for m in masks.values()])
    assert report.pairs == 4
    assert report.pixels == {name: int((every == c).sum()) for c, name in enumerate(pairs.class_names)}
    assert report.ignored_pixels == int((every == 255).sum()) == 4 * 9
    assert json.loads(report.to_json())["pixels"]["car"] == report.pixels["car"]
    assert report.lines()[0].startswith(f"Read 4 image/mask pairs in 3 classes from folder:{tmp_path}")


def test_folder_class_names_from_values_or_num_classes(tmp_path):
    _write_pairs(tmp_path, ["x", "y"])
    pairs, report = seg_data.load_seg_source(f"folder:{tmp_path}")
    assert pairs.class_names == ["0", "1", "2"]  # the largest value (2) + 1; 255 is no class
    pairs, report = seg_data.load_seg_source(f"folder:{tmp_path}", num_classes=5)
    assert pairs.class_names == ["0", "1", "2", "3", "4"]
    assert report.pixels["4"] == 0 and "No mask has a pixel of class 3, 4." in report.lines()


def test_folder_own_split(tmp_path):
    _write_pairs(tmp_path / "train", ["t1", "t2", "t3"])
    _write_pairs(tmp_path / "validation", ["v1", "v2"])
    pairs, _ = seg_data.load_seg_source(f"folder:{tmp_path}")
    assert [_stem(p) for p in pairs.images] == ["t1", "t2", "t3", "v1", "v2"]
    assert pairs.val_mask.tolist() == [False, False, False, True, True]
    spec = types.SimpleNamespace(val_fraction=0.5, train_per_class=0)
    train, val = seg_data.split_for_run(pairs, spec, seed=0)
    assert [_stem(p) for p in train.masks] == ["t1", "t2", "t3"]
    assert [_stem(p) for p in val.masks] == ["v1", "v2"]
    assert train.val_mask is None and val.val_mask is None


def test_csv_relative_and_absolute_paths(tmp_path):
    _write_pairs(tmp_path / "d", ["p", "q"])
    (tmp_path / "d" / "seg.csv").write_text(
        "id,mask,image\n"
        f"1,masks/q.png,images/q.png\n"
        f"2,{tmp_path}/d/masks/p.png,{tmp_path}/d/images/p.png\n"
    )
    pairs, report = seg_data.load_seg_source(f"csv:{tmp_path / 'd' / 'seg.csv'}")
    assert pairs.images == [str(tmp_path / "d/images/q.png"), str(tmp_path / "d/images/p.png")]
    assert pairs.masks == [str(tmp_path / "d/masks/q.png"), str(tmp_path / "d/masks/p.png")]
    assert report.pairs == 2 and pairs.class_names == ["0", "1", "2"]


class KerasFtSegShapes(tfds.core.GeneratorBasedBuilder):
    """A real TFDS segmentation dataset, prepared locally: 4 train, 2 validation."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(4)), "validation": self._generate_examples(range(4, 6))}

    def _generate_examples(self, indices):
        for k in indices:
            image, mask = _pair(k)
            yield k, {"image": image, "segmentation_mask": mask[..., None]}


def test_tfds_prepared_dataset_is_read_as_stored(tmp_path):
    data_dir = str(tmp_path)
    KerasFtSegShapes(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)  # no network
    )
    options = {"data_dir": data_dir, "val_split": "validation", "class_names": ("a", "b", "c")}
    pairs, report = seg_data.load_seg_source("tfds:keras_ft_seg_shapes", tfds_options=options)
    assert len(pairs) == 6 and pairs.val_mask.tolist() == [False] * 4 + [True] * 2
    assert pairs.class_names == ["a", "b", "c"] and pairs.names[4] == "keras_ft_seg_shapes validation #0"
    written = {_pair(k)[1].tobytes(): _pair(k)[0] for k in range(6)}
    for i in range(6):  # each mask with its own image
        image = written[seg_data._decoded_mask(pairs, i).tobytes()]
        np.testing.assert_array_equal(seg_data._decoded_image(pairs, i), image)
    with pytest.raises(ValueError, match=r"outside the classes 0\.\.1 \(num_classes=2\)"):
        seg_data.load_seg_source("tfds:keras_ft_seg_shapes", 2, {"data_dir": data_dir})
    with pytest.raises(ValueError, match="its masks name no classes; set num_classes"):
        seg_data.load_seg_source("tfds:keras_ft_seg_shapes", tfds_options={"data_dir": data_dir})


def test_tfds_not_prepared_offline_fails_at_once_in_one_line(tmp_path):
    data_dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(ValueError) as error:  # the real TFDS, no network
        seg_data.load_seg_source("tfds:oxford_iiit_pet", 4, {"data_dir": data_dir})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"TFDS dataset 'oxford_iiit_pet' is not prepared in {data_dir}")
    assert "`tfds build oxford_iiit_pet" in message and not os.path.exists(data_dir)


# ------------------------------------------------------------------ errors


def _break(root, problem):
    """Writes three good pairs under `root`, then breaks them by `problem`;
    returns `(source, the file the message must name, a part of the message)`."""
    _write_pairs(root, ["a", "b", "c"])
    images, masks = os.path.join(root, "images"), os.path.join(root, "masks")
    if problem == "image without mask":
        os.remove(os.path.join(masks, "b.png"))
        return os.path.join(images, "b.png"), "has no mask"
    if problem == "mask without image":
        os.remove(os.path.join(images, "c.png"))
        return os.path.join(masks, "c.png"), "has no image c.*"
    if problem == "sizes differ":
        _save(os.path.join(masks, "b.png"), np.zeros((6, 9), np.uint8))  # b is 7 x 9
        return os.path.join(masks, "b.png"), "is 9x7 (width x height) but its mask"
    if problem == "values outside the classes":
        with open(os.path.join(root, "classes.txt"), "w") as f:
            f.write("bg\nfg\n")
        return os.path.join(masks, "a.png"), "value(s) 2 outside the classes 0..1"
    if problem == "RGB mask":
        _save(os.path.join(masks, "b.png"), np.zeros((7, 9, 3), np.uint8))
        return os.path.join(masks, "b.png"), "mode 'RGB', not single-channel 8-bit: save the class indices"
    if problem == "16-bit mask":
        Image.fromarray(np.zeros((7, 9), np.uint16)).save(os.path.join(masks, "b.png"))
        return os.path.join(masks, "b.png"), "not single-channel 8-bit"
    if problem == "JPEG mask":
        _save(os.path.join(masks, "a.jpg"), np.zeros((6, 9), np.uint8))
        return os.path.join(masks, "a.jpg"), "is not a PNG: save masks as PNG"
    if problem == "unreadable image":
        with open(os.path.join(images, "c.png"), "w") as f:
            f.write("hello, I am not a picture\n")
        return os.path.join(images, "c.png"), "is not an image TensorFlow decodes (text)"
    if problem == "truncated image":
        with open(os.path.join(images, "c.png"), "r+b") as f:
            f.truncate(60)
        return os.path.join(images, "c.png"), "cannot be decoded"
    if problem == "two images, one stem":
        _save(os.path.join(images, "a.jpg"), _pair(0)[0])
        return os.path.join(images, "a.png"), "share the stem 'a'"
    raise AssertionError(problem)


@pytest.mark.parametrize("problem", [
    "image without mask", "mask without image", "sizes differ", "values outside the classes",
    "RGB mask", "16-bit mask", "JPEG mask", "unreadable image", "truncated image",
    "two images, one stem",
])
def test_each_bad_pair_is_one_line_naming_the_file(tmp_path, problem):
    file, expected = _break(str(tmp_path), problem)
    with pytest.raises(ValueError) as error:
        seg_data.load_seg_source(f"folder:{tmp_path}")
    message = str(error.value)
    assert "\n" not in message and file in message and expected in message, message


def test_all_pairs_are_checked_before_the_first_problem_is_raised(tmp_path):
    _write_pairs(tmp_path, ["a", "b", "c"])
    for stem in ("a", "c"):
        _save(tmp_path / "masks" / f"{stem}.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"masks/a\.png is 2x2: .* \(1 more pair\(s\) have problems too\.\)"):
        seg_data.load_seg_source(f"folder:{tmp_path}")


def test_source_level_errors_name_the_file(tmp_path):
    _write_pairs(tmp_path, ["a", "b"])
    (tmp_path / "classes.txt").write_text("bg\nfg\ncar\n")
    with pytest.raises(ValueError, match=r"num_classes=4 but classes\.txt names 3 classes"):
        seg_data.load_seg_source(f"folder:{tmp_path}", num_classes=4)
    (tmp_path / "classes.txt").write_text("bg\n\ncar\n")
    with pytest.raises(ValueError, match=r"classes\.txt line 2 is empty"):
        seg_data.load_seg_source(f"folder:{tmp_path}")
    (tmp_path / "seg.csv").write_text("image,label\nimages/a.png,masks/a.png\n")
    with pytest.raises(ValueError, match=r"seg\.csv line 1: .* needs one 'mask' column"):
        seg_data.load_seg_source(f"csv:{tmp_path / 'seg.csv'}")
    (tmp_path / "seg.csv").write_text("image,mask\nimages/a.png,masks/a.png\nimages/b.png,masks/z.png\n")
    with pytest.raises(ValueError, match=r"seg\.csv line 3: mask 'masks/z\.png' does not exist"):
        seg_data.load_seg_source(f"csv:{tmp_path / 'seg.csv'}")
    os.remove(tmp_path / "classes.txt")
    os.rename(tmp_path / "masks", tmp_path / "labels")
    with pytest.raises(ValueError, match=r"has no masks/ folder"):
        seg_data.load_seg_source(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match=r"Unknown segmentation data.source 'seg:x'. Use one of: folder:"):
        seg_data.load_seg_source("seg:x")


# ---------------------------------------------------------------- the split


def test_split_for_run_is_a_plain_seeded_split(tmp_path):
    n = 10
    pairs = SegSet(np.zeros((n, 4, 4, 3), np.uint8), np.zeros((n, 4, 4), np.uint8), ["bg", "fg", "x"])
    pairs.images[:, 0, 0, 0] = np.arange(n)  # which image is which
    spec = types.SimpleNamespace(val_fraction=0.3, train_per_class=0)
    train, val = seg_data.split_for_run(pairs, spec, seed=5)
    train_ids, val_ids = train.images[:, 0, 0, 0].tolist(), val.images[:, 0, 0, 0].tolist()
    assert len(val_ids) == 3 and sorted(train_ids + val_ids) == list(range(n))
    assert train.class_names == ["bg", "fg", "x"] and train.masks.shape == (7, 4, 4)
    # The split an ImageSet of one class gets from data.split_for_run, unchanged.
    one_class = data.ImageSet(np.arange(n), np.zeros(n, np.int32), ["all"])
    expected_train, expected_val = data.split_for_run(one_class, spec, seed=5)
    assert (train_ids, val_ids) == (expected_train.images.tolist(), expected_val.images.tolist())
    assert seg_data.split_for_run(pairs, spec, seed=6)[1].images[:, 0, 0, 0].tolist() != val_ids
    spec.train_per_class = 4  # for segmentation: training pairs in all
    few, _ = seg_data.split_for_run(pairs, spec, seed=5)
    assert len(few) == 4 and set(few.images[:, 0, 0, 0].tolist()) <= set(train_ids)


# ---------------------------------------------------------------- tf.data


def test_nearest_resize_keeps_only_the_masks_values():
    rng = np.random.default_rng(0)
    values = np.array([0, 3, 7, 255], np.uint8)
    mask = values[rng.integers(0, 4, (13, 20))]
    for size in (8, 32):
        resized = seg_data.resize_mask(mask, size).numpy()
        assert resized.shape == (size, size) and resized.dtype == np.uint8
        assert set(np.unique(resized)) <= set(values.tolist())
    # A bilinear resize of the same mask would blend classes: the check above has teeth.
    blended = tf.image.resize(mask[..., None].astype(np.float32), (8, 8)).numpy().round()
    assert not set(np.unique(blended)) <= set(values.tolist())
    # Halving a mask of 2 x 2 blocks keeps every block's value (pixel centres line up).
    blocks = values[rng.integers(0, 4, (4, 4))]
    np.testing.assert_array_equal(
        seg_data.resize_mask(np.kron(blocks, np.ones((2, 2), np.uint8)), 4).numpy(), blocks
    )
    # In the stream, for a pair whose image is another size.
    pairs = SegSet(np.zeros((1, 13, 20, 3), np.uint8), mask[None], ["0"] * 8)
    _, masks = next(iter(seg_data.make_seg_dataset(pairs, 8, 1, training=False)))
    assert masks.dtype == tf.int32 and set(np.unique(masks.numpy())) <= set(values.tolist())


def _aligned_pairs(n=8, size=8, seed=0):
    """Images whose mask is a function of the image: class = red channel > 127
    (red kept far from 127, so resizing to the same size cannot move it)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 100, (n, size, size, 3), dtype=np.uint8)
    images += (rng.random((n, size, size, 1)) < 0.5).astype(np.uint8) * 155
    masks = (images[..., 0] > 127).astype(np.uint8)
    return SegSet(images, masks, ["dark", "light"])


def _batches(ds, count):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]


def test_joint_flip_keeps_image_and_mask_aligned(monkeypatch):
    pairs, batch, seed = _aligned_pairs(), 4, 3
    batches = _batches(seg_data.make_seg_dataset(pairs, 8, batch, training=True, seed=seed), 6)
    for images, masks in batches:
        assert images.dtype == np.float32 and masks.dtype == np.int32
        np.testing.assert_array_equal(masks, images[..., 0] > 127)
    # Each image is flipped exactly as keras_ft.augment flips a classification
    # image at that (seed, position), and both outcomes occur.
    order = list(data.training_order(len(pairs), batch, seed).take(6 * batch).as_numpy_iterator())
    flipped = []
    for position, index in order:
        image = pairs.images[index].astype(np.float32)
        expected = tf.image.stateless_random_flip_left_right(
            image, augment.element_seed(seed, position)).numpy()
        got = batches[position // batch][0][position % batch]
        np.testing.assert_array_equal(got, expected)
        flipped.append(not np.array_equal(got, image))
    assert 0 < sum(flipped) < len(flipped)

    def image_only(image, mask, seed, position):  # a broken flip: the mask stays put
        return tf.image.stateless_random_flip_left_right(
            image, augment.element_seed(seed, position)), mask

    monkeypatch.setattr(seg_data, "_joint_flip", image_only)
    broken = _batches(seg_data.make_seg_dataset(pairs, 8, batch, training=True, seed=seed), 6)
    assert not all(np.array_equal(m, x[..., 0] > 127) for x, m in broken)


def test_stream_is_a_function_of_seed_and_position():
    pairs = _aligned_pairs(n=6)
    sized = seg_data.size_seg_all(pairs, 8)

    def stream(seed, skip=0):
        return seg_data.make_seg_dataset(pairs, 8, 2, True, seed, skip, sized=sized)

    first = _batches(stream(1), 7)  # 3 batches a pass: crosses two pass boundaries
    again = _batches(stream(1), 7)
    for (x, y), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    resumed = _batches(stream(1, skip=4), 3)
    for (x, y), (x2, y2) in zip(first[4:], resumed):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    other = _batches(stream(2), 7)
    assert not all(np.array_equal(x, x2) for (x, _), (x2, _) in zip(first, other))
    with pytest.raises(ValueError, match="batch_size 7 is more than the 6 training pairs"):
        seg_data.make_seg_dataset(pairs, 8, 7, True, sized=sized)


def test_evaluation_is_one_plain_pass_in_order():
    pairs = _aligned_pairs(n=5, size=12)
    batches = _batches(seg_data.make_seg_dataset(pairs, 8, 2, training=False), 10)
    assert [len(x) for x, _ in batches] == [2, 2, 1]
    images = np.concatenate([x for x, _ in batches])
    masks = np.concatenate([y for _, y in batches])
    expected = data.resize_image(pairs.images, 8).numpy()
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(masks, seg_data.resize_mask(pairs.masks, 8).numpy())
    assert images.shape == (5, 8, 8, 3) and masks.shape == (5, 8, 8) and masks.dtype == np.int32

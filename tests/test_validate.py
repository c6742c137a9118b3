import json
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from keras_ft import data, sources, validate


def _write(path, blob):
    with open(path, "wb") as f:
        f.write(blob)
    return str(path)


def _png(image):
    return tf.io.encode_png(image).numpy()


def _jpeg(image):
    return tf.io.encode_jpeg(image, quality=90).numpy()


def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(width, height):
    """A valid-looking PNG whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (16, 20, 3), dtype=np.uint8)

# file -> (bad kind, a piece of its reason); None: a good image.
BAD = {
    "cat/empty.png": ("empty", "empty file (0 bytes)"),
    "cat/cut.png": ("truncated", "truncated PNG"),
    "dog/cut.jpg": ("truncated", "truncated JPEG"),
    "dog/notes.jpg": ("not an image", "not an image (text)"),
    "dog/photo.jpg": ("unsupported format", "unsupported format WebP"),
    "cat/scan.png": ("unsupported format", "unsupported format TIFF"),
    "dog/bomb.png": ("too large", "too large: 100000x100000 = 10,000,000,000 pixels > max_pixels 50,000,000"),
}


@pytest.fixture
def messy(tmp_path):
    """2 classes of 4 good files, 4 converted ones and the 7 bad files of BAD."""
    root = write_image_folder(tmp_path, {"cat": 4, "dog": 4})
    _write(tmp_path / "cat/empty.png", b"")
    _write(tmp_path / "cat/cut.png", _png(RGB)[:200])
    _write(tmp_path / "dog/cut.jpg", _jpeg(RGB)[:-10])  # TF would decode most of it
    _write(tmp_path / "dog/notes.jpg", b"these are my notes, not a photo\n" * 20)
    _write(tmp_path / "dog/photo.jpg", b"RIFF" + struct.pack("<I", 300) + b"WEBPVP8 " + bytes(300))
    _write(tmp_path / "cat/scan.png", b"II*\x00" + bytes(300))
    _write(tmp_path / "dog/bomb.png", _png_bomb(100_000, 100_000))
    _write(tmp_path / "cat/gray.png", _png(RGB[..., :1]))
    _write(tmp_path / "cat/rgba.png", _png(np.concatenate([RGB, RGB[..., :1]], -1)))
    _write(tmp_path / "dog/deep.png", _png(RGB.astype(np.uint16) * 257))
    _write(tmp_path / "dog/gray.jpg", _jpeg(RGB[..., :1]))
    return root


def test_skip_lists_every_bad_file_and_keeps_the_rest(messy, monkeypatch):
    decoded = []
    decode = tf.io.decode_image
    monkeypatch.setattr(tf.io, "decode_image", lambda b, **kw: decoded.append(len(b)) or decode(b, **kw))
    images = sources.from_folder(messy)
    assert len(images) == 19

    kept, report = validate.scan(images)
    monkeypatch.undo()

    reasons = {validate._short(p): r for p, r in report.bad_files}
    assert sorted(reasons) == sorted(BAD)
    for name, (_, reason) in BAD.items():
        assert reason in reasons[name], (name, reasons[name])
    assert report.bad_by_kind == {
        "empty": 1, "truncated": 2, "not an image": 1, "unsupported format": 2, "too large": 1,
    }
    assert report.converted == {"grayscale": 2, "alpha": 1, "16-bit": 1}
    assert report.counts == {"cat": 6, "dog": 6}
    # The bomb, the fakes and the cut files are never decoded.
    assert len(decoded) == 12 and os.path.getsize(os.path.join(messy, "dog/bomb.png")) not in decoded

    # Exactly the good files are kept, with their labels, and all of them decode.
    bad_paths = {os.path.join(messy, n) for n in BAD}
    assert kept.images == [p for p in images.images if p not in bad_paths]
    assert kept.labels.tolist() == [0] * 6 + [1] * 6
    batches = list(data.make_dataset(kept, 16, 4, training=False))
    assert sum(len(y) for _, y in batches) == 12

    lines = report.lines()
    assert lines[0].startswith(
        "Scanned 19 files in 2 classes: 7 skipped (1 empty, 2 truncated, "
        "1 not an image, 2 unsupported format, 1 too large): "
    )
    assert "cat/cut.png (truncated PNG" in lines[0]
    assert sum(l.startswith("  skipped ") for l in lines) == 7
    assert "Images per class: cat 6, dog 6." in lines
    assert "Converted to 3-channel 8-bit when decoded: 2 grayscale, 1 alpha, 1 16-bit." in lines
    as_json = json.loads(report.to_json())
    assert {b["path"] for b in as_json["bad_files"]} == bad_paths
    assert as_json["counts"] == {"cat": 6, "dog": 6}


def test_unscanned_bad_files_crash_the_pipeline(messy):
    """Why the scan exists: without it the first bad file stops the epoch."""
    images = sources.from_folder(messy)
    cut = images.subset(np.asarray([images.images.index(os.path.join(messy, "cat/cut.png"))]))
    with pytest.raises(tf.errors.InvalidArgumentError):
        list(data.make_dataset(cut, 16, 1, training=False))


def test_fail_raises_one_line_naming_count_paths_and_the_way_out(messy):
    with pytest.raises(ValueError) as error:
        validate.scan(sources.from_folder(messy), policy="fail")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("7 bad image file(s) of 19: ")
    assert os.path.join(messy, "cat/cut.png") + " (truncated PNG" in message
    assert "and 4 more" in message
    assert "--config.data.bad_files=skip" in message


def test_clean_folder_passes_both_policies_unchanged(tmp_path):
    images = sources.from_folder(write_image_folder(tmp_path, {"a": 3, "b": 9}))
    for policy in validate.POLICIES:
        kept, report = validate.scan(images, policy=policy)
        assert kept is images and report.bad_files == [] and report.converted == {}
        assert report.lines() == [
            "Scanned 12 files in 2 classes: no bad files.",
            "Images per class: a 3, b 9 (largest/smallest 3.0x).",
        ]


def test_max_pixels_is_the_header_size(tmp_path):
    images = sources.from_folder(write_image_folder(tmp_path, {"a": 2, "b": 2}, size=20))
    kept, report = validate.scan(images, max_pixels=20 * 21)  # class b images are 20x21
    assert len(kept) == 4 and report.bad_files == []
    with pytest.raises(ValueError, match=r"too large: 21x20 = 420 pixels > max_pixels 419"):
        validate.scan(images, policy="fail", max_pixels=419)


def test_unknown_policy_lists_the_valid_ones(tmp_path):
    images = data.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    with pytest.raises(ValueError, match=r"Unknown bad-file policy 'drop'. Choose one of: skip, fail."):
        validate.scan(images, policy="drop")


@pytest.mark.parametrize(
    "labels, class_names, num_classes, message",
    [
        ([0, 0], ["cat"], None, r"single class \('cat'\)"),
        ([0, 1, 1], ["a", "b", "c"], None, r"Class 'c' has no usable images: no images"),
        ([0, 1, 5], ["a", "b", "c"], None, r"Labels must be in \[0, 3\) for 3 classes, got labels from 0 to 5"),
        ([0, 1, -1], ["a", "b"], None, r"got labels from -1 to 1"),
        ([0, 1, 2], ["a", "b", "c"], 4, r"num_classes=4 but the data has 3 classes \(a, b, c\)"),
    ],
)
def test_label_errors_name_the_class_or_numbers(labels, class_names, num_classes, message):
    images = data.ImageSet(np.zeros((len(labels), 4, 4, 3), np.uint8), np.asarray(labels, np.int32), class_names)
    with pytest.raises(ValueError, match=message):
        validate.scan(images, num_classes=num_classes)


def test_label_errors_come_before_reading_files(tmp_path):
    paths = [str(tmp_path / "missing.png")] * 2
    with pytest.raises(ValueError, match="single class"):
        validate.scan(data.ImageSet(paths, np.zeros(2, np.int32), ["only"]))


def test_class_left_empty_by_skipping_is_an_error_naming_it(tmp_path):
    root = write_image_folder(tmp_path, {"a": 3})
    os.makedirs(tmp_path / "b")
    _write(tmp_path / "b/x.jpg", b"")
    _write(tmp_path / "b/y.png", _png(RGB)[:100])
    with pytest.raises(ValueError, match=r"Class 'b' has no usable images: all 2 of its files are bad"):
        validate.scan(sources.from_folder(root))


def test_in_memory_arrays_get_the_label_checks_only():
    images = data.from_arrays(np.zeros((5, 4, 4, 3), np.uint8), [0, 0, 0, 0, 1], ["x", "y"])
    kept, report = validate.scan(images, num_classes=2)
    assert kept is images
    assert report.counts == {"x": 4, "y": 1} and report.bad_files == []
    assert "Images per class: x 4, y 1 (largest/smallest 4.0x)." in report.lines()


def test_class_weights_are_inverse_frequency_with_mean_one_per_image():
    labels = np.asarray([0, 0, 0, 1, 2, 2])
    weights = validate.class_weights(labels, 3)
    assert weights == pytest.approx({0: 6 / 9, 1: 2.0, 2: 1.0})
    assert np.mean([weights[l] for l in labels]) == pytest.approx(1.0)
    assert validate.class_weights(np.asarray([0, 1, 1, 0]), 2) == {0: 1.0, 1: 1.0}
    with pytest.raises(ValueError, match="Class 2 has no images"):
        validate.class_weights(np.asarray([0, 1]), 3)


def test_progress_is_logged(messy, monkeypatch):
    # Recorded at the call, not through logging handlers: absl's verbosity
    # depends on what ran before in the same test process.
    lines = []
    from keras_ft import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    monkeypatch.setattr(progress.logging, "info", lambda fmt, *args: lines.append(fmt % args))
    validate.scan(sources.from_folder(messy))
    assert any("Scanning images: 19/19 files" in line for line in lines), lines


def test_sound_header_but_undecodable_body_is_corrupt(tmp_path):
    root = write_image_folder(tmp_path, {"a": 2, "b": 2})
    ihdr = struct.pack(">IIBBBBB", 10, 10, 8, 2, 0, 0, 0)
    blob = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"garbage!") + _chunk(b"IEND", b"")
    _write(tmp_path / "a/broken.png", blob)
    kept, report = validate.scan(sources.from_folder(root))
    assert len(kept) == 4 and report.bad_by_kind == {"corrupt": 1}
    assert report.bad_files[0][1].startswith("corrupt PNG (cannot be decoded: ")

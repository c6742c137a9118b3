"""Hostile files: what the scan, the export and the legacy reader refuse.

Each test builds its hostile input by hand (a FIFO, a link to /dev/zero, a
link out of its class folder, a pixel bomb, a crafted PyTorch file) and
checks that it is refused by name, quickly, without a traceback. Every test
runs under `deadline`: a hang fails it instead of stalling the suite.
"""

import os
import pickle
import struct
import sys
import types
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from keras_ft import export, limits, sources, torch_legacy, validate
from runs import deadline


def scan(root, **kwargs):
    """`(report, {class/name: reason})` of a folder source, under a deadline."""
    with deadline():
        _, report = validate.scan(sources.from_folder(str(root)), **kwargs)
    return report, {os.path.relpath(p, root): r for p, r in report.bad_files}


@pytest.fixture
def folder(tmp_path):
    """Two classes of three good images, under tmp_path/data."""
    return write_image_folder(tmp_path / "data", {"cat": 3, "dog": 3})


# ------------------------------------------------------- not regular files


def test_fifo_named_jpg_is_a_bad_file_not_a_hang(folder):
    os.mkfifo(os.path.join(folder, "cat", "a.jpg"))
    report, bad = scan(folder)
    assert bad == {"cat/a.jpg": "not a regular file (FIFO)"}
    assert report.bad_by_kind == {"not a regular file": 1}


def test_link_to_dev_zero_is_refused_unread(folder):
    os.symlink("/dev/zero", os.path.join(folder, "dog", "z.jpg"))
    _, bad = scan(folder)
    assert bad == {"dog/z.jpg": "link leaving the data folder"}


def test_link_to_a_device_inside_a_csv_listing_is_not_a_regular_file(tmp_path, folder):
    # A CSV lists its files explicitly (links anywhere are followed), but
    # only regular files are ever opened.
    os.symlink("/dev/zero", tmp_path / "z.jpg")
    rows = [f"{os.path.join(folder, c, '000.png')},{c}" for c in ("cat", "dog")]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\nz.jpg,cat\n")
    with deadline():
        _, report = validate.scan(sources.from_csv(str(tmp_path / "list.csv")))
    assert report.bad_files == [(str(tmp_path / "z.jpg"), "not a regular file (character device, through a link)")]


def test_file_over_the_size_cap_is_not_read(folder, monkeypatch):
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    big = os.path.join(folder, "cat", "big.png")
    with open(big, "wb") as f:
        f.truncate(200_000)
    _, bad = scan(folder, max_file_bytes=100_000)
    assert bad == {"cat/big.png": "too large: 200,000 bytes > max_file_bytes 100,000"}
    assert all(n <= validate.PREFIX_BYTES for n in reads)


# ------------------------------------------------------------------- links


def test_link_to_the_data_root_gives_no_image_a_second_label(folder):
    os.symlink("..", os.path.join(folder, "cat", "up"))
    report, bad = scan(folder)
    assert report.counts == {"cat": 3, "dog": 3}  # the dog images counted once, as dog
    assert bad == {"cat/up": "not a regular file (folder, through a link)"}


def test_file_linked_into_another_class_is_refused_under_both(folder):
    os.symlink(os.path.join("..", "dog", "000.png"), os.path.join(folder, "cat", "x.png"))
    report, bad = scan(folder)
    assert bad == {
        "cat/x.png": "one file under 2 classes (cat, dog), through links",
        "dog/000.png": "one file under 2 classes (cat, dog), through links",
    }
    assert report.counts == {"cat": 3, "dog": 2}


def test_links_inside_the_data_root_are_followed(folder):
    os.makedirs(os.path.join(folder, "cat", "more"))
    os.rename(os.path.join(folder, "cat", "000.png"), os.path.join(folder, "cat", "more", "0.png"))
    os.symlink("more", os.path.join(folder, "cat", "also"))  # the same folder twice
    os.symlink(os.path.join("more", "0.png"), os.path.join(folder, "cat", "z.png"))
    report, bad = scan(folder)
    assert report.counts == {"cat": 3, "dog": 3}
    assert bad == {  # listed, not read twice
        "cat/also": "not a regular file (folder, through a link)",
        "cat/z.png": "the same file as cat/more/0.png, through a link",
    }


def test_link_leaving_the_root_and_link_loops_are_bad_files(tmp_path, folder):
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n private")
    os.symlink(str(tmp_path / "secret.png"), os.path.join(folder, "cat", "s.png"))
    os.symlink("loop.png", os.path.join(folder, "dog", "loop.png"))
    os.symlink(".", os.path.join(folder, "dog", "self"))
    _, bad = scan(folder)
    assert bad == {
        "cat/s.png": "link leaving the data folder",
        "dog/loop.png": "link loop",
        "dog/self": "not a regular file (folder, through a link)",
    }


# ----------------------------------------------------------- what is named


@pytest.mark.parametrize("blob, kind", [
    (b"<!DOCTYPE html><html><body>login: admin</body></html>", "HTML"),
    (b"\x7fELF\x02\x01\x01" + bytes(100), "ELF executable"),
    (b"root:x:0:0:root:/root:/bin/bash\n", "text"),
    (b"%PDF-1.7\n", "PDF"),
    (bytes(range(256)), "unknown binary data"),
])
def test_reasons_name_the_type_never_the_content(folder, blob, kind):
    with open(os.path.join(folder, "dog", "x.jpg"), "wb") as f:
        f.write(blob)
    report, bad = scan(folder)
    assert bad == {"dog/x.jpg": f"not an image ({kind})"}
    assert blob[:6].decode("latin-1") not in report.to_json()


# ------------------------------------------------------------ pixel bombs


def gif(width, height, frames):
    """A GIF whose header and each of `frames` frames claim width x height."""
    frame = (b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
             + b"\x02" + b"\x02\x4c\x01\x00")  # 2 LZW bytes: clear code, end code
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes(6)
            + frame * frames + b"\x3b")


def test_pixel_cap_counts_every_frame(folder):
    with open(os.path.join(folder, "cat", "anim.gif"), "wb") as f:
        f.write(gif(7000, 7000, 40))
    _, bad = scan(folder)
    assert bad == {"cat/anim.gif": "too large: 7000x7000 GIF whose frames total "
                                   "1,960,000,000 pixels > max_pixels 50,000,000"}


@pytest.mark.parametrize("frames", [1, 3])
def test_pixel_count_in_graph_matches_the_frames(frames):
    assert int(limits.decoded_pixels(tf.constant(gif(30, 20, frames)))) == frames * 600
    png = tf.io.encode_png(np.zeros((20, 30, 3), np.uint8))
    assert int(limits.decoded_pixels(png)) == 600
    jpeg = tf.io.encode_jpeg(np.zeros((20, 30, 3), np.uint8))
    assert int(limits.decoded_pixels(jpeg)) == 600


def png_bomb(side):
    """A real grayscale PNG of side x side zeros: ~100 KB for 10000 x 10000."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    raw = zlib.compressobj(9)
    idat = b"".join(raw.compress(bytes(side + 1)) for _ in range(side)) + raw.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny model exported with both serving signatures."""
    model = keras.Sequential([
        keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)
    ])
    path = str(tmp_path_factory.mktemp("export") / "export")
    export.export_saved_model(model, path, ["a", "b"], 16)
    return path


def test_export_refuses_a_pixel_bomb_and_keeps_serving(served):
    loaded = tf.saved_model.load(served)
    classify = loaded.signatures["serving_default"]
    with deadline(60), pytest.raises(tf.errors.InvalidArgumentError, match="max_pixels"):
        classify(images=tf.constant([png_bomb(10_000)]))
    good = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8))
    assert classify(images=tf.stack([good]))["probabilities"].shape == (1, 2)


def test_predict_skips_and_lists_the_bomb_fifo_and_link(served, tmp_path, capsys):
    from absl import flags
    from absl.testing import flagsaver
    from launch import predict

    good = tmp_path / "good.png"
    good.write_bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
    (tmp_path / "bomb.png").write_bytes(png_bomb(10_000))
    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    files = [str(tmp_path / n) for n in ("good.png", "bomb.png", "fifo.jpg", "zero.jpg")]
    if not flags.FLAGS.is_parsed():  # other launch scripts' required flags: not here
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(export=served), deadline(60):
        assert predict.main(["predict", *files]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(files[0] + "\n")
    assert err.splitlines() == [  # unread files first, then what the export refused
        f"error: skipped {files[2]}: not a regular file (FIFO).",
        f"error: skipped {files[3]}: not a regular file (character device, through a link).",
        f"error: skipped {files[1]}: too large (more than max_pixels 50,000,000 decoded pixels).",
    ]


# ------------------------------------------------------- legacy PyTorch


def crafted_pt(path, size, stride, numel=1, offset=0, declared=None):
    """A legacy .pt file of one float tensor with the given geometry, on a
    storage of `numel` floats that the pickle says has `declared`."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        pass

    FloatStorage.__module__, _rebuild_tensor_v2.__module__ = "torch", "torch._utils"
    FloatStorage.__qualname__, _rebuild_tensor_v2.__qualname__ = "FloatStorage", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2

    storage = FloatStorage()

    class Tensor:
        def __reduce__(self):
            return _rebuild_tensor_v2, (storage, offset, size, stride, False, None)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", FloatStorage, "0", "cpu", declared or numel) if obj is storage else None

    saved = dict(sys.modules)
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        with open(path, "wb") as f:
            for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
                pickle.dump(obj, f, protocol=2)
            Pickler(f, protocol=2).dump({"w": Tensor()})
            pickle.dump(["0"], f, protocol=2)
            f.write(struct.pack("<q", numel) + bytes(4 * numel))
    finally:
        sys.modules.clear()
        sys.modules.update(saved)
    return str(path)


def test_legacy_reader_reads_a_sound_crafted_file(tmp_path):
    state = torch_legacy.load_state_dict(crafted_pt(tmp_path / "ok.pt", (2, 3), (3, 1), numel=6))
    assert state["w"].shape == (2, 3)


@pytest.mark.parametrize("size, stride, offset, declared, problem", [
    ((65536, 65536, 1024), (0, 0, 0), 0, None, "its tensors claim 17592186044416 bytes, more than"),
    ((4, 4), (1, 0), 0, None, "16 elements; its storage holds 1"),
    ((1,), (1,), -1, None, "storage offset -1"),
    ((1,), (1,), 0, 2**40, "storage '0' of 1099511627776 elements"),
])
def test_legacy_reader_checks_sizes_before_allocating(tmp_path, size, stride, offset, declared, problem):
    path = crafted_pt(tmp_path / "bad.pt", size, stride, offset=offset, declared=declared)
    with deadline(), pytest.raises(ValueError) as error:
        torch_legacy.load_state_dict(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


# ------------------------------------------------------------------- EXIF


def exif_jpeg(orientation):
    """A JPEG with an APP1 EXIF segment holding only an orientation tag."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    body = b"Exif\x00\x00" + tiff
    jpeg = tf.io.encode_jpeg(np.zeros((12, 10, 3), np.uint8)).numpy()
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def test_exif_orientation_is_counted_not_silent(folder):
    with open(os.path.join(folder, "cat", "turned.jpg"), "wb") as f:
        f.write(exif_jpeg(6))  # "rotate 90° clockwise to display"
    with open(os.path.join(folder, "dog", "upright.jpg"), "wb") as f:
        f.write(exif_jpeg(1))
    report, bad = scan(folder)
    assert bad == {} and report.converted == {"EXIF-rotated": 1}
    assert report.lines()[-1].startswith("1 JPEG(s) have an EXIF orientation, ignored here")
    # Decoded as stored (10 wide, 12 high), as training, evaluation and serving do.
    image = tf.io.decode_image(exif_jpeg(6), channels=3)
    assert image.shape == (12, 10, 3)


def test_training_stream_refuses_a_bomb_swapped_in_after_the_scan(folder):
    from keras_ft import data

    images, _ = validate.scan(sources.from_folder(folder))
    with open(images.images[0], "wb") as f:  # replaced after the scan
        f.write(png_bomb(10_000))
    with deadline(60), pytest.raises(tf.errors.InvalidArgumentError, match="max_pixels"):
        list(data.make_dataset(images, 16, 2, training=False))

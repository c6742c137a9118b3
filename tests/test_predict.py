"""`launch.predict` over folders and globs, to CSV and JSON: rows, skips, errors, progress."""

import csv
import json
import os
import pty
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, assert_depends_on_images, tiny_classifier, write_image_folder
from keras_ft import export

CLASSES = ["a", "b", "c"]


def run_predict(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "launch.predict", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 32 px random-init MobileNetV2 over classes a, b, c, exported once."""
    path = str(tmp_path_factory.mktemp("predict") / "export")
    export.export_saved_model(tiny_classifier(3, class_names=CLASSES), path, CLASSES, 32)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """`(root, good files, {bad file: reason})`: images in nested folders, and
    files that cannot be classified among them."""
    root = tmp_path_factory.mktemp("photos")
    write_image_folder(root / "set1", {"dark": 3, "light": 3}, seed=1)
    write_image_folder(root / "set2" / "deep", {"mid": 4}, seed=2)
    shutil.copy(root / "set1" / "dark" / "001.jpg", root / "set2" / "deep" / "UPPER.JPG")
    (root / "readme.txt").write_text("not an image, and no image extension: ignored")
    png = (root / "set1" / "light" / "000.png").read_bytes()
    bad = {
        root / "corrupt.jpg": "cannot decode: a corrupt or truncated JPEG",
        root / "set1" / "empty.png": "empty file (0 bytes)",
        root / "set1" / "light" / "truncated.png": "cannot decode: a corrupt or truncated PNG",
        root / "set2" / "notes.png": "cannot decode: not a JPEG, PNG, BMP or GIF image",
        root / "pipe.jpg": "not a regular file (FIFO)",
    }
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "set1" / "empty.png").write_bytes(b"")
    (root / "set1" / "light" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "set2" / "notes.png").write_text("a text file named .png\n")
    os.mkfifo(root / "pipe.jpg")
    good = sorted(str(p) for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in (".jpg", ".png") and p not in bad)
    assert len(good) == 11
    return root, good, {str(path): reason for path, reason in bad.items()}


def served_probabilities(export_dir, files):
    """What `serving_default` gives for the bytes of `files`, in one call."""
    classify = tf.saved_model.load(export_dir).signatures["serving_default"]
    blobs = [open(f, "rb").read() for f in files]
    return classify(images=tf.constant(blobs))["probabilities"].numpy()


def test_csv_over_nested_folders(exported, photos, tmp_path):
    root, good, bad = photos
    out = tmp_path / "preds.csv"
    # Batches of 4: several, the last one partial, some holding bad files.
    result = run_predict(f"--export={exported}", root, f"--output={out}", "--top_k=3",
                         "--batch_size=4")
    assert result.returncode == 2, result.stderr[-3000:]  # files were skipped
    assert sorted(error_lines(result)) == sorted(
        f"error: skipped {path}: {reason}." for path, reason in bad.items())
    assert "Classified 11 of 16 files in " in result.stderr
    assert f"images/s); 5 skipped. Wrote {out}." in result.stderr
    assert "━" not in result.stderr and "images/s:" not in result.stderr  # a pipe: no bar
    assert os.listdir(tmp_path) == ["preds.csv"]  # no temporary file left

    with open(out, newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["path", "top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob"]
    assert [row[0] for row in rows] == good  # each good file once, in sorted order
    names = [row[1::2] for row in rows]
    probabilities = np.array([row[2::2] for row in rows], np.float64)
    assert all(sorted(n) == CLASSES for n in names)
    assert np.all(np.diff(probabilities, axis=1) <= 0)  # most probable first
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    expected = served_probabilities(exported, good)
    assert_depends_on_images(expected, at_least=0.01)
    by_class = np.array([[p[n.index(c)] for c in CLASSES] for n, p in zip(names, probabilities)])
    np.testing.assert_allclose(by_class, expected, atol=1e-6)


def test_json_over_a_glob(exported, photos, tmp_path):
    root, good, bad = photos
    out = tmp_path / "preds.json"
    pngs = [f for f in good if f.endswith(".png")]
    # Not expanded by a shell: predict expands it; a file also named on its own counts once.
    result = run_predict(f"--export={exported}", f"{root}/**/*.png", pngs[0], f"--output={out}",
                         "--top_k=2")
    assert result.returncode == 2, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert set(document) == {"predictions", "skipped", "images_per_sec"}
    assert [p["path"] for p in document["predictions"]] == pngs
    skipped = {s["path"]: s["reason"] for s in document["skipped"]}
    assert skipped == {path: reason for path, reason in bad.items() if path.endswith(".png")}
    assert document["images_per_sec"] > 0
    expected = served_probabilities(exported, pngs)
    for prediction, row in zip(document["predictions"], expected):
        top = prediction["top"]
        assert [t["class"] for t in top] == [CLASSES[c] for c in np.argsort(-row)[:2]]
        np.testing.assert_allclose([t["probability"] for t in top], np.sort(row)[::-1][:2],
                                   atol=1e-6)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty folder", "no image files in {empty} (looked for .jpg, .jpeg, .png, .bmp, .gif)."),
        ("glob matching nothing", "no image files match {empty}/*.jpg (looked for"),
        ("output in a missing folder", "folder {tmp}/missing does not exist; create it"),
        ("output is a folder", "--output={tmp} is a folder; give a file path such as"),
        ("top_k 0", "--top_k=0: give 1 or more."),
        ("batch_size 0", "--batch_size=0: give 1 or more."),
        ("unknown format", "unknown --format=xml; choose one of: csv, json, text."),
        ("output extension", "cannot tell the format of --output={tmp}/p.dat"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, message, exported, photos,
                                                          tmp_path):
    root = photos[0]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    out = f"--output={tmp_path}/p.csv"
    args = {
        "empty folder": [empty, out],
        "glob matching nothing": [f"{empty}/*.jpg", out],
        "output in a missing folder": [root, f"--output={tmp_path}/missing/p.csv"],
        "output is a folder": [root, f"--output={tmp_path}"],
        "top_k 0": [root, out, "--top_k=0"],
        "batch_size 0": [root, out, "--batch_size=0"],
        "unknown format": [root, out, "--format=xml"],
        "output extension": [root, f"--output={tmp_path}/p.dat"],
    }[case]
    result = run_predict(f"--export={exported}", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and message.format(empty=empty, tmp=tmp_path) in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # nothing written, not even a temporary


def test_output_without_permission_is_one_line(exported, photos, tmp_path):
    if os.geteuid() == 0:  # root writes into any folder, but not into sysfs
        locked = "/sys"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    result = run_predict(f"--export={exported}", photos[0], f"--output={locked}/p.csv")
    assert result.returncode == 2
    assert error_lines(result) == [f"error: cannot write --output={locked}/p.csv: Permission "
                                   f"denied in {locked}; choose a folder you can write to."]


def test_progress_bar_on_a_terminal(exported, photos, tmp_path):
    root, good, _ = photos
    deep = [f for f in good if "/set2/deep/" in f]
    master, slave = pty.openpty()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.predict", f"--export={exported}", root / "set2" / "deep",
         f"--output={tmp_path}/p.csv", "--batch_size=2"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
    )
    os.close(slave)
    shown = b""
    try:
        while chunk := os.read(master, 65536):
            shown += chunk
    except OSError:  # EIO: the process closed the terminal
        pass
    finally:
        os.close(master)
    assert process.wait(timeout=300) == 0, shown.decode(errors="replace")[-3000:]
    text = shown.decode(errors="replace")
    assert "━" in text and "images/s:" in text and f"{len(deep)}/{len(deep)}" in text, text[-3000:]
    with open(tmp_path / "p.csv", newline="") as f:
        assert [row[0] for row in list(csv.reader(f))[1:]] == deep

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import REPO, run_train, write_image_folder
from keras_ft import data, sources, validate, workdir as workdir_lib
from keras_ft.tasks.image_classification import load_splits
from runs import start_train, tiny_config, train_error

FLOWERS = ["dandelion", "daisy", "tulips", "sunflowers", "roses"]  # tf_flowers' ClassLabel order


def _relative(images, root):
    return [os.path.relpath(p, root) for p in images.images]


# ------------------------------------------------------------------ folders


def test_folder_labels_and_class_names(tmp_path):
    root = write_image_folder(tmp_path, {"dog": 4, "cat": 3})
    (tmp_path / "dog" / "readme.txt").write_text("not an image")
    images = sources.load_source(f"folder:{root}")
    assert images.class_names == ["cat", "dog"]  # sorted, whatever the order written
    assert images.labels.tolist() == [0] * 3 + [1] * 4
    assert images.kind == data.FILES and images.val_mask is None


def test_nested_folders_are_read_at_any_depth_in_sorted_order(tmp_path):
    root = write_image_folder(tmp_path, {"a": 2, "b": 1})
    write_image_folder(tmp_path / "a" / "2019", {"x": 1, "y": 2})  # a/2019/x/, a/2019/y/
    write_image_folder(tmp_path / "b" / ".ipynb_checkpoints", {"copies": 2})  # hidden: skipped
    (tmp_path / "b" / ".hidden.png").write_bytes((tmp_path / "b" / "000.png").read_bytes())
    os.symlink(tmp_path / "a", tmp_path / "a" / "2019" / "loop")  # a cycle: each file once
    images = sources.from_folder(root)
    assert _relative(images, root) == [
        "a/000.png", "a/001.jpg", "a/2019/loop", "a/2019/x/000.png", "a/2019/y/000.png",
        "a/2019/y/001.jpg", "b/000.png",
    ]
    assert images.labels.tolist() == [0, 0, 0, 0, 0, 0, 1]
    # The loop is not followed, and the scan lists it as a bad file.
    _, report = validate.scan(images)
    assert report.bad_files == [(str(tmp_path / "a/2019/loop"), "not a regular file (folder, through a link)")]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"a": 3, "b": 0}, r"Class folder '.*/b' has no image files"),
        ({"a": 3}, "has 1 class sub-folder.*at least 2"),
        ({"a": 3, ".git": 2}, "has 1 class sub-folder"),  # hidden folders are not classes
    ],
)
def test_bad_folders_fail_naming_the_problem(tmp_path, layout, message):
    root = write_image_folder(tmp_path, layout)
    with pytest.raises(ValueError, match=message):
        sources.from_folder(root)


def test_missing_folder_and_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sources.load_source(f"folder:{tmp_path}/nope")
    with pytest.raises(ValueError, match=r"Unknown data.source 'ftp://x'. Use one of: "
                       r"folder:..., csv:..., tfds:..., sample:..."):
        sources.load_source("ftp://x")


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_train_and_val_folders_are_the_split(tmp_path, val_name):
    write_image_folder(tmp_path / "train", {"cat": 5, "dog": 6})
    write_image_folder(tmp_path / val_name, {"cat": 2, "dog": 1}, seed=1)
    write_image_folder(tmp_path / "test", {"cat": 1, "dog": 1})  # not used
    images = sources.from_folder(str(tmp_path))
    assert images.class_names == ["cat", "dog"]
    assert images.val_mask.tolist() == [False] * 11 + [True] * 3
    # Every entry point splits the same way: by folder, whatever the seed.
    for seed in (0, 1):
        _, train, val, _ = load_splits(
            {"source": f"folder:{tmp_path}", "val_fraction": 0.5}, seed
        )
        assert {p.split(os.sep)[-3] for p in train.images} == {"train"}
        assert _relative(val, tmp_path) == [
            f"{val_name}/cat/000.png", f"{val_name}/cat/001.jpg", f"{val_name}/dog/000.png",
        ]
        assert train.labels.tolist() == [0] * 5 + [1] * 6 and val.labels.tolist() == [0, 0, 1]


@pytest.mark.parametrize(
    "train, val, message",
    [
        ({"cat": 2, "dog": 2}, {"cat": 1}, r"Class folder 'dog' is in .*/train but not in .*/val: "
         "the training and validation folders need the same class sub-folders"),
        ({"cat": 2, "dog": 2}, {"cat": 1, "dog": 1, "eel": 1}, r"Class folder 'eel' is in .*/val but not in .*/train"),
        ({"cat": 2, "dog": 2}, None, r"has a train/ folder and no val/ or validation/ folder.*"
         r"point data.source at .*/train to split that by seed"),
    ],
)
def test_train_and_val_folders_must_agree(tmp_path, train, val, message):
    write_image_folder(tmp_path / "train", train)
    if val is not None:
        write_image_folder(tmp_path / "val", val)
    with pytest.raises(ValueError, match=message):
        sources.from_folder(str(tmp_path))


def test_both_val_and_validation_folders_is_ambiguous(tmp_path):
    for name in ("train", "val", "validation"):
        write_image_folder(tmp_path / name, {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match="both val/ and validation/"):
        sources.from_folder(str(tmp_path))


# ---------------------------------------------------------------------- CSV


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Image files in one flat folder: cat 000..003, dog 000..003."""
    root = tmp_path_factory.mktemp("pictures")
    write_image_folder(root, {"cat": 4, "dog": 4})
    return root


def _csv(path, text):
    path.write_text(text)
    return str(path)


def test_csv_with_class_names_relative_and_absolute_paths(pictures):
    text = (
        "\ufeffid,label,path\n"  # a byte-order mark, columns in any order, an extra column
        f"1, dog ,dog/000.png\n"
        f"2,cat,{pictures}/cat/001.jpg\n"
        "\n"
        '3,"cat","cat/000.png"\n'
        "4,dog,./dog/001.jpg\n"
    )
    images = sources.load_source(f"csv:{_csv(pictures / 'labels.csv', text)}")
    assert images.class_names == ["cat", "dog"]
    assert images.labels.tolist() == [1, 0, 0, 1]
    assert _relative(images, pictures) == ["dog/000.png", "cat/001.jpg", "cat/000.png", "dog/001.jpg"]
    kept, report = validate.scan(images, policy="fail")
    assert kept is images and report.counts == {"cat": 2, "dog": 2}


def test_csv_with_integer_labels(pictures, tmp_path):
    rows = "".join(f"{pictures}/{c}/00{i}.png,{label}\n" for i in (0, 2) for c, label in (("cat", 1), ("dog", 0)))
    path = _csv(tmp_path / "ints.csv", "path,label\n" + rows)
    images = sources.from_csv(path)
    assert images.class_names == ["0", "1"] and images.labels.tolist() == [1, 0, 1, 0]
    assert sources.from_csv(path, num_classes=2).class_names == ["0", "1"]
    with pytest.raises(ValueError, match=rf"{path}: no row has label 2, but data.num_classes=3 makes the "
                       r"classes 0..2; every class needs examples"):
        sources.from_csv(path, num_classes=3)
    with pytest.raises(ValueError, match=rf"{path} line 2: label 1 is out of range \(data.num_classes=1 "
                       r"allows 0..0\); fix the label or data.num_classes"):
        sources.from_csv(path, num_classes=1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"line 1: no header; the first line must name the columns, e.g. `path,label`"),
        ("file,label\ncat/000.png,cat\n", r"line 1: no 'path' column in the header 'file,label'"),
        ("path,class\ncat/000.png,cat\n", r"line 1: no 'label' column in the header 'path,class'"),
        ("path,label,label\ncat/000.png,cat,cat\n", r"line 1: more than one 'label' column"),
        ("path,label\n", r"has a header but no rows: add one `path,label` line per image"),
        ("path,label\ncat/000.png,cat\ndog/000.png,\n", r"line 3: empty label for 'dog/000.png'; give every image its class"),
        ("path,label\ncat/000.png,cat\n ,dog\n", r"line 3: empty path"),
        ("path,label\ncat/000.png,cat\ndog/a,b.png,dog\n", r"line 3: 3 field\(s\) but the header has 2; quote fields that contain commas"),
        ("path,label\ncat/000.png,cat\ncat/001.jpg,cat\n", r": every row has the label 'cat'; a classifier needs at least 2 classes"),
        ("path,label\ncat/000.png,cat\ndog/000.png,1\n", r": line 3 has the integer label '1' but line 2 the class name 'cat'; use class names"),
        ("path,label\ncat/000.png,0\ndog/000.png,-1\n", r"line 3: label -1 is out of range \(integer labels start at 0\); fix the label\."),
        ("path,label\ncat/000.png,0\ndog/000.png,2\n", r": no row has label 1, but the largest label makes the classes 0..2"),
        ("path,label\ncat/000.png,cat\ndog/000.png,dog\n./cat/000.png,dog\n", r"lines 2 and 4 both list './cat/000.png': list each image once"),
        ("path,label\nkitten/000.png,cat\ndog/009.png,dog\n", r": none of its 2 image paths exists \(line 2: 'kitten/000.png' -> "
         r".*/kitten/000.png\); relative paths are read from the CSV's folder"),
        ('path,label\n"cat/000.png,cat\n', r"line 2: unexpected end of data; check its quotes"),
    ],
)
def test_csv_errors_name_the_file_line_and_fix(pictures, text, message):
    path = _csv(pictures / "bad.csv", text)
    with pytest.raises(ValueError) as error:
        sources.load_source(f"csv:{path}")
    text = str(error.value)
    assert "\n" not in text and text.startswith(path), text
    assert re.search(message, text), text


def test_csv_class_count_must_match_num_classes(pictures):
    path = _csv(pictures / "names.csv", "path,label\ncat/000.png,cat\ndog/000.png,dog\n")
    with pytest.raises(ValueError, match=rf"{path}: data.num_classes=3 but its labels name 2 classes \(cat, dog\)"):
        sources.from_csv(path, num_classes=3)
    with pytest.raises(ValueError, match=r"CSV file '.*/nope.csv' does not exist"):
        sources.load_source(f"csv:{pictures}/nope.csv")


def test_csv_missing_files_are_bad_files_under_the_policy(pictures):
    rows = "".join(f"{c}/00{i}.{'png' if i % 2 == 0 else 'jpg'},{c}\n" for c in ("cat", "dog") for i in range(4))
    path = _csv(pictures / "gone.csv", "path,label\n" + rows + "cat/deleted.png,cat\n")
    images = sources.from_csv(path)
    kept, report = validate.scan(images, policy="skip")
    missing = os.path.join(str(pictures), "cat", "deleted.png")
    assert len(kept) == 8 and report.bad_files == [(missing, "unreadable (No such file or directory)")]
    with pytest.raises(ValueError, match=rf"1 bad image file\(s\) of 9: {missing} \(unreadable"):
        validate.scan(images, policy="fail")


# --------------------------------------------------------------------- TFDS


def _shape_image(i):
    """Image `i` of KerasFtShapes: its own size and colour."""
    image = np.zeros((6 + i % 5, 9 + i % 3, 3), np.uint8)
    image[..., i % 3] = 20 * i
    return image


class KerasFtShapes(tfds.core.GeneratorBasedBuilder):
    """A real TFDS dataset, prepared locally: 8 train and 4 validation images."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["zebra", "ant"]),  # not sorted
            }),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(range(8)),
            "validation": self._generate_examples(range(8, 12)),
        }

    def _generate_examples(self, indices):
        for i in indices:
            yield i, {"image": _shape_image(i), "label": i % 2}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    KerasFtShapes(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)  # no network
    )
    return data_dir


def test_tfds_prepared_dataset_with_its_own_validation_split(shapes_dir):
    images = sources.load_source(
        "tfds:keras_ft_shapes", tfds_data_dir=shapes_dir, tfds_val_split="validation"
    )
    assert images.class_names == ["zebra", "ant"]
    assert images.val_mask.tolist() == [False] * 8 + [True] * 4
    assert images.names[8] == "keras_ft_shapes validation #0"
    # The stored PNGs decode to exactly the images written, each with its label.
    written = {_shape_image(i).tobytes(): i % 2 for i in range(12)}
    decoded = [tf.io.decode_png(blob, channels=3).numpy().tobytes() for blob in images.images]
    assert [written[d] for d in decoded] == images.labels.tolist()
    assert len(set(decoded[:8]) & set(decoded[8:])) == 0
    _, train, val, _ = load_splits(
        {"source": "tfds:keras_ft_shapes", "val_fraction": 0.5,
         "tfds": {"data_dir": shapes_dir, "val_split": "validation"}},
        seed=0,
    )
    assert (len(train), len(val)) == (8, 4)
    assert sorted(train.images.tolist()) == sorted(images.images[:8].tolist())


def test_tfds_bad_split_names_the_key(shapes_dir):
    with pytest.raises(ValueError, match=r"TFDS dataset 'keras_ft_shapes', data.tfds.split='tran': "
                       r"Unknown split 'tran'"):
        sources.load_source("tfds:keras_ft_shapes", tfds_data_dir=shapes_dir, tfds_split="tran")
    images = sources.load_source(
        "tfds:keras_ft_shapes", tfds_data_dir=shapes_dir, tfds_split="train[:4]+validation[:2]"
    )
    assert len(images) == 6 and images.val_mask is None


def _flowers(tmp_path, num_examples=30, **options):
    with tfds.testing.mock_data(num_examples=num_examples):  # noise images, no files, no network
        return sources.load_source(
            "tfds:tf_flowers", tfds_download=True, tfds_data_dir=str(tmp_path), **options
        )


def test_tfds_images_labels_and_class_names(tmp_path):
    images = _flowers(tmp_path)
    assert images.kind == data.ENCODED and len(images) == 30 and images.val_mask is None
    assert images.class_names == FLOWERS  # the ClassLabel's order, not sorted
    assert images.labels.min() >= 0 and images.labels.max() < 5 and images.labels.dtype == np.int32
    assert images.names[:2] == ["tf_flowers train #0", "tf_flowers train #1"]
    assert images.images[0].startswith(b"\x89PNG")  # kept encoded
    kept, report = validate.scan(images, policy="fail")
    assert kept is images and sum(report.counts.values()) == 30
    train, val = data.split(images, 0.2, seed=0)
    x, y = next(iter(data.make_dataset(train, 16, 4, training=True, seed=0)))
    assert x.shape == (4, 16, 16, 3) and x.dtype == tf.float32
    first = tf.image.resize(
        tf.cast(tf.io.decode_png(images.images[0], channels=3), tf.float32), (16, 16), antialias=True
    )
    evaluation = next(iter(data.make_dataset(images, 16, 1, training=False)))[0][0]
    np.testing.assert_allclose(evaluation.numpy(), np.clip(first.numpy(), 0, 255), atol=1e-4)


def test_tfds_validation_split_is_the_datasets_own(tmp_path):
    images = _flowers(tmp_path, num_examples=12, tfds_val_split="test")
    assert images.val_mask.tolist() == [False] * 12 + [True] * 12
    assert images.names[12] == "tf_flowers test #0"
    with pytest.raises(ValueError, match=r"data.tfds.val_split is data.tfds.split \('train'\)"):
        _flowers(tmp_path, tfds_val_split="train")


def test_tfds_bad_images_are_scanned_like_files(tmp_path):
    images = _flowers(tmp_path, num_examples=12)
    images.images[3] = images.images[3][:40]  # TFDS stores a source file's bytes as they were
    kept, report = validate.scan(images)
    assert len(kept) == 11 and report.bad_files[0][0] == "tf_flowers train #3"
    assert report.bad_files[0][1].startswith("truncated PNG")


def test_tfds_not_prepared_offline_fails_at_once_in_one_line(tmp_path):
    data_dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(ValueError) as error:  # nothing mocked: the real TFDS, no network
        sources.load_source("tfds:tf_flowers", tfds_data_dir=data_dir)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"TFDS dataset 'tf_flowers' is not prepared in {data_dir} (no {data_dir}/tf_flowers/"
    )
    assert f"run `tfds build tf_flowers --data_dir={data_dir}` on a machine with network" in message
    assert "--config.data.tfds.download=True" in message
    assert not os.path.exists(data_dir)


def test_tfds_manual_download_fails_before_trying(tmp_path):
    with pytest.raises(ValueError, match=r"'imagenet2012' is not prepared in .* and only a manual download "
                       r"can prepare it: put its files in .*/downloads/manual \(manual_dir should contain"):
        sources.load_source("tfds:imagenet2012", tfds_download=True, tfds_data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("tf_flower", {}, r"Unknown TFDS dataset 'tf_flower': did you mean tf_flowers"),
        ("tf_flowers:9.9.9", {}, r"TFDS dataset 'tf_flowers:9.9.9': .* cannot be loaded at version 9.9.9, only: 3.0.1"),
        ("tf_flowers", {"tfds_label_key": "species"},
         r"'tf_flowers' has no ClassLabel feature 'species'; its ClassLabel features: label. "
         r"Set --config.data.tfds.label_key=NAME."),
        ("oxford_iiit_pet", {"tfds_image_key": "photo"},
         r"no Image feature 'photo'; its Image features: image, segmentation_mask"),
    ],
)
def test_tfds_unknown_names_list_the_choices(tmp_path, name, options, message):
    with pytest.raises(ValueError, match=message):
        sources.load_source(f"tfds:{name}", tfds_data_dir=str(tmp_path), **options)


def test_tfds_through_load_splits_with_num_classes(tmp_path):
    config = {"source": "tfds:tf_flowers", "val_fraction": 0.2,
              "tfds": {"download": True, "data_dir": str(tmp_path)}}
    with tfds.testing.mock_data(num_examples=30):
        dataset, train, val, _ = load_splits(config, seed=0)
        assert dataset.class_names == FLOWERS and len(train) + len(val) == 30
        with pytest.raises(ValueError, match=r"num_classes=4 but the data has 5 classes"):
            load_splits(dict(config, num_classes=4), seed=0)


# ---------------------------------------------------- saved configs, resume


def test_saved_config_without_the_new_data_keys_still_loads_and_resumes(tmp_path, images):
    from configs import tiny

    config = tiny.get_config()
    config.data.source = f"folder:{images}"
    saved = config.to_dict()
    for key in ("num_classes", "tfds"):
        del saved["data"][key]  # a run started before these keys existed
    _, train, val, _ = load_splits(saved["data"], seed=0)
    assert len(train) + len(val) == 20
    (tmp_path / "config.json").write_text(json.dumps(saved))
    workdir_lib.check_resumable(str(tmp_path), config.to_dict())  # the defaults: resumes
    config.data.num_classes = 2
    with pytest.raises(ValueError, match=r"config differs \(data.num_classes: 0 -> 2\)"):
        workdir_lib.check_resumable(str(tmp_path), config.to_dict())


# --------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_from_a_csv_and_fail_on_a_bad_one(tmp_path, images):
    rows = [
        f"{os.path.relpath(os.path.join(images, c, f), tmp_path)},{c}"
        for c in ("dark", "light") for f in sorted(os.listdir(os.path.join(images, c)))
    ]
    good = _csv(tmp_path / "labels.csv", "path,label\n" + "\n".join(rows) + "\n")
    # One epoch: what is checked is the data's, not the training's.
    with start_train(tmp_path / "run", f"--config.data.source=csv:{good}",
                     "--config.train.epochs=1") as launch:
        # Meanwhile, in-process: a bad CSV is an input error (exit 2).
        bad = _csv(tmp_path / "bad.csv", "path,label\n" + rows[0] + "\n" + rows[-1].split(",")[0] + ",\n")
        line = train_error(tiny_config({"data.source": f"csv:{bad}"}), tmp_path / "bad_run")
        assert line.startswith(f"error: {bad} line 3: empty label for ")
        result = launch.result()
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["train_images"], metrics["val_images"], metrics["num_classes"]) == (16, 4, 2)
    assert (tmp_path / "run" / "export" / "saved_model.pb").exists()


@pytest.mark.slow
def test_train_and_evaluate_split_train_and_val_folders_alike(tmp_path):
    write_image_folder(tmp_path / "data" / "train", {"dark": 8, "light": 8})
    write_image_folder(tmp_path / "data" / "val", {"dark": 3, "light": 2}, seed=1)
    workdir = tmp_path / "run"
    trained = run_train(
        workdir, f"--config.data.source=folder:{tmp_path / 'data'}", "--config.export.enabled=False",
        "--config.train.epochs=1",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert (metrics["train_images"], metrics["val_images"]) == (16, 5)  # not val_fraction's share
    evaluated = subprocess.run(
        [sys.executable, "-m", "launch.evaluate", f"--workdir={workdir}"], cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True, timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((workdir / "report" / "report.json").read_text())
    assert report["num_images"] == 5
    assert report["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert report["recipe"]["train / validation images"] == "16 / 5 (the source's own split)"


def _write_idx(path, array, magic):
    import gzip

    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_samples_from_the_debian_files(tmp_path, monkeypatch):
    from keras_ft import samples

    files = tmp_path / "fashion-mnist"
    files.mkdir()
    labels = np.arange(30) % 10
    images = np.stack([np.full((28, 28), 8 * i) for i in range(30)])
    monkeypatch.setattr(samples, "FASHION_MNIST_DIR", str(files))
    monkeypatch.setenv("KERAS_FT_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        samples.materialize("fashion_mnist_2")
    _write_idx(files / "train-images-idx3-ubyte.gz", images, 0x803)
    _write_idx(files / "train-labels-idx1-ubyte.gz", labels, 0x801)

    ds = sources.load_source("sample:fashion_mnist_2")
    assert ds.class_names == sorted(samples.FASHION_MNIST_CLASSES)
    assert len(ds) == 20
    # The first two images of each class, in file order: trousers are 1 and 11.
    trousers = [f for f in ds.images if "/trouser/" in f]
    pixels = [tf.io.decode_png(tf.io.read_file(f)).numpy() for f in trousers]
    assert [int(p[0, 0, 0]) for p in pixels] == [8, 88] and pixels[0].shape == (28, 28, 1)

    with pytest.raises(ValueError, match="fewer than the 4"):
        samples.materialize("fashion_mnist_4")
    for name in ("fashion_mnist_0", "../lfw_faces", "fashion_mnist_2/.."):
        with pytest.raises(ValueError, match="Unknown sample"):
            samples.materialize(name)
    with open(files / "train-images-idx3-ubyte.gz", "rb") as f:
        whole = f.read()
    import gzip

    with gzip.open(files / "train-images-idx3-ubyte.gz", "wb") as f:  # a byte short
        f.write(gzip.decompress(whole)[:-1])
    with pytest.raises(ValueError, match="declares shape .* damaged"):
        samples.materialize("fashion_mnist_1")

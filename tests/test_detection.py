"""Object detection on the shared recipe: exact resume after kill -9, the
export against the model for batches of 1 and 3, `val_map` every epoch,
the report, `launch.predict --boxes` and `launch.evaluate`, and the
one-line errors on bad annotations.

The test images are real PNG files: gray noise with a red and a blue
square at seeded places (each present with probability 3/4), the COCO
boxes being the squares, so a model's output must depend on the image.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO, run_train, train_env
from runs import assert_kill_9_resumes_bitwise, overridden, png, train_error

CONFIG = "configs/det_tiny.py"
CLASSES = ["red", "blue"]


def write_coco(root, count=24, seed=0, size=48) -> str:
    """`count` images with their COCO file in `root`; returns the source string."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image = rng.integers(90, 166, (size, size, 3)).astype(np.uint8)
        for category, colour in ((1, (220, 30, 30)), (2, (30, 30, 220))):
            if rng.random() < 0.25:
                continue
            side = int(rng.integers(10, 20))
            y, x = (int(v) for v in rng.integers(0, size - side, 2))
            image[y:y + side, x:x + side] = colour
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "bbox": [x, y, side, side], "area": side * side, "iscrowd": 0})
        Image.fromarray(image).save(os.path.join(root, "images", f"{i:03d}.png"))
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": size, "height": size})
    with open(os.path.join(root, "annotations.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}, f, indent=1)
    return f"coco:{root}/images,{root}/annotations.json"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(str(tmp_path_factory.mktemp("coco")))


def det_config(source, overrides=None):
    from configs import det_tiny

    config = det_tiny.get_config()
    config.data.source = source
    return overridden(config, overrides)


@pytest.mark.slow
def test_kill_9_resumes_bitwise_and_the_export_serves_the_models_boxes(coco, tmp_path):
    run = [f"--config.data.source={coco}", "--config.train.epochs=3",
           "--config.train.steps_per_epoch=4", "--config.checkpoint.every_steps=2",
           "--config.deterministic=True", "--config.data.augment.random_resized_crop=(0.5, 1.0)",
           "--config.detection.score_threshold=0.001"]  # a young model scores near the 0.01 prior
    # (no random layer in the detector: the crops and flips are drawn by
    # position, and the resumed stream must skip exactly to step 7)
    reference = assert_kill_9_resumes_bitwise(CONFIG, run, tmp_path, random_layers=False)

    # val_map every epoch, the main metric, and the report
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["main_metric"] == "val_map" and 0.0 <= metrics["val_map"] <= 1.0
    assert {"val_ap50", "val_ap75"} <= set(metrics)
    header = (reference / "history.csv").read_text().splitlines()[0].split(",")
    assert {"val_map", "val_ap50", "val_ap75"} <= set(header)
    assert {"report.md", "report.json", "pr_curves.png", "examples.png"} <= set(
        os.listdir(reference / "report"))

    # The export, in this process: batches of 1 and 3 encoded images of
    # several sizes give the model's own detections, in each image's pixels.
    from keras_ft import data, job
    from keras_ft.tasks import object_detection

    served = tf.saved_model.load(str(reference / "export"))
    assert served.task[0].numpy() == b"object_detection"
    assert [n.decode() for n in served.class_names[0].numpy()] == CLASSES
    model, _, _ = job.load_trained(str(reference))
    detect = object_detection.detector(model, 100, 0.001)
    rng = np.random.default_rng(1)
    shapes = ((48, 48), (57, 33), (96, 120))
    images = [rng.integers(0, 256, (h, w, 3)).astype(np.uint8) for h, w in shapes]
    for batch in ([images[1]], images):
        out = served.signatures["serving_default"](images=tf.constant([png(i) for i in batch]))
        assert out["boxes"].shape[:2] == (len(batch), 100)
        for i, image in enumerate(batch):
            want_boxes, want_scores, want_classes, count = (t.numpy()[0] for t in detect(
                data.resize_image(image[np.newaxis], model.image_size),
                tf.constant([image.shape[:2]], tf.int32)))
            assert int(out["num_detections"][i]) == count > 0
            np.testing.assert_allclose(out["scores"][i].numpy()[:count], want_scores[:count], atol=1e-5)
            np.testing.assert_allclose(out["boxes"][i].numpy()[:count], want_boxes[:count], atol=1e-3)
            np.testing.assert_array_equal(out["classes"][i].numpy()[:count], want_classes[:count])
            names = [n.decode() for n in out["class_names"][i].numpy()[:count]]
            assert names == [CLASSES[c] for c in want_classes[:count]]
            h, w = image.shape[:2]
            assert (out["boxes"][i].numpy()[:count] <= [w, h, w, h]).all()
    uint8 = served.signatures["serving_uint8"](images=tf.constant(images[0][np.newaxis]))
    byte = served.signatures["serving_default"](images=tf.constant([png(images[0])]))
    np.testing.assert_allclose(uint8["boxes"].numpy(), byte["boxes"].numpy(), atol=1e-4)
    # the boxes depend on the image
    other = served.signatures["serving_default"](images=tf.constant([png(images[0][::-1])]))
    assert np.abs(other["scores"].numpy() - byte["scores"].numpy()).max() > 1e-4

    # launch.predict writes the rows and the drawn images; launch.evaluate the report
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, image in (("a.png", images[0]), ("b.png", images[2])):
        Image.fromarray(image).save(photos / name)
    drawn, rows = tmp_path / "drawn", tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "launch.predict", f"--export={reference / 'export'}", str(photos),
           f"--boxes={drawn}", f"--output={rows}", "--min_score=0"]
    done = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(drawn)) == ["a.png", "b.png"]
    assert np.array(Image.open(drawn / "b.png")).shape == (96, 120, 3)
    found = json.loads(rows.read_text())["detections"]
    assert [os.path.basename(d["path"]) for d in found] == ["a.png", "b.png"]
    assert len(found[0]["objects"]) == int(byte["num_detections"][0])
    np.testing.assert_allclose(found[0]["objects"][0]["box"], byte["boxes"][0, 0].numpy(), atol=0.01)
    evaluated = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--workdir={reference}",
                                f"--out={tmp_path / 'eval'}"], cwd=REPO, env=train_env(),
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "mAP" in evaluated.stdout
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert written["map"] == pytest.approx(metrics["val_map"], abs=1e-6)


# ------------------------------------------------------------- bad input


def _edit_annotations(source, change):
    path = source.split(",")[1]
    doc = json.load(open(path))
    change(doc)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def test_a_malformed_annotation_file_is_named_with_its_line(tmp_path):
    source = write_coco(str(tmp_path / "coco"), count=8)
    path = source.split(",")[1]
    text = open(path).read().splitlines()
    text[5] = text[5] + ",,"
    open(path, "w").write("\n".join(text))
    line = train_error(det_config(source), tmp_path / "run")
    assert "annotations.json:6:" in line and "JSON" in line  # file:line:column


@pytest.mark.parametrize("change, words", [
    (lambda d: d["annotations"][0]["bbox"].__setitem__(2, -4), ("annotations[0]", "w, h >= 0")),
    (lambda d: d["annotations"][0].__setitem__("category_id", 9), ("category", "9")),
    (lambda d: d["images"].pop(), ("007.png",)),
])
def test_bad_boxes_classes_and_image_lists_are_one_line_errors(tmp_path, change, words):
    source = write_coco(str(tmp_path / "coco"), count=8)
    _edit_annotations(source, change)
    line = train_error(det_config(source), tmp_path / "run")
    assert "annotations.json" in line or "007.png" in line
    for word in words:
        assert word in line, line
    assert "\n" not in line


@pytest.mark.parametrize("overrides, message", [
    ({"data.augment.mixup": 0.2}, "data.augment.mixup does not move boxes"),
    ({"data.cache_features": True}, "task 'object_detection' has none to cache"),
    ({"detection.score_threshold": 1.5}, "detection.score_threshold"),
    ({"data.resize": "center_crop"}, "detection stretches whole images"),
    ({"train.label_smoothing": 0.1}, "set train.label_smoothing=0"),
    ({"model.dropout": 0.2}, "the detector's head has no dropout layer"),
])
def test_bad_detection_config_is_one_line(coco, tmp_path, overrides, message):
    assert message in train_error(det_config(coco, overrides), tmp_path / "run")


def test_launch_train_exits_2_on_an_inverted_box(tmp_path):
    source = write_coco(str(tmp_path / "coco"), count=8)
    _edit_annotations(source, lambda d: d["annotations"][2]["bbox"].__setitem__(3, -1))
    result = run_train(tmp_path / "run", f"--config.data.source={source}", config=CONFIG)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "annotations.json" in result.stderr and "Traceback" not in result.stderr

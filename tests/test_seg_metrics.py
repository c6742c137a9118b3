"""The segmentation loss, metrics and report (keras_ft.seg_metrics)."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ft import seg_metrics as sm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 4


def label_maps(seed, n=2, size=8, ignored=0.2, probabilities=None):
    """Random int32 label maps [n, size, size] with a share `ignored` of 255."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(C, size=(n, size, size), p=probabilities).astype(np.int32)
    labels[rng.random(labels.shape) < ignored] = sm.IGNORE_LABEL
    return labels


def logits_for(labels, seed, right=0.6):
    """Float32 logits [..., C]: a share `right` of labelled pixels argmax to their label."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=labels.shape + (C,)).astype(np.float32)
    boost = (rng.random(labels.shape) < right) & (labels != sm.IGNORE_LABEL)
    idx = np.nonzero(boost)
    logits[idx + (labels[idx],)] += 10.0
    return logits


def batches():
    """Three batches that differ in class mix and in their share of ignored pixels."""
    mixes = ([0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.5, 0.0])
    out = []
    for seed, (mix, ignored) in enumerate(zip(mixes, (0.1, 0.6, 0.3))):
        labels = label_maps(seed, probabilities=mix, ignored=ignored)
        out.append((labels, logits_for(labels, seed + 100, right=0.3 + 0.3 * seed)))
    return out


def reference_scores(labels, logits):
    """Mean IoU and pixel accuracy by hand: a loop over classes, no shared code."""
    keep = labels != sm.IGNORE_LABEL
    truth, predicted = labels[keep], logits.argmax(-1)[keep]
    ious = []
    for k in range(C):
        union = np.sum((truth == k) | (predicted == k))
        if union:
            ious.append(np.sum((truth == k) & (predicted == k)) / union)
    return float(np.mean(ious)), float(np.mean(truth == predicted))


def reference_loss(labels, logits, weights=None):
    """Per-image loss in float64: weighted CE summed over labelled pixels / their number."""
    weights = np.ones(C) if weights is None else np.asarray(weights, np.float64)
    z = logits.astype(np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    out = []
    for lab, lp in zip(labels, log_p):
        keep = lab != sm.IGNORE_LABEL
        y = lab[keep]
        ce = -lp[keep][np.arange(len(y)), y] * weights[y]
        out.append(ce.sum() / len(y) if len(y) else 0.0)
    return np.array(out)


def evaluate(metric, pairs):
    metric.reset_state()
    for labels, logits in pairs:
        metric.update_state(labels, logits)
    return float(metric.result())


# ---------------------------------------------------------------- metrics


def test_metrics_accumulate_over_the_whole_set_not_per_batch():
    pairs = batches()
    labels = np.concatenate([l for l, _ in pairs])
    logits = np.concatenate([z for _, z in pairs])
    want_iou, want_accuracy = reference_scores(labels, logits)
    got_iou = evaluate(sm.MeanIoU(C), pairs)
    got_accuracy = evaluate(sm.PixelAccuracy(C), pairs)
    np.testing.assert_allclose(got_iou, want_iou, rtol=1e-6)
    np.testing.assert_allclose(got_accuracy, want_accuracy, rtol=1e-6)
    # The mean of the batches' scores is another number: the metric is not it.
    per_batch = np.array([reference_scores(l, z) for l, z in pairs])
    assert abs(per_batch[:, 0].mean() - got_iou) > 0.01, (per_batch[:, 0].mean(), got_iou)
    assert abs(per_batch[:, 1].mean() - got_accuracy) > 0.01, (per_batch[:, 1].mean(), got_accuracy)
    # The numpy functions on the module's confusion matrix agree.
    matrix = sm.confusion_matrix(labels, logits.argmax(-1), C)
    assert matrix.sum() == np.sum(labels != sm.IGNORE_LABEL)
    assert sm.mean_iou(matrix) == pytest.approx(want_iou, rel=1e-12)
    assert sm.pixel_accuracy(matrix) == pytest.approx(want_accuracy, rel=1e-12)
    metric = sm.ConfusionMatrix(C)
    for l, z in pairs:
        metric.update_state(l, z)
    np.testing.assert_array_equal(metric.result().numpy(), matrix)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_metrics_and_loss_in_model_evaluate(jit_compile):
    # compile() + evaluate(): a graph, with and without XLA; three batches,
    # the last one smaller.
    pairs = batches()
    labels = np.concatenate([l for l, _ in pairs])[:5]
    logits = np.concatenate([z for _, z in pairs])[:5]
    model = keras.Sequential([keras.Input((8, 8, C)), keras.layers.Identity()])
    model.compile(loss=sm.PixelCrossentropy(),
                  metrics=[sm.MeanIoU(C), sm.PixelAccuracy(C)], jit_compile=jit_compile)
    got = model.evaluate(logits, labels, batch_size=2, verbose=0, return_dict=True)
    want_iou, want_accuracy = reference_scores(labels, logits)
    assert got["mean_iou"] == pytest.approx(want_iou, rel=1e-5)
    assert got["pixel_accuracy"] == pytest.approx(want_accuracy, rel=1e-5)
    assert got["loss"] == pytest.approx(reference_loss(labels, logits).mean(), rel=1e-5)


def test_absent_classes_are_left_out_of_the_mean():
    # Class 2 is in neither labels nor predictions; class 3 is only predicted (IoU 0).
    matrix = np.array([[5, 1, 0, 2],
                       [1, 3, 0, 0],
                       [0, 0, 0, 0],
                       [0, 0, 0, 0]])
    iou = sm.iou_per_class(matrix)
    np.testing.assert_allclose(iou[[0, 1, 3]], [5 / 9, 3 / 5, 0.0])
    assert np.isnan(iou[2])
    assert sm.mean_iou(matrix) == pytest.approx((5 / 9 + 3 / 5 + 0.0) / 3)
    # The Keras metric on label maps of that matrix, with 2 more classes never seen.
    truth = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]).reshape(1, 3, 4)
    predicted = np.array([0, 0, 0, 0, 0, 1, 3, 3, 0, 1, 1, 1]).reshape(1, 3, 4)
    np.testing.assert_array_equal(sm.confusion_matrix(truth, predicted, 4), matrix)
    metric = sm.MeanIoU(6)
    metric.update_state(truth, np.eye(6, dtype=np.float32)[predicted])
    assert float(metric.result()) == pytest.approx(sm.mean_iou(matrix), rel=1e-6)
    assert sm.mean_iou(np.zeros((3, 3))) == 0.0 and float(sm.MeanIoU(3).result()) == 0.0


def test_ignored_pixels_change_nothing_whatever_the_logits():
    labels = label_maps(7, n=3, ignored=0.4)
    labels[2] = sm.IGNORE_LABEL  # an image without a labelled pixel: loss 0
    logits = logits_for(labels, 8)
    wild = logits.copy()
    ignored = labels == sm.IGNORE_LABEL
    wild[ignored] = np.random.default_rng(9).normal(0, 1e3, (ignored.sum(), C))
    loss = sm.PixelCrossentropy(reduction=None)
    np.testing.assert_allclose(loss(labels, wild), loss(labels, logits), rtol=1e-6)
    assert float(loss(labels, logits)[2]) == 0.0
    for metric in (sm.MeanIoU(C), sm.PixelAccuracy(C)):
        assert evaluate(metric, [(labels, wild)]) == evaluate(metric, [(labels, logits)])
    # ... and ignored pixels get no gradient.
    x = tf.constant(wild)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = sm.PixelCrossentropy()(labels, x)
    gradient = tape.gradient(value, x).numpy()
    assert np.all(gradient[ignored] == 0) and np.abs(gradient[~ignored]).sum() > 0


def test_stray_labels_make_loss_and_metrics_nan():
    labels = label_maps(3)
    logits = logits_for(labels, 4)
    labels[0, 0, 0] = C  # neither a class nor 255: a data error, not an ignored pixel
    per_image = sm.PixelCrossentropy(reduction=None)(labels, logits).numpy()
    assert np.isnan(per_image[0]) and np.isfinite(per_image[1])
    assert np.isnan(evaluate(sm.MeanIoU(C), [(labels, logits)]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        sm.confusion_matrix(labels, logits.argmax(-1), C)
    with pytest.raises(ValueError, match=r"num_classes must be in \[1, 255\]"):
        sm.MeanIoU(256)


# ------------------------------------------------------------------- loss


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.0, 3.0]])
def test_loss_equals_numpy_cross_entropy_over_labelled_pixels(weights):
    labels = label_maps(11, n=3, ignored=0.3)
    labels[1, :5] = sm.IGNORE_LABEL  # images differ in their number of labelled pixels
    logits = logits_for(labels, 12) * 3.0
    want = reference_loss(labels, logits, weights)
    per_image = sm.PixelCrossentropy(class_weights=weights, reduction=None)(labels, logits)
    np.testing.assert_allclose(per_image, want, rtol=1e-5)
    batch = sm.PixelCrossentropy(class_weights=weights)(labels[..., None], logits)  # [B, H, W, 1]
    assert float(batch) == pytest.approx(want.mean(), rel=1e-5)
    if weights is not None:  # divided by the pixels, not by the sum of their weights
        assert not np.allclose(want, reference_loss(labels, logits))


def test_loss_and_metrics_config_round_trip():
    loss = sm.PixelCrossentropy(class_weights=[1.0, 2.0, 0.5, 1.0], name="seg_ce")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(again) is sm.PixelCrossentropy
    assert again.class_weights == [1.0, 2.0, 0.5, 1.0] and again.name == "seg_ce"
    labels = label_maps(5)
    logits = logits_for(labels, 6)
    assert float(again(labels, logits)) == pytest.approx(float(loss(labels, logits)))
    for metric in (sm.MeanIoU(C), sm.PixelAccuracy(C, name="acc")):
        copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
        assert type(copy) is type(metric) and copy.name == metric.name and copy.num_classes == C
    with pytest.raises(ValueError, match="3 class_weights for 4 classes"):
        sm.PixelCrossentropy(class_weights=[1, 1, 1])(labels, logits)


# ------------------------------------------------------------ distribution

_MIRRORED = r"""
import json, sys
import numpy as np
from keras_ft import distribute
distribute.split_cpu(2)  # before TensorFlow runs anything
import keras, tensorflow as tf
from keras_ft import seg_metrics as sm
labels, logits = (np.load(sys.argv[1])[k] for k in ("labels", "logits"))
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = keras.Sequential([keras.Input(logits.shape[1:]), keras.layers.Identity()])
    iou = sm.MeanIoU(4)
    model.compile(loss=sm.PixelCrossentropy(), metrics=[iou, sm.PixelAccuracy(4)])
data = tf.data.Dataset.from_tensor_slices((logits, labels)).batch(4)
result = model.evaluate(data, verbose=0, return_dict=True)
result["replicas"] = strategy.num_replicas_in_sync
result["pixels"] = int(iou.matrix.numpy().sum())  # the replicas' counts, summed
print("RESULT " + json.dumps(result))
"""


def test_metrics_sum_over_two_replicas(tmp_path):
    # A fresh process: the CPU is split in two before TensorFlow starts.
    # 6 images in global batches of 4: the last (2 images) gives each replica one.
    pairs = batches()
    labels = np.concatenate([l for l, _ in pairs])
    logits = np.concatenate([z for _, z in pairs])
    np.savez(tmp_path / "data.npz", labels=labels, logits=logits)
    run = subprocess.run([sys.executable, "-c", _MIRRORED, str(tmp_path / "data.npz")], cwd=REPO,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT ")[-1])
    want_iou, want_accuracy = reference_scores(labels, logits)
    assert result["replicas"] == 2
    assert result["pixels"] == np.sum(labels != sm.IGNORE_LABEL)
    assert result["mean_iou"] == pytest.approx(want_iou, rel=1e-5)
    assert result["pixel_accuracy"] == pytest.approx(want_accuracy, rel=1e-5)
    assert result["loss"] == pytest.approx(reference_loss(labels, logits).mean(), rel=1e-5)


# ----------------------------------------------------------------- report


def test_report_files_and_table_numbers(tmp_path):
    pairs = batches()
    labels = np.concatenate([l for l, _ in pairs])
    predicted = np.concatenate([z for _, z in pairs]).argmax(-1)
    predicted[predicted == 2] = 1  # class 2 never predicted: IoU 0
    labels[labels == 3] = 0
    predicted[predicted == 3] = 0  # class 3 absent from both: n/a
    matrix = sm.confusion_matrix(labels, predicted, C)
    names = ["sky", "road", "car|bus", "tree"]
    images = np.random.default_rng(0).integers(0, 256, labels.shape + (3,), dtype=np.uint8)
    out = tmp_path / "report"
    paths = sm.write_report(str(out), matrix, names, examples=(images[:2], labels[:2], predicted[:2]))
    assert [os.path.basename(p) for p in paths] == ["report.md", "confusion.png", "examples.png"]
    assert sorted(os.listdir(out)) == ["confusion.png", "examples.png", "report.md"]  # no temp files
    for p in paths[1:]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "![" in text and "(confusion.png)" in text and "(examples.png)" in text
    keep = labels != sm.IGNORE_LABEL
    want_iou, want_accuracy = reference_scores(labels, np.eye(C)[predicted])
    assert re.search(rf"\| mean IoU \(over the 3 classes present\) \| {want_iou:.4f} \|", text)
    assert f"| pixel accuracy | {want_accuracy:.4f} |" in text
    rows = re.findall(r"^\| (sky|road|car\\\|bus|tree) \| ([^|]+) \| (\d+) \| (\d+) \| (\d+) \|$",
                      text, re.M)
    assert [r[0] for r in rows] == ["sky", "road", "car\\|bus", "tree"]
    for k, (_, iou, true_px, predicted_px, correct) in enumerate(rows):
        t, p = labels[keep] == k, predicted[keep] == k
        assert (int(true_px), int(predicted_px), int(correct)) == (t.sum(), p.sum(), (t & p).sum())
        if k == 3:
            assert iou.strip() == "n/a (absent)"
        else:
            assert float(iou) == pytest.approx((t & p).sum() / (t | p).sum(), abs=5e-5)
    assert float(rows[2][1]) == 0.0
    without = sm.write_report(str(tmp_path / "plain"), matrix, names)
    assert [os.path.basename(p) for p in without] == ["report.md", "confusion.png"]
    with pytest.raises(ValueError, match=r"A confusion matrix \(4, 4\) for 3 class names"):
        sm.write_report(str(tmp_path / "bad"), matrix, names[:3])


def test_palette_colorize_and_overlay():
    colors = sm.palette(21)
    np.testing.assert_array_equal(colors[:4], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]])
    full = sm.palette(255)
    assert len({tuple(c) for c in full}) == 255  # one colour per class
    assert tuple(sm.IGNORE_COLOR) not in {tuple(c) for c in full}
    mask = np.array([[0, 1], [255, 2]])
    picture = sm.colorize(mask, 3)
    assert picture.dtype == np.uint8 and picture.shape == (2, 2, 3)
    np.testing.assert_array_equal(picture[1, 0], sm.IGNORE_COLOR)
    np.testing.assert_array_equal(picture[0, 1], [128, 0, 0])
    image = np.full((2, 2, 3), 100, np.uint8)
    np.testing.assert_array_equal(sm.overlay(image, mask, 3, alpha=0.0), image)
    opaque = sm.overlay(image, mask, 3, alpha=1.0)
    np.testing.assert_array_equal(opaque[mask != 255], picture[mask != 255])
    np.testing.assert_array_equal(opaque[1, 0], image[1, 0])  # ignored: the image shows through
    np.testing.assert_array_equal(sm.overlay(image, mask, 3)[0, 1], [114, 50, 50])
    with pytest.raises(ValueError, match=r"Labels must be in \[0, 3\) or 255, got \[7\]"):
        sm.colorize(np.array([[7]]), 3)

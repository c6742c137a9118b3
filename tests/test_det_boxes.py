"""Object detection's parts, each against numbers worked out by hand: anchors,
matching, box encoding, the loss, COCO AP, and the augmentations that must
move boxes with their pixels."""

import contextlib
import io
import math

import numpy as np
import pytest
import tensorflow as tf

from keras_ft.detection import boxes, metrics, stream

SPEC = boxes.AnchorSpec()


def test_anchors_sit_at_cell_centres_with_the_configured_shapes():
    a = boxes.anchors(SPEC, 64, [(8, 8), (4, 4), (2, 2)])
    assert a.shape == ((64 + 16 + 4) * 9, 4)
    first = a[:9]  # cell (0, 0) of level 3: centre (4, 4)
    np.testing.assert_allclose((first[:, :2] + first[:, 2:]) / 2, 4.0, atol=1e-5)
    w, h = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
    # aspect ratio 0.5, scale 0: side 32 px (4 strides of 8), w/h = 0.5
    assert w[0] == pytest.approx(32 * math.sqrt(0.5), rel=1e-5)
    assert h[0] == pytest.approx(32 / math.sqrt(0.5), rel=1e-5)
    np.testing.assert_allclose(w * h, np.tile(1024 * 2 ** (2 * np.arange(3) / 3), 3), rtol=1e-5)
    # the next cell is one stride to the right; level 5's first cell is at 16
    assert a[9, 0] - a[0, 0] == pytest.approx(8.0)
    level5 = a[(64 + 16) * 9]
    assert (level5[0] + level5[2]) / 2 == pytest.approx(16.0)


def test_encode_then_decode_gives_the_boxes_back():
    rng = np.random.default_rng(0)
    anchor = rng.uniform(0, 50, (20, 2))
    anchor = np.concatenate([anchor, anchor + rng.uniform(5, 40, (20, 2))], -1).astype(np.float32)
    box = rng.uniform(0, 60, (20, 2))
    box = np.concatenate([box, box + rng.uniform(2, 50, (20, 2))], -1).astype(np.float32)
    deltas = boxes.encode(anchor, box)
    np.testing.assert_allclose(boxes.decode(anchor, deltas).numpy(), box, rtol=1e-5, atol=1e-4)
    # centre_yxhw: dy, dx in anchor sides, then log(h/ha), log(w/wa)
    ha, wa = anchor[0, 3] - anchor[0, 1], anchor[0, 2] - anchor[0, 0]
    hb, wb = box[0, 3] - box[0, 1], box[0, 2] - box[0, 0]
    dy = ((box[0, 1] + box[0, 3]) - (anchor[0, 1] + anchor[0, 3])) / 2 / ha
    np.testing.assert_allclose(deltas[0].numpy(), [dy, ((box[0, 0] + box[0, 2]) - (anchor[0, 0] + anchor[0, 2])) / 2 / wa,
                                                   np.log(hb / ha), np.log(wb / wa)], rtol=1e-4)


def test_matching_follows_the_hand_computed_ious():
    anchor = np.array([[0, 0, 10, 10],     # IoU with the object: 1.0 -> positive
                       [0, 0, 10, 12],     # 100/120 = 0.833 -> positive
                       [5, 0, 15, 10],     # 50/150 = 0.333 -> background (< 0.4)
                       [2, 0, 12, 10],     # 80/120 = 0.667 -> positive
                       [4, 0, 14, 10],     # 60/140 = 0.4286 -> ignored (0.4..0.5)
                       [40, 40, 50, 50],   # 0 -> background
                       [30, 30, 36, 36]],  # 0.107 with object 2, its best: forced positive
                      np.float32)
    objects = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    got = boxes.match(anchor, objects, np.array([3, 1]), SPEC).numpy()
    np.testing.assert_array_equal(got[:, 4], [3, 3, boxes.BACKGROUND, 3, boxes.IGNORED,
                                              boxes.BACKGROUND, 1])
    ious = boxes.iou(anchor, objects).numpy()
    np.testing.assert_allclose(ious[:, 0], [1, 100 / 120, 50 / 150, 80 / 120, 60 / 140, 0, 0], rtol=1e-5)
    assert ious[6, 1] == pytest.approx(36 / 400, rel=1e-5)  # below 0.4, yet its object's best
    # positives' deltas decode to their object
    np.testing.assert_allclose(boxes.decode(anchor[[0, 1, 6]], got[[0, 1, 6], :4]).numpy(),
                               objects[[0, 0, 1]], atol=1e-4)


def test_padding_rows_match_nothing_and_an_empty_image_is_all_background():
    anchor = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    padded = np.array([[20, 20, 30, 30], [-1, -1, -1, -1]], np.float32)
    got = boxes.match(anchor, padded, np.array([2, 0]), SPEC).numpy()
    np.testing.assert_array_equal(got[:, 4], [boxes.BACKGROUND, 2])
    empty = boxes.match(anchor, np.zeros((0, 4), np.float32), np.zeros(0, np.int32), SPEC).numpy()
    np.testing.assert_array_equal(empty[:, 4], boxes.BACKGROUND)
    assert np.isfinite(empty).all()


def _focal(p, y, alpha=0.25, gamma=1.5):
    pt = p if y else 1 - p
    return -(alpha if y else 1 - alpha) * (1 - pt) ** gamma * math.log(pt)


def test_the_loss_is_focal_plus_weighted_huber_per_positive_anchor():
    # one image, three anchors: a positive of class 1, a background, an ignored
    y_true = np.array([[[0.1, 0.0, 0.0, 0.0, 1.0],
                        [0.0, 0.0, 0.0, 0.0, boxes.BACKGROUND],
                        [0.0, 0.0, 0.0, 0.0, boxes.IGNORED]]], np.float32)
    logits = np.array([0.5, -1.0, 2.0, 3.0, -0.5, 0.2], np.float32).reshape(3, 2)
    y_pred = np.concatenate([np.array([[0.3, 0.0, 0.0, 0.0]] + [[0.0] * 4] * 2, np.float32),
                             logits], -1)[None]
    p = 1 / (1 + np.exp(-logits))
    focal = sum(_focal(p[a, c], a == 0 and c == 1) for a in (0, 1) for c in (0, 1))
    error = 0.2  # |0.3 - 0.1| > delta 0.1: 0.1 * (0.2 - 0.05)
    huber = 0.1 * (error - 0.05)
    loss = metrics.DetectionLoss(num_classes=2)
    assert float(loss(y_true, y_pred)) == pytest.approx(focal + 50 * huber, rel=1e-4)
    # two images, the second all background
    both = np.concatenate([y_true, y_true * [1, 1, 1, 1, 0] - [0, 0, 0, 0, 1]], 0)
    both_pred = np.concatenate([y_pred, y_pred], 0)
    background_only = sum(_focal(p[a, c], False) for a in (0, 1, 2) for c in (0, 1))
    # one positive in two images: each image's sum divided by 1/2
    per_image = loss.call(tf.constant(both), tf.constant(both_pred)).numpy()
    np.testing.assert_allclose(per_image, np.array([focal + 50 * huber, background_only]) / 0.5,
                               rtol=1e-4)


# ------------------------------------------------------------------ COCO AP


def _truth():
    return metrics.coco_ground_truth(
        [np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)], [np.array([0, 0])],
        [(50, 50)], ["thing"])


def test_ap_on_a_toy_example_is_the_hand_computed_one_and_pycocotools_own():
    found = [{"boxes": np.array([[0, 0, 10, 10], [30, 0, 45, 10], [21, 21, 40, 40]], np.float32),
              "scores": np.array([0.9, 0.8, 0.7]), "classes": np.array([0, 0, 0])}]
    got = metrics.coco_evaluate(_truth(), metrics.coco_detections(found))
    # TP, FP, TP: precision 1 up to recall 0.5, then 2/3 up to 1.0; COCO's 101
    # recall points: 51 at 1.0 and 50 at 2/3. IoU of the third: 361/400 > 0.75.
    hand = (51 * 1.0 + 50 * 2 / 3) / 101
    assert got["ap50"] == pytest.approx(hand, abs=1e-6)
    assert got["ap75"] == pytest.approx(hand, abs=1e-6)
    assert got["per_class"]["thing"] == pytest.approx(got["map"])
    # the same through pycocotools directly, from COCO's own xywh files
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": 7, "height": 50, "width": 50}],
                      "categories": [{"id": 3, "name": "thing"}],
                      "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [0, 0, 10, 10],
                                       "area": 100, "iscrowd": 0},
                                      {"id": 2, "image_id": 7, "category_id": 3, "bbox": [20, 20, 20, 20],
                                       "area": 400, "iscrowd": 0}]}
        gt.createIndex()
        dt = gt.loadRes([{"image_id": 7, "category_id": 3, "bbox": b, "score": s} for b, s in
                         (([0, 0, 10, 10], 0.9), ([30, 0, 15, 10], 0.8), ([21, 21, 19, 19], 0.7))])
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert got["map"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert got["ap50"] == pytest.approx(ev.stats[1], abs=1e-9)


def test_no_detection_scores_zero_and_a_class_without_objects_is_none():
    truth = metrics.coco_ground_truth([np.array([[0, 0, 10, 10]], np.float32)], [np.array([0])],
                                      [(20, 20)], ["a", "b"])
    got = metrics.coco_evaluate(truth, [])
    assert got["map"] == 0.0 and got["per_class"] == {"a": 0.0, "b": None}


# ------------------------------------------------------------- augmentation


def _square_image(size=64):
    image = np.full((size, size, 3), 120, np.float32)
    image[10:30, 40:56] = (250, 0, 0)  # the object: x 40..56, y 10..30
    return image, np.array([[40, 10, 56, 30], [-1, -1, -1, -1]], np.float32)


def _covers_the_object(image, box):
    x1, y1, x2, y2 = np.round(box).astype(int)
    red = (image[..., 0] > 200) & (image[..., 1] < 60)
    inside = red[y1:y2, x1:x2]
    return inside.mean() > 0.8 and red.sum() - inside.sum() <= 0.05 * red.sum()


def test_the_flip_moves_the_boxes_with_the_pixels():
    image, box = _square_image()
    flipped, moved = stream.flip(tf.constant(image), tf.constant(box), tf.constant(True))
    np.testing.assert_allclose(moved.numpy()[0], [8, 10, 24, 30])
    np.testing.assert_array_equal(moved.numpy()[1], -1)  # padding stays padding
    assert _covers_the_object(flipped.numpy(), moved.numpy()[0])
    same, kept = stream.flip(tf.constant(image), tf.constant(box), tf.constant(False))
    np.testing.assert_array_equal(kept.numpy(), box)


@pytest.mark.parametrize("seed", range(6))
def test_random_crops_keep_the_boxes_on_their_objects(seed):
    image, box = _square_image()
    window = stream.crop_window(tf.constant([seed, 3], tf.int64), (0.4, 1.0))
    cropped, moved = stream.crop(tf.constant(image), tf.constant(box), window)
    moved = moved.numpy()
    np.testing.assert_array_equal(moved[1], -1)
    if (moved[0] == -1).all():  # the object left the crop: no target
        y1, x1, y2, x2 = window.numpy() * 64
        visible = max(0, min(x2, 56) - max(x1, 40)) * max(0, min(y2, 30) - max(y1, 10)) / 320
        assert visible < stream.KEEP_VISIBLE + 1e-6
    else:
        assert _covers_the_object(cropped.numpy(), moved[0])


def test_the_coins_photo_goes_through_reader_stream_and_matching(tmp_path, monkeypatch):
    """A real photo with known boxes (scikit-image's coins, `sample:coins`):
    read as COCO with its own split, sized, and every coin matched to an
    anchor whose target decodes back to its box."""
    from keras_ft.detection import sources
    from keras_ft.tasks import object_detection

    monkeypatch.setenv("KERAS_FT_HOME", str(tmp_path))
    source = object_detection.resolve_source("sample:coins_10")
    assert source.startswith("coco:") and ";" in source
    data, report = sources.load_det_source(source)
    assert data.val_mask.sum() == 2 and report.objects["coin"] == sum(len(b) for b in data.boxes) > 10
    sized = stream.size_all(data, 65)
    anchor = boxes.anchors(SPEC, 65, [(9, 9), (5, 5), (3, 3)])
    for i in range(len(data)):
        k = len(data.boxes[i])
        target = boxes.match(anchor, sized[1][i], sized[2][i], SPEC).numpy()
        positive = target[:, 4] >= 0
        decoded = boxes.decode(anchor[positive], target[positive, :4]).numpy()
        for box in sized[1][i][:k]:  # each coin is some positive anchor's object
            assert np.abs(decoded - box).max(axis=1).min() < 1e-3

"""Object detection's loss and its COCO evaluation.

`DetectionLoss` is RetinaNet's: a sigmoid focal loss over every anchor that
is not ignored, plus a Huber loss on the box deltas of the positive anchors,
both divided by the number of positive anchors (TF Model Garden's
defaults: focal alpha 0.25, gamma 1.5; Huber delta 0.1; box weight 50). The
two are Keras' own `binary_focal_crossentropy` and `huber`.

`coco_evaluate` scores detections with `pycocotools`' COCOeval (not a
reimplementation): mAP@[.5:.95] ("map"), AP50, AP75, and per-class AP with
the precision/recall curves at IoU 0.5. `EpochEvaluation` puts `val_map`,
`val_ap50` and `val_ap75` into each epoch's logs, where the best
checkpoint, early stopping, the history and the progress log read them.
"""

from __future__ import annotations

import contextlib
import io

import keras
import numpy as np
import tensorflow as tf

from keras_ft.detection import boxes as boxes_lib

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 1.5
HUBER_DELTA = 0.1
BOX_WEIGHT = 50.0


@keras.saving.register_keras_serializable(package="keras_ft")
class DetectionLoss(keras.losses.Loss):
    """Focal loss on classes plus weighted Huber loss on boxes, per positive.

    `y_true` `[N, A, 5]`: per anchor the target deltas and the class target
    (`keras_ft.detection.boxes.match`: a class index, `BACKGROUND` or
    `IGNORED`). `y_pred` `[N, A, 4 + C]`: deltas and class logits. Returns
    per image the sum of its anchors' losses divided by the batch's mean
    number of positive anchors per image (at least 1/N), so that Keras'
    mean over the batch is the batch's loss per positive anchor, as in
    RetinaNet. Under a strategy each replica divides by its own positives.
    """

    def __init__(self, num_classes: int, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA,
                 delta: float = HUBER_DELTA, box_weight: float = BOX_WEIGHT,
                 name: str = "detection_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.alpha, self.gamma = int(num_classes), alpha, gamma
        self.delta, self.box_weight = delta, box_weight

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.cast(y_pred, tf.float32)
        target = y_true[..., 4]
        positive = tf.cast(target >= 0, tf.float32)
        counted = tf.cast(target != boxes_lib.IGNORED, tf.float32)
        onehot = tf.one_hot(tf.cast(tf.maximum(target, 0), tf.int32), self.num_classes) * positive[..., None]
        # Keras' functions average over the last axis: times its size, a sum.
        focal = keras.losses.binary_focal_crossentropy(
            onehot, y_pred[..., 4:], apply_class_balancing=True, alpha=self.alpha,
            gamma=self.gamma, from_logits=True) * self.num_classes
        huber = keras.losses.huber(y_true[..., :4], y_pred[..., :4], delta=self.delta) * 4.0
        per_image = tf.reduce_sum(focal * counted + self.box_weight * huber * positive, axis=-1)
        positives_per_image = tf.reduce_sum(positive) / tf.cast(tf.shape(positive)[0], tf.float32)
        return per_image / tf.maximum(positives_per_image, 1.0 / tf.cast(tf.shape(positive)[0], tf.float32))

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes, "alpha": self.alpha,
                "gamma": self.gamma, "delta": self.delta, "box_weight": self.box_weight}


# ----------------------------------------------------------- COCO evaluation


def coco_ground_truth(boxes, classes, sizes, class_names) -> dict:
    """A COCO ground-truth dict of images `0..N-1`: per image its xyxy
    `boxes[i]` `[n_i, 4]` and `classes[i]` `[n_i]` (0..K-1; category id =
    class + 1), `sizes[i]` (height, width)."""
    annotations = []
    for i, (b, c) in enumerate(zip(boxes, classes)):
        for box, cls in zip(np.asarray(b, np.float64).reshape(-1, 4), np.asarray(c).reshape(-1)):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(cls) + 1,
                                "bbox": [float(box[0]), float(box[1]), float(w), float(h)],
                                "area": float(w * h), "iscrowd": 0})
    return {
        "images": [{"id": i, "height": int(s[0]), "width": int(s[1])} for i, s in enumerate(sizes)],
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(class_names)],
    }


def coco_detections(detections: list[dict]) -> list[dict]:
    """COCO result entries of per-image detections (`boxes` xyxy, `scores`,
    `classes` 0..K-1), image `i` of the list being image id `i`."""
    out = []
    for i, d in enumerate(detections):
        for box, score, cls in zip(np.asarray(d["boxes"], np.float64).reshape(-1, 4),
                                   np.asarray(d["scores"]).reshape(-1), np.asarray(d["classes"]).reshape(-1)):
            out.append({"image_id": i, "category_id": int(cls) + 1, "score": float(score),
                        "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    return out


def coco_evaluate(truth: dict, detections: list[dict]) -> dict:
    """pycocotools' bbox evaluation of `detections` (`coco_detections`)
    against `truth` (`coco_ground_truth`).

    Returns a dict: `map` (AP@[.5:.95]), `ap50`, `ap75`, `ap_small`,
    `ap_medium`, `ap_large` (None without objects of that size), `ar100`; `per_class` {name: AP@[.5:.95] or None
    for a class with no object}; `pr50` {name: precision at the 101 COCO
    recall points, IoU 0.5}. With no detection at all every AP is 0.0 (COCO
    would refuse an empty result list).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ValueError("Detection metrics need pycocotools: pip install pycocotools") from e
    names = [c["name"] for c in truth["categories"]]
    present = {a["category_id"] for a in truth["annotations"]}
    if not detections:
        zero = {k: 0.0 for k in ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100")}
        return dict(zero, per_class={n: (0.0 if k + 1 in present else None) for k, n in enumerate(names)},
                    pr50={n: [0.0] * 101 for n in names})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval's -1 means "no object of that kind": 0.0 for the headline
    # figures (a run without objects in validation scores nothing), None for
    # the size ranges (a set of small objects has no AP for large ones).
    s = [float(v) if v >= 0 else (0.0 if i < 3 else None) for i, v in enumerate(ev.stats)]
    precision = ev.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max dets]
    per_class, pr50 = {}, {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        per_class[name] = float(np.mean(p[p > -1])) if k + 1 in present and (p > -1).any() else None
        curve = precision[0, :, k, 0, -1]
        pr50[name] = [max(float(v), 0.0) for v in curve]
    return {"map": s[0], "ap50": s[1], "ap75": s[2], "ap_small": s[3], "ap_medium": s[4],
            "ap_large": s[5], "ar100": s[8], "per_class": per_class, "pr50": pr50}


LOGGED = ("map", "ap50", "ap75")  # what each epoch logs, as val_map, ...


class EpochEvaluation(keras.callbacks.Callback):
    """Adds `val_map`, `val_ap50` and `val_ap75` to each epoch's logs.

    Put it before the callbacks that read the logs (best checkpoint, early
    stopping, history, progress): Keras hands every callback the same dict.

    Args:
        evaluate: a function of no argument returning `coco_evaluate`'s dict
            for the model's current weights on the validation set.
    """

    def __init__(self, evaluate):
        super().__init__()
        self.evaluate = evaluate

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        result = self.evaluate()
        logs.update({f"val_{k}": result[k] for k in LOGGED})

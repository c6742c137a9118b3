"""Object detection: boxes and classes of objects, on the same backbones and recipe.

Data: images with boxes (`keras_ft.detection.sources`: COCO JSON, Pascal VOC
XML folders, YOLO txt folders; `sample:fashion_det`, real Fashion-MNIST
garments pasted on real photos with their visible boxes, and
`sample:coins`, crops of scikit-image's photo of coins,
`keras_ft.detection.samples`); every image and box checked before training
(one line naming the file and line). Images without objects are valid.
The stream stretches images to S x S, moves their boxes with them, flips
(and, with `data.augment.random_resized_crop`, crops) both together, seeded
by position, so resume is exact (`keras_ft.detection.stream`).
Model: `keras_ft.detection.model.Detector` (RetinaNet: FPN on the stride
8/16/32 features, class and box subnets); the head (FPN and subnets) trains
in every stage. Loss: focal + Huber per positive anchor
(`keras_ft.detection.metrics.DetectionLoss`). Main metric: COCO
mAP@[.5:.95] on the validation set by pycocotools (`val_map`), every epoch,
with AP50 and AP75. After training: `WORKDIR/report/` (per-class AP, PR
curves, validation images with their boxes drawn). Export: a batch of
encoded images of any size in; boxes in each image's pixels, scores,
classes and class names out, after NMS.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from keras_ft import checkpoint, checks, model as model_lib
from keras_ft.detection import boxes as boxes_lib, metrics as metrics_lib
from keras_ft.detection import model as detector_lib, sources, stream
from keras_ft.tasks import base

REPORT_DIR = "report"
SAMPLES = ("sample:fashion_det", "sample:coins")


@dataclasses.dataclass(frozen=True)
class DetectionSpec:
    """`config.detection`, checked (configs/base.py says what each is)."""

    fpn_filters: int
    head_convs: int
    anchor_size: float
    score_threshold: float
    max_detections: int


def resolve_source(source: str) -> str:
    """`sample:fashion_det[_N]` and `sample:coins[_N]` (N images) as the COCO
    source they are built into once; any other source as it is."""
    for sample in SAMPLES:
        if source == sample or source.startswith(sample + "_"):
            count = source[len(sample) + 1:]
            if count and not count.isdigit():
                raise ValueError(f"data.source={source!r}: use {sample} or {sample}_N (N images).")
            from keras_ft.detection import samples

            make = samples.materialize if sample.endswith("fashion_det") else samples.materialize_coins
            root = make(int(count)) if count else make()
            if sample.endswith("coins"):
                return "coco:" + ";".join(f"{root}/{s}/images,{root}/{s}/annotations.json"
                                          for s in ("train", "val"))
            return f"coco:{root}/images,{root}/annotations.json"
    return source


class DetData(base.TaskData):
    """The images and boxes of a run, split, with their streams. The streams
    need the model's anchors: `anchors` is set when the model is built."""

    def __init__(self, spec, dataset, train_set, val_set, scan_report):
        self._keep(spec, dataset, train_set, val_set, scan_report)
        self._size = spec.model.image_size
        self.options = spec.task_options
        self.anchors = None  # (anchor boxes [A, 4], AnchorSpec), from the Detector
        self._sized = {split: stream.size_all(s, self._size)
                       for split, s in (("train", train_set), ("val", val_set))}

    def describe(self) -> list[str]:
        a = self._spec.data.augment
        augment = ", ".join(name for name, on in (("joint left-right flip", a.flip), (
            f"random crop of {tuple(a.random_resized_crop)} of the area", a.random_resized_crop)) if on)
        objects = sum(len(b) for b in self.train_set.boxes)
        return [
            f"Data {self._spec.data.source}: {self.train_size} train / {self.val_size} validation "
            f"images ({self._split_description()}), {objects} training objects in "
            f"{len(self.class_names)} classes ({', '.join(self.class_names[:10])}).",
            f"Images stretched to {self._size} px, boxes with them; augmentation: {augment or 'none'}.",
        ]

    def _stream(self, split: str, training: bool, skip: int = 0):
        if self.anchors is None:
            raise ValueError("Build the detector before its data streams (they match its anchors).")
        if split not in self._sized:
            raise ValueError(f"Unknown split {split!r}. Choose one of: train, val.")
        a = self._spec.data.augment
        return stream.make_dataset(
            self._sized[split], *self.anchors, self._batch, training, seed=self._spec.seed,
            skip_batches=skip, flip_images=training and a.flip,
            crop_area=tuple(a.random_resized_crop) if training else ())

    def train_stream(self, skip_batches: int = 0, features_of=None) -> tf.data.Dataset:
        if features_of is not None:
            raise ValueError("Object detection has no feature caching (data.cache_features).")
        return self._stream("train", True, skip_batches)

    def eval_stream(self, split: str = "val", features_of=None) -> tf.data.Dataset:
        if features_of is not None:
            raise ValueError("Object detection has no feature caching (data.cache_features).")
        return self._stream(split, False)

    def statistics_stream(self) -> tf.data.Dataset:
        return self._stream("train", True).take(max(self.train_size // self._batch, 1))

    def val_images(self) -> np.ndarray:
        """The validation images, sized: float32 `[N, S, S, 3]`."""
        return self._sized["val"][0]


class ObjectDetection(base.Task):
    """Object detection (see the module docstring)."""

    name = "object_detection"
    main_metric = "map"
    checks_bn_gap = False

    def __init__(self):
        self._num_classes = None  # set by build_model, for the loss
        self._data = None  # set by load_data: build_model gives it the anchors

    def logged_metrics(self) -> list[str]:
        return ["val_loss", "val_map", "val_ap50", "val_ap75", "loss"]

    def resolve_options(self, config) -> DetectionSpec:
        d = config.detection
        return DetectionSpec(
            fpn_filters=checks.integer(d.fpn_filters, "detection.fpn_filters", 8, 1024),
            head_convs=checks.integer(d.head_convs, "detection.head_convs", 0, 8),
            anchor_size=checks.number(d.anchor_size, "detection.anchor_size", 0.5, 16),
            score_threshold=checks.number(d.score_threshold, "detection.score_threshold", 0, 1,
                                          open_high=True),
            max_detections=checks.integer(d.max_detections, "detection.max_detections", 1, 1000),
        )

    def check(self, spec) -> None:
        a = spec.data.augment
        extra = [name for name, on in (("randaugment_ops", a.randaugment_ops), ("mixup", a.mixup),
                                       ("cutmix", a.cutmix)) if on]
        if extra:
            raise ValueError(
                f"data.augment.{extra[0]} does not move boxes: detection augments with the joint "
                "flip and random_resized_crop only; turn it off.")
        if spec.model.dropout:
            raise ValueError(f"model.dropout={spec.model.dropout}: the detector's head has no "
                             "dropout layer; set model.dropout=0.")
        if spec.data.resize != "resize":
            raise ValueError(
                f"data.resize={spec.data.resize!r}: detection stretches whole images to the "
                "input size (a crop would cut boxes off, unseen): set data.resize='resize'.")
        if spec.train.label_smoothing:
            raise ValueError("train.label_smoothing smooths a softmax's labels; the detector's "
                             "focal loss has none: set train.label_smoothing=0.")
        if spec.data.class_weights:
            raise ValueError("data.class_weights weighs images by class; a detection image holds "
                             "objects of several classes: set data.class_weights=False.")

    def load_data(self, spec) -> DetData:
        dataset, report = sources.load_det_source(resolve_source(spec.data.source),
                                                  spec.data.bad_files)
        train_set, val_set = sources.split_for_run(dataset, spec.data, spec.seed)
        self._data = DetData(spec, dataset, train_set, val_set, report)
        return self._data

    def build_model(self, spec, class_names: list[str]) -> detector_lib.Detector:
        m, d = spec.model, spec.task_options
        net, preprocessing = model_lib.load_backbone(
            m.backbone, m.image_size, m.weights, m.weights_sha256, m.fold_dead_channels)
        self._num_classes = len(class_names)
        model = detector_lib.Detector(
            net, len(class_names), preprocessing, m.backbone, class_names=class_names,
            fpn_filters=d.fpn_filters, head_convs=d.head_convs, anchor_size=d.anchor_size)
        if self._data is not None:  # its streams match the anchors
            self._data.anchors = (model.anchor_boxes, model.anchor_spec)
        return model

    def loss_and_metrics(self, spec) -> tuple:
        if self._num_classes is None:
            raise ValueError("Build the detector before its loss.")
        return metrics_lib.DetectionLoss(self._num_classes), []

    def export(self, model, path: str, class_names: list[str], spec) -> str:
        d = spec.task_options
        return detector_lib.export_saved_model(model, path, class_names, d.max_detections,
                                               d.score_threshold)

    # ------------------------------------------------------------- evaluation

    def coco(self, model, data: DetData) -> dict:
        """`metrics.coco_evaluate` of `model` on the validation images, in
        their own pixels, and the detections themselves."""
        return self.coco_on(model, data.val_set, data.options, data._batch, data.val_images())

    def coco_on(self, model, images, options: DetectionSpec, batch: int, sized=None) -> dict:
        """`coco` on any `sources.DetSet` (`sized`: its images at the model's
        size, `stream.size_all`, if already made)."""
        if getattr(self, "_predicting", (None,))[0] is not model:  # traced once per model
            self._predicting = (model, detector(model, options.max_detections,
                                                options.score_threshold))
        if sized is None:
            sized = stream.size_all(images, model.image_size)[0]
        found = predict(self._predicting[1], sized, images.sizes, batch)
        truth = metrics_lib.coco_ground_truth(images.boxes, images.classes, images.sizes,
                                              images.class_names)
        result = metrics_lib.coco_evaluate(truth, metrics_lib.coco_detections(found))
        result["detections"] = found
        return result

    def evaluate(self, model, data: DetData) -> dict:
        result = self.coco(model, data)
        # The report after training is of the weights evaluated last: kept,
        # with their fingerprint, so that it needs no second pass.
        self._evaluated = (checkpoint.fingerprint(model), result)
        return {k: v for k, v in result.items() if isinstance(v, float)}

    def epoch_callbacks(self, model, data: DetData) -> list:
        def evaluate():
            if model.ema is not None:  # validate the average, as ValidateAverage does
                model.ema.exchange()
            try:
                return self.evaluate(model, data)
            finally:
                if model.ema is not None:
                    model.ema.exchange()

        return [metrics_lib.EpochEvaluation(evaluate)]

    def after_training(self, model, data: DetData, out: str) -> None:
        """Writes OUT/report/: per-class AP, PR curves at IoU 0.5 and
        validation images with their true and detected boxes."""
        from keras_ft.detection import report

        weights, result = getattr(self, "_evaluated", (None, None))
        if weights != checkpoint.fingerprint(model):
            result = self.coco(model, data)
        directory = os.path.join(out, REPORT_DIR)
        report.write_report(directory, result, data.val_set, data.class_names)
        logging.info("Detection report in %s: mAP %.4f, AP50 %.4f, AP75 %.4f.", directory,
                     result["map"], result["ap50"], result["ap75"])


def detector(model, max_detections: int = 100, score_threshold: float = 0.05):
    """A graph function of sized images `[N, S, S, 3]` and their original
    sizes `[N, 2]` to `model`'s detections in those sizes' pixels (a tuple
    of `boxes.Detections`' fields)."""
    anchor_boxes = tf.constant(model.anchor_boxes)
    side = model.image_size

    @tf.function(input_signature=[tf.TensorSpec([None, side, side, 3], tf.float32),
                                  tf.TensorSpec([None, 2], tf.int32)])
    def detect(x, hw):
        found = boxes_lib.detect(anchor_boxes, model(x, training=False), model.num_classes,
                                 max_detections=max_detections, score_threshold=score_threshold)
        return (detector_lib.to_input_pixels(found.boxes, hw, model.image_size), found.scores,
                found.classes, found.count)

    return detect


def predict(detect, images: np.ndarray, sizes: np.ndarray, batch: int) -> list[dict]:
    """Per image of `images` (float32 `[N, S, S, 3]`, sized), its detections
    by `detect` (`detector`) in its own pixels (`sizes` `[N, 2]`: height,
    width): dicts of `boxes` [k, 4] xyxy, `scores` [k], `classes` [k]."""
    out = []
    for start in range(0, len(images), batch):
        found = boxes_lib.Detections(*detect(
            tf.constant(images[start:start + batch]),
            tf.constant(np.asarray(sizes[start:start + batch], np.int32))))
        out.extend(detector_lib.detections_as_numpy(found))
    return out

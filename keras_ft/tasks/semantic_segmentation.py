"""Semantic segmentation: a class per pixel, on the same backbones and recipe.

Data: pairs of an image and a mask of class indices (`keras_ft.seg_data`:
folders `images/` + `masks/` matched by stem, a CSV with `image,mask`
columns, TFDS datasets with a mask feature, or `sample:fashion_seg`, real
Fashion-MNIST garments composited on real photos, `keras_ft.seg_samples`);
every pair checked before training (a missing mask, a size mismatch, a
label outside the classes: one line naming the file); the split is the
source's own or seeded. The stream resizes images bilinearly and masks by
nearest neighbour, and flips both together, seeded by position, so resume
is exact. Pixels labelled 255 are ignored by the loss and the metrics.
Model: `keras_ft.seg_model.Segmenter` (DeepLabV3+ decoder on the block
map's stride-4 and deepest features). Loss: per-pixel cross-entropy
(`data.class_weights`: inverse pixel frequency). Main metric: mean IoU over
the whole validation set (`val_mean_iou`); pixel accuracy too. After
training: `WORKDIR/report/` (per-class IoU, confusion matrix, examples).
Export: raw image bytes of any size in, a class per pixel at that size out.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
from absl import logging

from keras_ft import model as model_lib, seg_data, seg_metrics, seg_model
from keras_ft import seg_samples
from keras_ft.tasks import base

REPORT_DIR = "report"
_SAMPLE = "sample:fashion_seg"
_EXAMPLES = 6  # validation images in the report's figure


def resolve_source(source: str) -> str:
    """`sample:fashion_seg` (or `sample:fashion_seg_N`: N images) as the
    folder it is built into once; any other source as it is."""
    if source == _SAMPLE or source.startswith(_SAMPLE + "_"):
        count = source[len(_SAMPLE) + 1:]
        if count and not count.isdigit():
            raise ValueError(f"data.source={source!r}: use {_SAMPLE} or {_SAMPLE}_N (N images).")
        return "folder:" + (seg_samples.materialize(int(count)) if count else seg_samples.materialize())
    return source


def load_splits(data_spec, seed: int):
    """`(dataset, train_set, val_set, report)` of a segmentation run."""
    dataset, report = seg_data.load_seg_source(resolve_source(data_spec.source),
                                               data_spec.num_classes)
    train_set, val_set = seg_data.split_for_run(dataset, data_spec, seed)
    return dataset, train_set, val_set, report


class SegData(base.TaskData):
    """The pairs of a run, split, with their streams."""

    def __init__(self, spec, dataset, train_set, val_set, scan_report):
        self._keep(spec, dataset, train_set, val_set, scan_report)
        self._size = spec.model.image_size
        # Every pair decoded and sized once, kept in memory (N x S x S x 13 bytes).
        self._sized = {split: seg_data.size_seg_all(pairs, self._size)
                       for split, pairs in (("train", train_set), ("val", val_set))}

    def describe(self) -> list[str]:
        d = self._spec.data
        return [
            f"Data {d.source}: {self.train_size} train / {self.val_size} validation image/mask "
            f"pairs ({self._split_description()}), {len(self.class_names)} classes ({', '.join(self.class_names[:10])}).",
            f"Images resized to {self._size} px (bilinear), masks by nearest neighbour; "
            f"augmentation: {'joint left-right flip' if d.augment.flip else 'none'}; "
            f"label {seg_data.IGNORE_LABEL} is ignored.",
        ]

    def _stream(self, split: str, training: bool, skip: int = 0, flip: bool = False):
        pairs = {"train": self.train_set, "val": self.val_set}
        if split not in pairs:
            raise ValueError(f"Unknown split {split!r}. Choose one of: train, val.")
        return seg_data.make_seg_dataset(pairs[split], self._size, self._batch, training,
                                         seed=self._spec.seed, skip_batches=skip, flip=flip,
                                         sized=self._sized[split])

    def train_stream(self, skip_batches: int = 0, features_of=None) -> tf.data.Dataset:
        if features_of is not None:
            raise ValueError("Segmentation has no feature caching (data.cache_features).")
        return self._stream("train", True, skip_batches, flip=self._spec.data.augment.flip)

    def eval_stream(self, split: str = "val", features_of=None) -> tf.data.Dataset:
        if features_of is not None:
            raise ValueError("Segmentation has no feature caching (data.cache_features).")
        return self._stream(split, False)

    def statistics_stream(self) -> tf.data.Dataset:
        return self._stream("train", True).take(max(self.train_size // self._batch, 1))

    def class_weight(self):
        return None  # per-pixel weights are the loss's (SegmentationTask.loss_and_metrics)

    def pixel_counts(self) -> np.ndarray:
        """Training pixels per class, at the model's size (for class weights)."""
        counts = np.zeros(len(self.class_names), np.int64)
        for _, masks in self._stream("train", False):
            m = masks.numpy().ravel()
            m = m[m != seg_data.IGNORE_LABEL]
            counts += np.bincount(m, minlength=len(counts))[:len(counts)]
        return counts


class SemanticSegmentation(base.Task):
    """Semantic segmentation (see the module docstring)."""

    name = "semantic_segmentation"
    main_metric = "mean_iou"

    def logged_metrics(self) -> list[str]:
        return super().logged_metrics() + ["val_pixel_accuracy", "pixel_accuracy"]

    def __init__(self):
        # What loss_and_metrics needs besides the spec: the number of classes
        # (set by build_model) and, with data.class_weights, the training
        # pixels' class frequencies (set by load_data).
        self._num_classes = None
        self._class_weights = None

    def load_data(self, spec) -> SegData:
        data = SegData(spec, *load_splits(spec.data, spec.seed))
        if spec.data.class_weights:
            counts = data.pixel_counts().astype(np.float64)
            present = counts > 0
            w = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
            self._class_weights = [float(v) for v in w]
            logging.info("Pixel class weights (inverse frequency): %s.", ", ".join(
                f"{name} {v:.3g}" for name, v in zip(data.class_names, w)))
        return data

    def build_model(self, spec, class_names: list[str]) -> seg_model.Segmenter:
        m = spec.model
        net, preprocessing = model_lib.load_backbone(
            m.backbone, m.image_size, m.weights, m.weights_sha256, m.fold_dead_channels)
        self._num_classes = len(class_names)
        return seg_model.Segmenter(net, len(class_names), preprocessing, m.backbone,
                                   class_names=class_names, dropout=m.dropout)

    def loss_and_metrics(self, spec) -> tuple:
        if self._num_classes is None:
            raise ValueError("Build the segmentation model before its loss and metrics.")
        n = self._num_classes
        return (seg_metrics.PixelCrossentropy(class_weights=self._class_weights),
                [seg_metrics.MeanIoU(n), seg_metrics.PixelAccuracy(n)])

    def export(self, model, path: str, class_names: list[str], spec) -> str:
        return seg_model.export_saved_model(model, path, class_names)

    def after_training(self, model, data: SegData, out: str) -> None:
        """Writes OUT/report/: per-class IoU, the confusion matrix and a few
        validation images beside their truth and prediction."""
        n = len(data.class_names)
        matrix = np.zeros((n, n), np.int64)
        shown = ([], [], [])
        for images, masks in data.eval_stream("val"):
            predicted = tf.argmax(model(images, training=False), axis=-1).numpy()
            truth = masks.numpy()
            matrix += seg_metrics.confusion_matrix(truth, predicted, n)
            if len(shown[0]) < _EXAMPLES:
                for part, value in zip(shown, (images.numpy().astype(np.uint8), truth, predicted)):
                    part.extend(value[:_EXAMPLES - len(part)])
        directory = os.path.join(out, REPORT_DIR)
        os.makedirs(directory, exist_ok=True)
        seg_metrics.write_report(directory, matrix, data.class_names,
                                 examples=tuple(np.stack(p) for p in shown))
        logging.info("Segmentation report in %s: mean IoU %.4f, pixel accuracy %.4f.", directory,
                     seg_metrics.mean_iou(matrix), seg_metrics.pixel_accuracy(matrix))

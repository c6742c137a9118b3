"""Single-label image classification: the first task.

Data: an image source (`keras_ft.sources`), every file checked before
training (`keras_ft.validate`), split by the source's own train/validation
split or by seed; streams from `keras_ft.data` (sized by the run's resize
policy, augmented by `keras_ft.augment`; decoded images kept in memory when
they fit, `data.cache_images_mb`; the frozen backbone's features cached for
a head-only first stage, `data.cache_features`).
Model: `keras_ft.model.Classifier` (backbone, pooling, dropout, Dense head).
Loss: sparse categorical cross-entropy, or categorical on the soft labels
of MixUp/CutMix. Main metric: accuracy. Export: the SavedModel of
`keras_ft.export` (encoded image bytes, or uint8 arrays, of any size).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_ft import augment, data as data_lib, export, features, model as model_lib
from keras_ft import sources, spec as spec_lib, validate
from keras_ft.tasks import base


def load_splits(data_spec, seed: int):
    """The images of a run, split as every entry point must split them.

    Every image is checked first (`keras_ft.validate`): bad ones are skipped
    and listed, or stop the run (`data.bad_files`), never dropped silently or
    met halfway through an epoch. Then the source's own train/validation
    split (train/ and val/ folders, `data.tfds.val_split`) if it has one,
    else the seeded, stratified split.

    Args:
        data_spec: the run's `spec.data` (a `keras_ft.spec.DataSpec`), or a
            `data` sub-config (ConfigDict or saved dict) to resolve.
        seed: the run's seed.

    Returns:
        `(dataset, train_set, val_set, scan_report)`.
    """
    if not isinstance(data_spec, spec_lib.DataSpec):
        data_spec = spec_lib.resolve_data(data_spec)
    t = data_spec.tfds
    dataset = sources.load_source(
        data_spec.source,
        num_classes=data_spec.num_classes,
        tfds_split=t.split,
        tfds_val_split=t.val_split,
        tfds_data_dir=t.data_dir,
        tfds_download=t.download,
        tfds_image_key=t.image_key,
        tfds_label_key=t.label_key,
    )
    dataset, scan_report = validate.scan(
        dataset, policy=data_spec.bad_files, num_classes=data_spec.num_classes or None
    )
    train_set, val_set = data_lib.split_for_run(dataset, data_spec, seed)
    return dataset, train_set, val_set, scan_report


class ImageData(base.TaskData):
    """The images of a run, split, with their training and evaluation streams.

    Args:
        spec: the run's `RunSpec`.
        dataset, train_set, val_set, scan_report: from `load_splits`.
    """

    def __init__(self, spec, dataset, train_set, val_set, scan_report):
        self._keep(spec, dataset, train_set, val_set, scan_report)
        self._image_size = spec.model.image_size
        self._sized = data_lib.SizedCache(
            self._image_size, spec.data.resize, spec.data.cache_images_mb
        )
        self._features = None  # keras_ft.features.Cache, built on first use
        d = spec.data
        self.pipeline, self._pipeline_why = data_lib.choose_pipeline(
            d.pipeline, train_set, self._image_size, d.cache_images_mb, d.augment.mixes
        )

    def describe(self) -> list[str]:
        d = self._spec.data
        return [
            f"Data {d.source}: {self.train_size} train / {self.val_size} validation images "
            f"({self._split_description()}), {len(self.class_names)} classes ({', '.join(self.class_names[:10])}).",
            f"Images: {d.resize} to {self._image_size} px; augmentation: {d.augment.describe()}.",
            f"Input pipeline: {self.pipeline} ({self._pipeline_why}): " + (
                "each worker reads and decodes only its share of every batch, by index."
                if self.pipeline == "stream" else
                "every worker runs the whole stream and keeps its replicas' share."),
        ]

    def _images(self, split: str) -> data_lib.ImageSet:
        if split not in ("train", "val"):
            raise ValueError(f"Unknown split {split!r}. Choose one of: train, val.")
        return self.train_set if split == "train" else self.val_set

    def _cached_features(self, model) -> features.Cache:
        if self._features is None:
            d = self._spec.data
            self._features = features.compute(
                model, self.train_set, self.val_set, self._image_size, self._batch,
                d.resize, d.augment, one_hot=d.augment.mixes,
            )
        return self._features

    def train_stream(
        self, skip_batches: int = 0, features_of=None, input_context=None
    ) -> tf.data.Dataset:
        d, seed = self._spec.data, self._spec.seed
        if features_of is not None:  # the same stream, on the frozen backbone's features
            return features.training_stream(
                self._cached_features(features_of), self._batch, seed, skip_batches, d.augment
            )
        # random_resized_crop crops the originals: no sized copy for training.
        sized = None if d.augment.random_resized_crop else self._train_sized()
        return data_lib.make_dataset(
            self.train_set, self._image_size, self._batch, training=True, seed=seed,
            skip_batches=skip_batches, resize=d.resize, augment=d.augment,
            one_hot=d.augment.mixes, sized=sized, input_context=input_context,
        )

    def _train_sized(self):
        """The training images decoded and sized, kept (memory pipeline, when
        they fit data.cache_images_mb); None: decoded at every pass."""
        if self.pipeline == "stream":
            return None
        return self._sized.get("train", self.train_set)

    def train_input(self, strategy, skip_batches: int = 0, features_of=None):
        if features_of is not None or self.pipeline != "stream":
            return super().train_input(strategy, skip_batches, features_of)
        weights = self.class_weight()

        def stream(context):
            ds = self.train_stream(skip_batches, input_context=context)
            if weights is None:
                return ds
            table = tf.constant([weights[c] for c in range(len(self.class_names))], tf.float32)
            # As fit(class_weight=...) would: the weight of each image's class.
            return ds.map(lambda x, y: (x, y, tf.gather(
                table, tf.argmax(y, -1) if y.shape.rank == 2 else y)))

        return strategy.distribute_datasets_from_function(stream), None

    def eval_stream(self, split: str = "val", features_of=None) -> tf.data.Dataset:
        images = self._images(split)
        if features_of is not None:
            if split != "val":
                raise ValueError("Cached features evaluate the validation split only.")
            return features.validation_stream(self._cached_features(features_of), self._batch)
        d = self._spec.data
        return data_lib.make_dataset(
            images, self._image_size, self._batch, training=False, resize=d.resize,
            one_hot=d.augment.mixes, sized=self._sized.get(split, images),
        )

    def chance_level(self) -> float:
        return self._majority_share()

    def statistics_stream(self) -> tf.data.Dataset:
        # The training stream's first pass (a seeded permutation), not augmented.
        d = self._spec.data
        return data_lib.make_dataset(
            self.train_set, self._image_size, self._batch, training=True,
            seed=self._spec.seed, resize=d.resize, augment=augment.Augment(flip=False),
            sized=self._train_sized(),
        ).take(max(len(self.train_set) // self._batch, 1))

    def class_weight(self) -> dict[int, float] | None:
        return self._label_class_weights()


@keras.saving.register_keras_serializable(package="keras_ft")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of logits against smoothed targets, from integer labels:

        t = (1 − ε)·onehot(y) + ε / K        (K classes; Szegedy et al., 2016)
        loss = −Σ_k t_k · log softmax(logits)_k

    Keras' sparse cross-entropy has no smoothing; its categorical one does,
    with this same formula, but needs one-hot labels.

    Args:
        label_smoothing: ε in [0, 1).
    """

    def __init__(self, label_smoothing: float, name="smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        targets = tf.one_hot(labels, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            targets, y_pred, from_logits=True, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return dict(super().get_config(), label_smoothing=self.label_smoothing)


class ImageClassification(base.Task):
    """Single-label image classification (see the module docstring)."""

    name = "image_classification"
    main_metric = "accuracy"
    caches_features = True
    streams = True

    def load_data(self, spec) -> ImageData:
        return ImageData(spec, *load_splits(spec.data, spec.seed))

    def build_model(self, spec, class_names: list[str]) -> model_lib.Classifier:
        # The configured weights are loaded even when a checkpoint will
        # replace them: they also decide the preprocessing and BatchNorm
        # epsilon, which a checkpoint does not hold.
        m = spec.model
        return model_lib.build_classifier(
            m.backbone,
            num_classes=len(class_names),
            image_size=m.image_size,
            weights=m.weights,
            weights_sha256=m.weights_sha256,
            dropout=m.dropout,
            class_names=class_names,
            fold_dead_channels=m.fold_dead_channels,
        )

    def loss_and_metrics(self, spec) -> tuple:
        """Integer labels, or one-hot (soft) labels when `data.augment` mixes
        batches (MixUp/CutMix). Either way the metric is named "accuracy"
        (history.csv, metrics.json); with mixed labels it is agreement with
        the dominant label. `train.label_smoothing` smooths either kind of
        target (`SmoothedSparseCrossentropy` for integer labels)."""
        smoothing = spec.train.label_smoothing
        if spec.data.augment.mixes:
            return (
                keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing),
                [keras.metrics.CategoricalAccuracy(name="accuracy")],
            )
        if smoothing:
            return SmoothedSparseCrossentropy(smoothing), ["accuracy"]
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]

    def export(self, model, path: str, class_names: list[str], spec) -> str:
        return export.export_saved_model(
            model, path, class_names, spec.model.image_size, resize=spec.data.resize
        )

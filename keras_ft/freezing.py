"""Which parts of the classifier train, stage by stage.

Freezing is by architectural block (ResNet stage, MobileNetV2 block, ...), as
given by the backbone registry's block map, never by a raw layer count. A
schedule is a list of `Stage`s; `StageSchedule` switches between them inside
one `fit()` by changing `trainable` flags and retracing the train step; the
optimizer was built once over every tunable variable, so nothing is recompiled
and the velocity of variables that were already training is kept.

BatchNorm policy:
    frozen     every BatchNorm layer runs in inference mode and neither its
               moving statistics nor its γ/β change, even in blocks that
               otherwise train (the Keras transfer-learning guide's advice).
    trainable  BatchNorm layers in trainable blocks train as usual.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import keras
from absl import logging

from keras_ft import backbones

BN_POLICIES = ("frozen", "trainable")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a freezing schedule.

    Attributes:
        epochs: length of the stage; the last stage also runs for any epochs
            left after the schedule ends.
        blocks: how many backbone blocks train, counted from the top:
            0 trains the head alone (linear probe), -1 trains every block.
        lr_scale: multiplies the learning rate during the stage.
    """

    epochs: int
    blocks: int = 0
    lr_scale: float = 1.0


def parse_stages(stages: Sequence[Mapping]) -> list[Stage]:
    """Stages from config entries such as `{"epochs": 2, "blocks": 0}`."""
    fields = {f.name for f in dataclasses.fields(Stage)}
    parsed = []
    for i, entry in enumerate(stages):
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(
                f"freeze.stages[{i}] has unknown key(s) {sorted(unknown)}; "
                f"valid keys: {sorted(fields)}."
            )
        stage = Stage(**dict(entry))
        if stage.epochs < 1 or stage.blocks < -1 or stage.lr_scale <= 0:
            raise ValueError(
                f"freeze.stages[{i}] = {dict(entry)}: need epochs >= 1, "
                "blocks >= -1 (-1 = all) and lr_scale > 0."
            )
        parsed.append(stage)
    if not parsed:
        raise ValueError("freeze.stages is empty; give at least one stage.")
    return parsed


def stage_index(stages: Sequence[Stage], epoch: int) -> int:
    """Index of the stage that epoch `epoch` (0-based) belongs to."""
    end = 0
    for i, stage in enumerate(stages):
        end += stage.epochs
        if epoch < end:
            return i
    return len(stages) - 1


def apply_stage(model, stage: Stage, bn_policy: str = "frozen") -> int:
    """Sets `trainable` flags on `model` (a `Classifier`) for `stage`.

    Returns:
        The number of trainable parameters after the change.
    """
    if bn_policy not in BN_POLICIES:
        raise ValueError(
            f"Unknown BatchNorm policy {bn_policy!r}. Choose one of: "
            + ", ".join(BN_POLICIES)
        )
    blocks = backbones.block_map(model.backbone, model.backbone_name)
    first_trained = 0 if stage.blocks == -1 else max(len(blocks) - stage.blocks, 0)
    model.backbone.trainable = True
    for i, (_, layers) in enumerate(blocks):
        for layer in layers:
            layer.trainable = i >= first_trained
    if bn_policy == "frozen":
        for layer in model.backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return sum(int(keras.ops.size(v)) for v in model.trainable_variables)


class StageSchedule(keras.callbacks.Callback):
    """Switches freezing stages at epoch boundaries inside one `fit()`.

    Works in a plain `model.fit` of a `keras_ft.Classifier` compiled with
    `keras_ft.optim.SGD`, alongside any other callbacks.

    Args:
        stages: the schedule.
        bn_policy: one of `BN_POLICIES`.
    """

    def __init__(self, stages: Sequence[Stage], bn_policy: str = "frozen"):
        super().__init__()
        self.stages = list(stages)
        self.bn_policy = bn_policy
        self.current = None

    def on_epoch_begin(self, epoch, logs=None):
        index = stage_index(self.stages, epoch)
        if index == self.current:
            return
        stage = self.stages[index]
        params = apply_stage(self.model, stage, self.bn_policy)
        self.model.optimizer.lr_scale.assign(stage.lr_scale)
        # The train step was traced for the old variable set.
        self.model.make_train_function(force=True)
        self.current = index
        logging.info(
            "Stage %d/%d from epoch %d: %s, lr x %g, %s trainable parameters.",
            index + 1, len(self.stages), epoch + 1,
            "head only" if stage.blocks == 0 else
            "all blocks" if stage.blocks == -1 else f"top {stage.blocks} block(s)",
            stage.lr_scale, f"{params:,}",
        )

"""Freezing schedules as data: which backbone blocks train, for how long.

A schedule is a sequence of stages; each trains the new head plus the top
`blocks` blocks of the backbone (0 = head only, -1 = every block) for a number
of `epochs` or optimizer `steps`, at `lr_scale` times the learning rate. The
last stage also runs for whatever the run has left. Presets build the common
recipes; config files use them directly (this module imports no TensorFlow):

    from keras_ft import stages
    config.freeze.stages = stages.lp_ft(probe_epochs=3, lr_scale=0.1)

Presets:
    head(epochs)                 linear probe: the head alone.
    last_k_blocks(k, epochs)     the head and the top k blocks.
    all_blocks(epochs)           everything.
    gradual(every, blocks)       ULMFiT's gradual unfreezing (Howard & Ruder,
                                 2018): head alone, then one more block from
                                 the top every `every` epochs (or steps).
    lp_ft(probe_epochs)          LP-FT (Kumar et al., 2022): train the head
                                 first, then everything at a lower rate, so
                                 the pretrained features are not distorted by
                                 a random head's gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

# ULMFiT's discriminative fine-tuning: each block down from the top learns
# 2.6 times slower than the one above it.
ULMFIT_LR_DECAY = 1 / 2.6


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a freezing schedule.

    Attributes:
        epochs: length in epochs (give this or `steps`).
        steps: length in optimizer steps (give this or `epochs`).
        blocks: backbone blocks that train, counted from the top:
            0 trains the head alone, -1 trains every block.
        lr_scale: multiplies the learning rate during the stage.
    """

    epochs: int = 0
    steps: int = 0
    blocks: int = 0
    lr_scale: float = 1.0

    def describe(self) -> str:
        what = (
            "head only" if self.blocks == 0
            else "all blocks" if self.blocks == -1
            else f"top {self.blocks} block(s)"
        )
        return f"{what}, lr x {self.lr_scale:g}"


def parse(stages: Sequence[Mapping | Stage]) -> list[Stage]:
    """Validated stages from config entries such as `{"epochs": 2, "blocks": 0}`.

    Raises:
        ValueError: one line naming the entry (`freeze.stages[1].epochs`), its
            value and what it must be.
    """
    from keras_ft import checks  # no TensorFlow there either

    fields = {f.name for f in dataclasses.fields(Stage)}
    if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence):
        raise ValueError(
            f"freeze.stages must be a sequence of dicts such as (dict(epochs=1, blocks=0),), "
            f"got {stages!r:.80}."
        )
    parsed = []
    for i, entry in enumerate(stages):
        key = f"freeze.stages[{i}]"
        if isinstance(entry, Stage):
            entry = dataclasses.asdict(entry)
        if not isinstance(entry, Mapping):
            raise ValueError(f"{key} must be a dict such as dict(epochs=1, blocks=0), got {entry!r:.80}.")
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(
                f"{key} has unknown key(s) {sorted(map(str, unknown))}; "
                f"valid keys: {sorted(fields)}."
            )
        stage = Stage(**dict(entry))
        checks.integer(stage.epochs, f"{key}.epochs", 0)
        checks.integer(stage.steps, f"{key}.steps", 0)
        checks.integer(stage.blocks, f"{key}.blocks", -1, note=" (-1 = all)")
        checks.number(stage.lr_scale, f"{key}.lr_scale", 0, open_low=True)
        if (stage.epochs > 0) == (stage.steps > 0):
            raise ValueError(
                f"{key} = {dict(entry)}: give a positive length in "
                "exactly one of 'epochs' or 'steps'."
            )
        parsed.append(stage)
    if not parsed:
        raise ValueError("freeze.stages is empty; give at least one stage.")
    return parsed


def stage_index(
    stages: Sequence[Stage], epoch: int, step: int, steps_per_epoch: int | None
) -> int:
    """Index of the stage in force at `step` (0-based, counted over the run).

    `epoch` is the 0-based epoch of that step. Stage lengths in steps need
    `steps_per_epoch` to mix with lengths in epochs.
    """
    uses_steps = any(s.steps for s in stages)
    if uses_steps and not steps_per_epoch:
        raise ValueError(
            "Stages measured in steps need a known number of steps per epoch: "
            "pass steps_per_epoch to fit()."
        )
    end = 0
    for i, stage in enumerate(stages):
        if uses_steps:
            end += stage.steps or stage.epochs * steps_per_epoch
            if step < end:
                return i
        else:
            end += stage.epochs
            if epoch < end:
                return i
    return len(stages) - 1


def block_lr_multipliers(num_blocks: int, decay: float) -> list[float]:
    """Per-block learning-rate multipliers, stem first: `decay ** depth`.

    The top block gets `decay`, the one below `decay**2`, and so on (the head
    keeps 1). `decay=1` gives every block the full rate; `ULMFIT_LR_DECAY`
    is ULMFiT's preset.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"freeze.lr_decay must be in [0, 1], got {decay}.")
    return [decay ** (num_blocks - i) for i in range(num_blocks)]


def _stage(length: int, unit: str, **kwargs) -> dict:
    if unit not in ("epochs", "steps"):
        raise ValueError(f"unit must be 'epochs' or 'steps', got {unit!r}.")
    return {unit: length, **kwargs}


def head(epochs: int = 1) -> tuple[dict, ...]:
    """Linear probe: only the new head trains."""
    return (_stage(epochs, "epochs", blocks=0),)


def last_k_blocks(k: int, epochs: int = 1, lr_scale: float = 1.0) -> tuple[dict, ...]:
    """The head and the top `k` backbone blocks train from the start."""
    return (_stage(epochs, "epochs", blocks=k, lr_scale=lr_scale),)


def all_blocks(epochs: int = 1, lr_scale: float = 1.0) -> tuple[dict, ...]:
    """Everything trains from the start."""
    return (_stage(epochs, "epochs", blocks=-1, lr_scale=lr_scale),)


def gradual(
    every: int, blocks: int, unit: str = "epochs", lr_scale: float = 1.0
) -> tuple[dict, ...]:
    """Head alone, then one more block from the top every `every` units.

    After `blocks` unfreezings the last stage (`blocks` blocks, or -1 for all
    when `blocks` is the whole backbone) runs to the end.
    """
    if every < 1 or blocks < 1:
        raise ValueError(f"gradual needs every >= 1 and blocks >= 1, got {every}, {blocks}.")
    return tuple(
        _stage(every, unit, blocks=k, lr_scale=lr_scale) for k in range(blocks + 1)
    )


def lp_ft(probe_epochs: int, lr_scale: float = 0.1, finetune_epochs: int = 1) -> tuple[dict, ...]:
    """Linear probe for `probe_epochs`, then every block at `lr_scale`."""
    return (
        _stage(probe_epochs, "epochs", blocks=0),
        _stage(finetune_epochs, "epochs", blocks=-1, lr_scale=lr_scale),
    )

"""Checks that a run did what it claims, before it reports success.

- `batchnorm_gap`: BatchNorm statistics that do not match the weights
  (training-mode vs inference-mode accuracy on training images).
- `check_chance_level`: a final result no better than a model that ignores
  its input (always the most frequent class) fails the run
  (`ChanceLevel`, exit 5 in `launch.train`) instead of exporting it.
- `LossGuard`: a training loss that jumps far above its recent level, or
  is not finite, stops `fit()` before anything is saved (`LossSpike`); the
  trainer rolls back to the last checkpoint and lowers that stage's rate
  (`Recoveries`), at most `train.max_recoveries` times (then
  `TooManySpikes`, exit 3).
"""

from __future__ import annotations

import json
import math
import os

import keras
import numpy as np
from absl import logging

from keras_ft import callbacks, freezing, job as job_lib, workdir as workdir_lib


class ChanceLevel(Exception):
    """The run's final validation result is at chance level; nothing was
    exported."""


# The stale-statistics check: how many training batches, and the accuracy
# difference between the two BatchNorm modes that earns a warning.
GAP_BATCHES = 10
GAP_WARNING = 0.05


def batchnorm_gap(job) -> float | None:
    """Training-mode minus inference-mode accuracy on training images, for a
    model whose final stage trains BatchNorm layers on batch statistics (None
    otherwise), logged with a warning and the fix when it exceeds
    `GAP_WARNING`: inference mode doing worse is the symptom of moving
    statistics that do not match the weights
    (`keras_ft.freezing.train_eval_gap`). Inference mode may also do better:
    batch statistics of a small batch are noisy."""
    if not job.task.checks_bn_gap:  # its outputs are not class logits
        return None
    job_lib.enter_final_stage(job)
    accuracies = freezing.train_eval_gap(job.model, job.data.statistics_stream(), GAP_BATCHES)
    if accuracies is None:
        return None
    inference, training = accuracies
    gap = training - inference
    if gap <= GAP_WARNING:  # inference mode as good: nothing stale
        logging.info(
            "BatchNorm statistics check: accuracy on training images %.3f in inference "
            "mode, %.3f on batch statistics.", inference, training,
        )
        return gap
    fix = (
        "set freeze.precise_bn='final' to recompute them under the trained weights"
        if job.spec.freeze.precise_bn == "off" else
        "raise freeze.precise_bn_batches or train.global_batch_size, or use "
        "freeze.batchnorm='frozen'"
    )
    logging.warning(
        "BatchNorm statistics look stale: accuracy on training images is %.3f in "
        "inference mode (what evaluation and the export use) but %.3f on batch "
        "statistics (as trained); %s. See docs/batchnorm.md.", inference, training, fix,
    )
    return gap


def chance_margin(chance: float, examples: int) -> float:
    """How far above `chance` a result must be to count: two standard errors
    of an accuracy of `chance` measured on `examples` examples, so that a
    model that learned nothing passes with ~2% probability; at least 0.01,
    and at most half the way to 1.0 (on a few examples even a perfect score
    is not significant, and must not fail)."""
    margin = 2 * math.sqrt(chance * (1 - chance) / max(examples, 1))
    return min(max(margin, 0.01), (1 - chance) / 2)


def check_chance_level(metrics: dict, chance: float | None, examples: int, history: list) -> None:
    """Raises `ChanceLevel` when `metrics`' main metric is within
    `chance_margin` of `chance` (the task's `TaskData.chance_level`; None:
    no check), with the likely cause read from the training history."""
    if chance is None:
        return
    name = metrics["main_metric"]
    value = metrics[name]
    if value > chance + chance_margin(chance, examples):
        return
    losses = [h["loss"] for h in history if math.isfinite(h.get("loss", math.nan))]
    accuracy = history[-1].get("accuracy") if history else None
    if len(losses) > 1 and losses[-1] > losses[0]:
        cause = (
            f"the training loss rose from {losses[0]:.3g} (epoch 1) to {losses[-1]:.3g}: "
            "the learning rate is too high for a stage; lower optimizer.learning_rate "
            "(python -m launch.lr_find shows the range) or set optimizer.clip_norm=1.0"
        )
    elif accuracy is not None and accuracy > chance + 0.2:
        cause = (
            f"training accuracy is {accuracy:.3f}: what trains does not carry to "
            "evaluation; check bn_train_eval_gap (BatchNorm statistics, "
            "docs/batchnorm.md) and that the validation data looks like the training data"
        )
    else:
        cause = (
            "nothing was learned: train longer, raise optimizer.learning_rate, or "
            "check the labels (data_scan.json)"
        )
    raise ChanceLevel(
        f"{name} {value:.3f} is chance level (a model that always predicts the most "
        f"frequent class scores {chance:.3f} on these {examples} examples); likely "
        f"cause: {cause}. Nothing was exported; the checkpoints and metrics.json are kept."
    )


# ------------------------------------------------------------- loss spikes

# The level a batch's loss is compared with: the median of the last
# SPIKE_WINDOW accepted batch losses, once there are SPIKE_MIN_WINDOW.
SPIKE_WINDOW = 50
SPIKE_MIN_WINDOW = 20
# The run's starting level: the highest loss of its first steps, about the
# loss of the model before it learned anything (ln C for a new head).
SPIKE_START_STEPS = 5
# How far above that level a spike must go: a batch barely above it is one
# hard batch late in a run, not a collapse (measured: 1.03 against a start
# of 1.00, the same batch after every rollback, in the quickstart's BitFit
# preset; the collapses of BatchNorm frozen reached 10 to 75 from 0.8).
SPIKE_START_MARGIN = 2.0


class LossSpike(Exception):
    """The loss of one training step jumped above its level (or is not
    finite); `fit()` stopped before the step could be saved."""

    def __init__(self, epoch: int, step: int, global_step: int, loss: float, level: float | None):
        self.epoch, self.step, self.global_step = epoch, step, global_step
        self.loss, self.level = loss, level
        what = (
            f"{loss:.4g} is not finite" if not math.isfinite(loss)
            else f"{loss:.4g} is {loss / level:.1f}x its recent level {level:.4g}, and over "
            f"{SPIKE_START_MARGIN:g}x where the run started"
        )
        super().__init__(f"Training loss at epoch {epoch + 1}, step {step} (global step {global_step}): {what}.")


class TooManySpikes(FloatingPointError):
    """The run spiked again after `train.max_recoveries` rollbacks."""


class LossGuard(callbacks.ResumableStep, keras.callbacks.Callback):
    """Raises `LossSpike` after a training step whose loss is not finite, or
    (with `factor` > 0) more than `factor` times the median of the last
    `SPIKE_WINDOW` step losses and `SPIKE_START_MARGIN` times the run's
    starting level (the highest loss of its first `SPIKE_START_STEPS`
    steps): a model doing far worse than before it learned. Late in a run, when the loss is small, a batch
    many times the median is ordinary noise (measured: 4.7x at a level of
    0.18 on Fashion-MNIST, 117x at 0.0012 on the quickstart's faces); a
    collapse goes far above where training began. Put it before the
    checkpoint callback: a spiking step is never saved.

    The step's own loss is read from the loss metric's sums (its change over
    the step; the logs carry the epoch's running mean), so it is the loss of
    the global batch under any strategy. The window is part of the run's
    state (`state()`, `restore()`): a resumed run judges each step as an
    uninterrupted one does.

    A stage switch that changes which BatchNorm layers normalise with batch
    statistics changes the function itself, whatever the rate (measured: the
    loss of the quickstart recipe on Fashion-MNIST jumps 5x when its top
    blocks' BatchNorm starts training, and stays there at any rate): the
    window starts afresh then, judging only non-finite losses until it
    refills.

    Args:
        factor: the jump that counts as a spike; 0: only non-finite losses.
        steps_per_epoch: the run's steps per epoch (for the global step).
        regime: a function of no arguments whose value changes when the
            function trained changes (the number of BatchNorm layers on
            batch statistics); default: never.
    """

    def __init__(self, factor: float, steps_per_epoch: int, regime=None):
        super().__init__()
        self.factor = factor
        self.steps_per_epoch = steps_per_epoch
        self.regime = regime or (lambda: None)
        self._regime = None
        self.window: list[float] = []
        self.start_level = None  # the highest loss of the run's first steps
        self.max_ratio = 0.0  # the largest loss / level of an accepted step
        self._epoch = 0
        self._before = (0.0, 0.0)

    def state(self) -> dict:
        return {
            "loss_window": list(self.window), "loss_start_level": self.start_level,
            "loss_max_ratio": self.max_ratio, "loss_regime": self._regime,
        }

    def restore(self, state: dict | None) -> None:
        state = state or {}
        self.window = list(state.get("loss_window", []))
        self.start_level = state.get("loss_start_level")
        self.max_ratio = float(state.get("loss_max_ratio", 0.0))
        self._regime = state.get("loss_regime")

    def _sums(self) -> tuple[float, float]:
        tracker = next(m for m in self.model.metrics if m.name == "loss")
        return float(tracker.total.numpy()), float(tracker.count.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.end_resumed_epoch()

    def on_train_batch_begin(self, batch, logs=None):
        self._before = self._sums()
        regime = self.regime()
        if regime != self._regime:
            if self._regime is not None:  # a new function: a new level
                self.window = []
            self._regime = regime

    def on_train_batch_end(self, batch, logs=None):
        total, count = self._sums()
        loss = (total - self._before[0]) / (count - self._before[1])
        step = self.step_in_epoch(batch)
        level = float(np.median(self.window)) if len(self.window) >= SPIKE_MIN_WINDOW else None
        spike = not math.isfinite(loss) or (
            self.factor > 0 and level is not None and loss > self.factor * level
            and loss > (SPIKE_START_MARGIN * self.start_level if self.start_level is not None
                        else -math.inf)
        )
        if spike:
            raise LossSpike(
                self._epoch, step, self._epoch * self.steps_per_epoch + step, loss, level
            )
        if level:
            self.max_ratio = max(self.max_ratio, loss / level)
        self.window = (self.window + [loss])[-SPIKE_WINDOW:]
        if self.start_level is None and len(self.window) == SPIKE_START_STEPS:
            self.start_level = float(max(self.window))


class Recoveries:
    """The rollbacks of a run: each spike's step, loss and level, and the
    factor it put on its stage's learning rate. Kept in
    `checkpoints/recoveries.json` (written before the rollback, so a run
    killed during one resumes with it) and in every checkpoint's state.

    Args:
        directory: the run's checkpoint folder.
        limit: `train.max_recoveries`.
        factor: `train.recovery_lr_factor`.
    """

    FILE = "recoveries.json"

    def __init__(self, directory: str, limit: int, factor: float):
        self.path = os.path.join(directory, self.FILE)
        self.limit, self.factor = limit, factor
        self.events: list[dict] = []

    def load(self, read_directory: str) -> None:
        """The events of a resumed run (the chief's file)."""
        path = os.path.join(read_directory, self.FILE)
        if os.path.exists(path):
            with open(path) as f:
                self.events = json.load(f)
            logging.info("Resuming after %d loss-spike rollback(s): %s.", len(self.events), path)

    def lr_factors(self) -> dict[int, float]:
        """Stage index -> the product of its recoveries' rate factors."""
        factors: dict[int, float] = {}
        for event in self.events:
            factors[event["stage"]] = factors.get(event["stage"], 1.0) * event["lr_factor"]
        return factors

    def record(self, spike: LossSpike, stage: int, stage_name: str) -> None:
        """Adds the event for `spike` in `stage` (0-based), or raises
        `TooManySpikes` when the run has used its recoveries."""
        if len(self.events) >= self.limit:
            history = "; ".join(
                f"step {e['global_step']}: loss {e['loss']} (stage {e['stage'] + 1})"
                for e in self.events
            )
            raise TooManySpikes(
                f"{spike} Rolled back {len(self.events)} time(s) already"
                f"{' (' + history + ')' if history else ''}; stopping. The last checkpoint "
                "is intact: lower optimizer.learning_rate or set optimizer.clip_norm=1.0, "
                "then rerun to resume (train.max_recoveries allows more rollbacks)."
            )
        self.events.append({
            "global_step": spike.global_step, "epoch": spike.epoch + 1, "step": spike.step,
            "loss": spike.loss if math.isfinite(spike.loss) else str(spike.loss),  # JSON has no NaN
            "level": spike.level, "stage": stage, "stage_name": stage_name,
            "lr_factor": self.factor,
        })
        workdir_lib.write_json(self.path, self.events)

"""Checks that a run did what it claims, before it reports success.

- `batchnorm_gap`: BatchNorm statistics that do not match the weights
  (training-mode vs inference-mode accuracy on training images).
- `check_chance_level`: a final result no better than a model that ignores
  its input (always the most frequent class) fails the run
  (`ChanceLevel`, exit 5 in `launch.train`) instead of exporting it.
"""

from __future__ import annotations

import math

from absl import logging

from keras_ft import freezing, job as job_lib


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

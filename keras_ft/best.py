"""The best value so far of a metric logged each epoch: what
`checkpoint.keep_best` keeps (`keras_ft.checkpoint.TrainingCheckpoint`) and
`train.early_stopping_patience` stops on. Its state is part of every
checkpoint, so a run killed and resumed chooses as an uninterrupted one."""

from __future__ import annotations

import numpy as np


class BestMetric:
    """The best value so far of a metric logged each epoch, and how many
    epochs have passed since: what `checkpoint.keep_best` keeps and
    `train.early_stopping_patience` stops on. Its state is checkpoint state
    (`state()`, `restore()`), so a run killed and resumed chooses the same.

    Args:
        metric: a key of `fit()`'s epoch logs, e.g. "val_loss".
        patience: stop after this many epochs in a row without a new best
            (0 = never).
    """

    def __init__(self, metric: str, patience: int = 0):
        if patience < 0:
            raise ValueError(f"train.early_stopping_patience must be >= 0, got {patience}.")
        self.metric, self.patience = metric, patience
        self.lower_is_better = "loss" in metric  # val_loss, loss
        self.value = self.epoch = self.global_step = None
        self.since = 0

    def update(self, epoch: int, global_step: int, logs: dict) -> bool:
        """Takes epoch `epoch`'s (1-based) logs; returns whether it is a new best."""
        if self.metric not in logs:
            raise ValueError(
                f"checkpoint.keep_best={self.metric!r} is not in the epoch's logs "
                f"({', '.join(sorted(logs))}); choose one of those."
            )
        value = float(logs[self.metric])
        better = np.isfinite(value) and (
            self.value is None
            or (value < self.value if self.lower_is_better else value > self.value)
        )
        if better:
            self.value, self.epoch, self.global_step, self.since = value, epoch, global_step, 0
        else:
            self.since += 1
        return bool(better)

    @property
    def stop(self) -> bool:
        """Whether early stopping ends the run now."""
        return bool(self.patience) and self.since >= self.patience

    def describe(self) -> str:
        if self.value is None:
            return f"no finite {self.metric} yet"
        return f"best {self.metric} {self.value:.4g} at epoch {self.epoch}"

    def state(self) -> dict:
        return {"best": dict(metric=self.metric, value=self.value, epoch=self.epoch,
                             global_step=self.global_step, since=self.since)}

    def restore(self, state: dict | None) -> None:
        best = (state or {}).get("best") or {}
        if best.get("metric") == self.metric:
            self.value, self.epoch = best["value"], best["epoch"]
            self.global_step, self.since = best["global_step"], best["since"]
        else:
            self.value = self.epoch = self.global_step = None
            self.since = 0

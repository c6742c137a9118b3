"""Keras callbacks, one job each; all work in a plain `model.fit`."""

from __future__ import annotations

import math
import time

import keras


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises `NonFiniteLoss` naming the step when the loss is not finite.

    Unlike `keras.callbacks.TerminateOnNaN`, the run fails (a non-zero exit in
    `launch.train`) instead of ending as if it had finished, and nothing is
    saved after the bad step: the last checkpoint stays the last good one.
    """

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(
                f"Training loss is {float(loss)} at epoch {self.epoch + 1}, step "
                f"{batch + 1}; lower optimizer.learning_rate and rerun to resume "
                "from the last checkpoint."
            )


class Throughput(keras.callbacks.Callback):
    """Measures training images per second over timed train steps.

    The first step of each epoch is not timed: it may include tracing the
    train step again after a freezing-stage change.

    Args:
        batch_size: global images per train step.
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self.seconds = 0.0
        self.steps = 0
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter() if batch > 0 else None

    def on_train_batch_end(self, batch, logs=None):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.steps += 1

    @property
    def images_per_sec(self) -> float:
        if not self.steps:
            return float("nan")
        return self.steps * self.batch_size / self.seconds

"""Keras callbacks, one job each; all work in a plain `model.fit`."""

from __future__ import annotations

import math
import time

import keras
from absl import logging


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


class ProgressLog(keras.callbacks.Callback):
    """Logs one line per epoch, and a line every `every_seconds` within long ones.

    Only scalar metrics without a "/" in their name are shown (per-block drift
    and the like go to history.csv and TensorBoard, not the console).

    Args:
        epochs: the run's total number of epochs, for "epoch 3/10".
        every_seconds: interval of in-epoch progress lines.
    """

    def __init__(self, epochs: int, every_seconds: float = 30.0):
        super().__init__()
        self.epochs = epochs
        self.every_seconds = every_seconds

    @staticmethod
    def _format(logs) -> str:
        return " ".join(
            f"{k}={float(v):.4g}" for k, v in sorted((logs or {}).items()) if "/" not in k
        )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if now - self._last >= self.every_seconds:
            self._last = now
            steps = self.params.get("steps") or "?"
            logging.info("epoch %d/%d step %d/%s: %s", self._epoch + 1, self.epochs,
                         batch + 1, steps, self._format(logs))

    def on_epoch_end(self, epoch, logs=None):
        logging.info("epoch %d/%d done in %.1fs: %s", epoch + 1, self.epochs,
                     time.perf_counter() - self._start, self._format(logs))

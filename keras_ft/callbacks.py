"""Keras callbacks, one job each; all work in a plain `model.fit`."""

from __future__ import annotations

import math
import time

import keras
from absl import logging


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite."""


class ResumableStep:
    """For callbacks of a `fit()` that may start part-way into an epoch.

    A resumed run first finishes its interrupted epoch in a `fit()` of the
    remaining steps, whose batch numbers start at 0 again; `resume_at(step)`
    tells the callback how many steps of that epoch were done before, and
    `step_in_epoch(batch)` gives the true 1-based step. Call
    `end_resumed_epoch()` from `on_epoch_end`.
    """

    first_step = 0

    def resume_at(self, step: int) -> None:
        self.first_step = step

    def step_in_epoch(self, batch: int) -> int:
        return self.first_step + batch + 1

    def end_resumed_epoch(self) -> None:
        self.first_step = 0


class StopOnNonFiniteLoss(ResumableStep, keras.callbacks.Callback):
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

    def on_epoch_end(self, epoch, logs=None):
        self.end_resumed_epoch()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(
                f"Training loss is {float(loss)} at epoch {self.epoch + 1}, step "
                f"{self.step_in_epoch(batch)}; nothing after the last checkpoint was saved. "
                "Lower optimizer.learning_rate (or set optimizer.clip_norm) and rerun "
                "the command to resume from the last checkpoint."
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


class ProgressLog(ResumableStep, keras.callbacks.Callback):
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
        self.steps_per_epoch = None  # the run's (default: fit()'s steps)

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
            steps = self.steps_per_epoch or self.params.get("steps") or "?"
            logging.info("epoch %d/%d step %d/%s: %s", self._epoch + 1, self.epochs,
                         self.step_in_epoch(batch), steps, self._format(logs))

    def on_epoch_end(self, epoch, logs=None):
        self.end_resumed_epoch()
        logging.info("epoch %d/%d done in %.1fs: %s", epoch + 1, self.epochs,
                     time.perf_counter() - self._start, self._format(logs))


class ProgressBar(ResumableStep, keras.callbacks.Callback):
    """Keras' own `Progbar` per epoch: steps, ETA, images/s and the running
    loss and metrics (what `fit(verbose=1)` draws, plus images/s, and right
    for an epoch resumed part-way). For a terminal; `ProgressLog`'s lines
    are for files. `keras_ft.progress.choose` picks between them.

    Only scalar metrics without a "/" in their name are shown.

    Args:
        epochs: the run's total number of epochs, for "Epoch 3/10".
        batch_size: global images per step, for images/s.
    """

    def __init__(self, epochs: int, batch_size: int):
        super().__init__()
        self.epochs, self.batch_size = epochs, batch_size
        self.steps_per_epoch = None  # the run's (default: fit()'s steps)
        self._bar = None

    def on_epoch_begin(self, epoch, logs=None):
        print(f"Epoch {epoch + 1}/{self.epochs}", flush=True)
        self._bar = None  # drawn at the first step, once the metric names are known
        self._start, self._done = time.perf_counter(), 0

    HIDDEN = ("stage", "trainable_params")  # in the log line and history.csv

    @classmethod
    def _values(cls, logs) -> list:
        return [(k, float(v)) for k, v in sorted((logs or {}).items())
                if "/" not in k and k not in cls.HIDDEN]

    def _draw(self, step: int, values: list, finalize: bool = False) -> None:
        if self._bar is None:
            # Every value is shown as given ("stateful"): fit's logs are
            # already the epoch's running means.
            self._bar = keras.utils.Progbar(
                self.steps_per_epoch or self.params.get("steps"),
                stateful_metrics=[k for k, _ in values] + ["images/s"],
            )
        self._bar.update(step, values=values, finalize=finalize)

    def _rate(self) -> tuple[str, float]:
        """Images per second over this invocation's steps of the epoch."""
        return "images/s", self._done * self.batch_size / max(time.perf_counter() - self._start, 1e-9)

    def on_train_batch_end(self, batch, logs=None):
        self._done += 1
        self._draw(self.step_in_epoch(batch), self._values(logs) + [self._rate()])

    def on_epoch_end(self, epoch, logs=None):
        step = self.step_in_epoch(self._done - 1)
        self.end_resumed_epoch()
        self._draw(step, self._values(logs) + [self._rate()], finalize=True)
        self._bar = None


class WriteHistory(keras.callbacks.Callback):
    """Rewrites a run's history.csv (atomically) at each epoch end.

    Args:
        path: the CSV file.
        history: the list of per-epoch log dicts that another callback
            appends to (keras_ft.checkpoint.TrainingCheckpoint keeps it, so a
            resumed run's history goes on from its checkpoint's).
    """

    def __init__(self, path: str, history: list[dict]):
        super().__init__()
        self.path, self.history = path, history

    def on_epoch_end(self, epoch, logs=None):
        from keras_ft import workdir

        workdir.write_history(self.path, self.history)

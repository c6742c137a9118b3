"""An exponential moving average of the trained weights (`optimizer.ema_decay`).

After every optimizer update the train step folds the new weights into the
average,

    ema ← d·ema + (1 − d)·θ        (decay d, e.g. 0.999)

starting from the weights as loaded (Polyak & Juditsky, 1992; timm's
`--model-ema`). With gradient accumulation it is folded once per update,
not once per batch. Every tunable variable is averaged, in every stage: a
variable its stage freezes keeps its value, so the average of an untrained
variable is that value, and one a later stage freezes keeps converging to
where it stopped. BatchNorm moving statistics are not weights and are not
averaged: layers in inference mode never change theirs, and layers on batch
statistics keep those of the raw weights.

Keras' own `use_ema` does not fit keras_ft's recipe: it folds once per
*batch* under gradient accumulation, and `fit()` overwrites the model with
the average when it returns, which the trainer does after each part of a
run (a resumed epoch, the cached-feature epochs).

The averages are checkpointed with the model (`keras_ft.checkpoint`), and
`swapped` puts them in the model for validation (`ValidateAverage`), the
final evaluation and the export.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf


class WeightAverage:
    """The moving averages of `variables` (create under the strategy's scope).

    Held outside Keras' tracking (a plain object on the model), so the model's
    weights, `.keras` files and exports do not carry a second copy.

    Args:
        decay: d in (0, 1).
        variables: the model variables to average (`tunable_variables()`).
    """

    def __init__(self, decay: float, variables: list):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optimizer.ema_decay must be in (0, 1), got {decay}.")
        self.decay = float(decay)
        self.variables = list(variables)
        # Every replica computes the same average: the first replica's value
        # is the one kept, so the train step may assign it in replica context.
        self.averages = [
            keras.Variable(
                v.numpy(), trainable=False, dtype=v.dtype, name="ema",
                aggregation="only_first_replica",
            )
            for v in self.variables
        ]

    def update(self) -> None:
        """ema ← d·ema + (1 − d)·θ, for every averaged variable (in the train step)."""
        for v, average in zip(self.variables, self.averages):
            d = tf.cast(self.decay, average.dtype)
            average.assign(d * average.value + (1 - d) * tf.cast(v.value, average.dtype))

    def update_after(self, optimizer, iterations_before) -> None:
        """`update`, if the optimizer's last `apply` was an update: every call
        without gradient accumulation; with it, the calls that moved
        `optimizer.iterations` (which counts updates) past `iterations_before`."""
        n = optimizer.gradient_accumulation_steps
        if not n or n <= 1:
            self.update()
            return
        tf.cond(
            tf.not_equal(optimizer.iterations, iterations_before),
            lambda: (self.update(), tf.constant(True))[1],
            lambda: tf.constant(False),
        )

    def exchange(self) -> None:
        """Swaps the model's weights and the averages (twice = unchanged)."""
        for v, average in zip(self.variables, self.averages):
            current = np.asarray(v.numpy())
            v.assign(average.numpy())
            average.assign(current)

    @contextlib.contextmanager
    def swapped(self):
        """The averages in the model inside the block, the trained weights after."""
        self.exchange()
        try:
            yield
        finally:
            self.exchange()


class ValidateAverage(keras.callbacks.Callback):
    """Validates `fit()`'s epochs on the averaged weights: they are what
    the best checkpoint, metrics.json and the export use, so `val_*` in
    history.csv is theirs. Training goes on with the trained weights.

    Args:
        average: the model's `WeightAverage`.
    """

    def __init__(self, average: WeightAverage):
        super().__init__()
        self.average = average
        self._in = False

    def on_test_begin(self, logs=None):
        if not self._in:
            self.average.exchange()
            self._in = True

    def on_test_end(self, logs=None):
        if self._in:
            self.average.exchange()
            self._in = False

"""The learning-rate range test (Smith, 2017; fastai's `lr_find`).

`find_learning_rate` trains the model for at most `num_steps` steps of its
own compiled train step (`model.train_on_batch`, so the current freezing
stage, BatchNorm policy, block multipliers, L2-SP and `tf.distribute`
strategy all apply) while the learning rate grows exponentially from
`start_lr` to `end_lr`. It records each step's loss and its exponential
moving average with bias correction (β = 0.98, fastai's `AvgSmoothLoss`),
stops once the smoothed loss exceeds 4x the best so far (or the loss is not
finite), and suggests a learning rate two ways, both computed on the smoothed
curve with the first tenth and last five points left out, as fastai does:

    valley      fastai's default: the longest valley (the longest strictly
                decreasing subsequence of the smoothed loss, from its first
                to its last step), and the point `valley_position` = 2/3 of
                the way along it. fastai's code takes ⌊L/3⌋ + ⌊L/6⌋ of its L
                steps, about half-way; `valley_position=0.5` reproduces that.
                2/3 sits nearer the loss minimum: on the real-photo test in
                tests/test_lr_finder.py it lands about 2x below the best
                constant rate of a sweep, fastai's 1/2 about 5x below.
    steepest    the most negative slope d(smoothed loss)/d(log lr).

`valley` is the suggestion used by `optimizer.learning_rate="auto"`.

The model is left exactly as it was: every variable of the model (weights,
BatchNorm moving statistics, dropout seed state) and of the optimizer
(iterations, momentum buffers, `lr_scale`, a float learning rate) is copied
before the test and assigned back afterwards, bit for bit.

How the learning rate is set, step by step. `keras_ft.optim.SGD` uses
η = learning_rate(iterations) · lr_scale · block multiplier. Keras 3.15
stores a float learning rate as a tracked optimizer variable and a schedule
as an object evaluated on `iterations` inside the traced train step, so
neither can simply be overwritten per step (a schedule is not assignable,
and replacing the float's variable would change the optimizer's variable
list and its checkpoints). The test therefore makes the base learning rate
1.0 — by assigning the float's variable, or by swapping a schedule for
`schedules.Constant(1.0)` through the public setter and swapping it back
afterwards — and drives `lr_scale` = stage scale × lr. The swept `lr` is
thus in the units of `optimizer.learning_rate`: the current stage's
`lr_scale` and the block multipliers still multiply it, as in training, so
the suggestion is a value for `--config.optimizer.learning_rate`. The train
step is retraced before and after the test. `lr_scale` is a variable, so
each step's value reaches every replica without a retrace.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_ft import optim, progress, schedules, workdir

CSV_FILE, PNG_FILE, JSON_FILE = "lr_find.csv", "lr_find.png", "lr_find.json"


@dataclasses.dataclass
class RangeTest:
    """The record of a range test and its suggestions.

    Attributes:
        learning_rates: the learning rate of each step run.
        losses: each step's training loss (the batch mean).
        smoothed: the bias-corrected exponential moving average of `losses`.
        diverged: whether the test stopped early on a diverging loss.
        valley: the valley suggestion (the one `"auto"` uses).
        steepest: the steepest-descent suggestion.
        valley_span: first and last step index of the longest valley.
        num_steps: the steps planned (`len(learning_rates)` if not stopped).
    """

    learning_rates: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    diverged: bool
    valley: float
    steepest: float
    valley_span: tuple[int, int]
    num_steps: int

    @property
    def suggestion(self) -> float:
        return self.valley

    def summary(self) -> dict:
        """The JSON-ready facts of the test (without the curve)."""
        finite = np.isfinite(self.smoothed)
        best = int(np.argmin(np.where(finite, self.smoothed, np.inf)))
        return {
            "suggestion": self.valley,
            "method": "valley",
            "valley": self.valley,
            "steepest": self.steepest,
            "min_loss_learning_rate": float(self.learning_rates[best]),
            "start_lr": float(self.learning_rates[0]),
            "last_lr": float(self.learning_rates[-1]),
            "steps_run": len(self.losses),
            "num_steps": self.num_steps,
            "diverged": self.diverged,
        }


def learning_rates(start_lr: float, end_lr: float, num_steps: int) -> np.ndarray:
    """`num_steps` rates growing exponentially from `start_lr` to `end_lr`."""
    if not 0 < start_lr < end_lr:
        raise ValueError(f"Need 0 < start_lr < end_lr, got {start_lr} and {end_lr}.")
    if num_steps < 10:
        raise ValueError(f"A range test needs at least 10 steps, got {num_steps}.")
    return start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / (num_steps - 1))


def smooth(losses, beta: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average: a_i / (1 − β^(i+1)),
    a_i = β·a_(i−1) + (1 − β)·loss_i, a_(−1) = 0 (fastai's `AvgSmoothLoss`)."""
    out, average = [], 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * float(loss)
        out.append(average / (1 - beta ** (i + 1)))
    return np.asarray(out)


def valley_span(values) -> tuple[int, int]:
    """First and last index of the longest strictly decreasing subsequence."""
    n = len(values)
    length, first = [1] * n, list(range(n))
    end = 0
    for i in range(1, n):
        for j in range(i):
            if values[i] < values[j] and length[j] + 1 > length[i]:
                length[i], first[i] = length[j] + 1, first[j]
        if length[i] > length[end]:
            end = i
    return first[end], end


def valley_index(values, position: float = 2 / 3) -> int:
    """The point `position` of the way along the longest valley (fastai's
    arithmetic, ⌊L/3⌋ + ⌊L/6⌋, is about `position=0.5`)."""
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"valley_position must be in [0, 1], got {position}.")
    start, end = valley_span(values)
    return start + int(position * (end - start))


def steepest_index(lrs, values) -> int:
    """Index of the most negative slope of `values` against log(lr)."""
    slopes = np.diff(values) / np.diff(np.log(lrs))
    return int(np.argmin(slopes))


def _window(smoothed: np.ndarray, num_steps: int) -> tuple[int, int]:
    """fastai's window for suggestions: skip the first tenth and the last 5
    points, and stop before the first non-finite value."""
    finite = np.isfinite(smoothed)
    n = int(np.argmin(finite)) if not finite.all() else len(smoothed)
    start, end = num_steps // 10, n - 5
    if end - start < 3:  # a short (early-diverging) test: use all of it
        start, end = 0, n
    if end - start < 2:
        raise ValueError(
            f"The range test ran only {n} finite step(s): the loss diverged "
            "at once. Lower start_lr."
        )
    return start, end


def _state_variables(model) -> list:
    seen, variables = set(), []
    for v in list(model.variables) + list(model.optimizer.variables):
        if id(v) not in seen:
            seen.add(id(v))
            variables.append(v)
    return variables


def find_learning_rate(
    model: keras.Model,
    dataset,
    start_lr: float = 1e-5,
    end_lr: float = 10.0,
    num_steps: int = 100,
    beta: float = 0.98,
    divergence: float = 4.0,
    valley_position: float = 2 / 3,
) -> RangeTest:
    """Runs the range test on `model` in its current freezing stage.

    Args:
        model: a compiled Keras model whose optimizer is `keras_ft.optim.SGD`
            and is built (a `keras_ft.Classifier`'s `compile()` builds it),
            e.g. after `keras_ft.freezing.apply_stage`. Under a
            `tf.distribute` strategy it must have been built in its scope;
            each step then feeds the whole batch to the model's train step,
            which splits the work as in training.
        dataset: batches `(images, labels)` from the training pipeline, e.g.
            `keras_ft.data.make_dataset(train_set, size, batch, training=True)`;
            a finite `tf.data.Dataset` is repeated.
        start_lr: the first step's learning rate.
        end_lr: the last step's learning rate.
        num_steps: the most steps to run.
        beta: smoothing factor of the loss's moving average.
        divergence: stop once the smoothed loss exceeds this times its best.
        valley_position: where along the longest valley the suggestion sits.

    Returns:
        The `RangeTest`; the model's and optimizer's variables are as before.

    Example:

    ```python
    freezing.apply_stage(model, Stage(epochs=1, blocks=0))
    test = keras_ft.lr_finder.find_learning_rate(model, train_ds)
    keras_ft.lr_finder.save(test, "/tmp/lr_find")
    print(test.suggestion)
    ```
    """
    optimizer = optim.unwrap(getattr(model, "optimizer", None))
    if optimizer is None or not hasattr(optimizer, "lr_scale"):
        raise ValueError("The range test needs a model compiled with keras_ft.optim.SGD or AdamW.")
    if not optimizer.built:
        raise ValueError(
            "Build the optimizer first: compile a keras_ft.Classifier, or call "
            "model.optimizer.build(model.trainable_variables)."
        )
    rates = learning_rates(start_lr, end_lr, num_steps)
    if not 0.0 <= valley_position <= 1.0:
        raise ValueError(f"valley_position must be in [0, 1], got {valley_position}.")
    if isinstance(dataset, tf.data.Dataset):
        dataset = dataset.repeat()
    saved = [(v, np.array(v.numpy(), copy=True)) for v in _state_variables(model)]
    # Keras keeps a float learning rate as a Variable, a schedule as an object
    # (which `keras_ft.optim.SGD` keeps in `learning_rate_schedule`).
    schedule = optimizer.learning_rate_schedule
    stage_scale = float(optimizer.lr_scale.numpy())
    losses, smoothed, average, best, diverged = [], [], 0.0, math.inf, False
    try:
        if schedule is None:
            optimizer.learning_rate = 1.0  # assigns the variable; restored below
        else:
            optimizer.learning_rate = schedules.Constant(1.0)
        model.make_train_function(force=True)
        shown = progress.Counter(len(rates), "LR range test", "steps")
        for step, (lr, batch) in enumerate(zip(rates, dataset)):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            optimizer.lr_scale.assign(stage_scale * lr)
            logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
            loss = float(logs["loss"])
            average = beta * average + (1 - beta) * loss
            losses.append(loss)
            smoothed.append(average / (1 - beta ** (step + 1)))
            best = min(best, smoothed[-1])
            shown.update(step + 1, lr=float(lr), loss=smoothed[-1])
            if not math.isfinite(smoothed[-1]) or smoothed[-1] > divergence * best:
                diverged = True
                break
        shown.close(step + 1 if losses else 0)
    finally:
        if schedule is not None:
            optimizer.learning_rate = schedule
        for variable, value in saved:
            variable.assign(value)
        model.make_train_function(force=True)
    if len(losses) < 2:
        raise ValueError(f"The range test got {len(losses)} batch(es) from the dataset.")
    rates, losses, smoothed = rates[: len(losses)], np.asarray(losses), np.asarray(smoothed)
    start, end = _window(smoothed, num_steps)
    v = start + valley_index(smoothed[start:end], valley_position)
    s = start + steepest_index(rates[start:end], smoothed[start:end])
    span = valley_span(smoothed[start:end])
    test = RangeTest(
        learning_rates=rates,
        losses=losses,
        smoothed=smoothed,
        diverged=diverged,
        valley=float(rates[v]),
        steepest=float(rates[s]),
        valley_span=(start + span[0], start + span[1]),
        num_steps=num_steps,
    )
    logging.info(
        "LR range test: %d steps from %.1e to %.1e%s; suggestion (valley) %.3g, "
        "steepest descent %.3g.",
        len(losses), rates[0], rates[-1], " (stopped: diverged)" if diverged else "",
        test.valley, test.steepest,
    )
    return test


def plot(test: RangeTest, path: str, title: str = "") -> None:
    """Writes the loss against the learning rate (log x) with both suggestions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lrs, smoothed = test.learning_rates, test.smoothed
    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo, hi = test.valley_span
    ax.axvspan(lrs[lo], lrs[hi], color="tab:orange", alpha=0.12, label="longest valley")
    ax.plot(lrs, test.losses, color="0.6", lw=0.8, alpha=0.8, label="loss per step")
    ax.plot(lrs, smoothed, color="tab:blue", lw=2.0, label="smoothed loss (EMA, β=0.98)")
    for value, marker, color, name in (
        (test.valley, "o", "tab:orange", "valley (suggested)"),
        (test.steepest, "v", "tab:green", "steepest descent"),
    ):
        i = int(np.argmin(np.abs(np.log(lrs) - math.log(value))))
        ax.axvline(value, color=color, ls="--", lw=1.0)
        ax.plot([value], [smoothed[i]], marker, color=color, ms=10, mec="black",
                label=f"{name}: {value:.2g}")
    finite = np.concatenate(
        [test.losses[np.isfinite(test.losses)], smoothed[np.isfinite(smoothed)]]
    )
    # The diverging tail would flatten the rest of the curve: cap the y-axis.
    top = min(float(finite.max()), 1.6 * float(np.nanmax(smoothed[: max(hi, 1) + 1])))
    bottom = float(finite.min())
    margin = 0.05 * (top - bottom or 1.0)
    ax.set_ylim(bottom - margin, top + margin)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    steps = f"{len(test.losses)} of {test.num_steps} steps"
    if test.diverged:
        steps += ", stopped on divergence"
    ax.set_title(f"LR range test{': ' + title if title else ''} ({steps})", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    # Below the axes, so it hides no part of the curve.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=9, frameon=False)
    fig.savefig(path, bbox_inches="tight")


def plot_curves(curves: list, path: str, title: str = "") -> None:
    """Writes several range tests' smoothed losses on one plot, each with its
    suggestion (e.g. one per freezing stage, `keras_ft.lr_stages`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    tops, bottoms = [], []
    for (label, test), color in zip(curves, ("tab:blue", "tab:red", "tab:green", "tab:purple",
                                             "tab:brown", "tab:olive")):
        lrs, smoothed = test.learning_rates, test.smoothed
        finite = smoothed[np.isfinite(smoothed)]
        ax.plot(lrs, smoothed, color=color, lw=2.0, label=label)
        i = int(np.argmin(np.abs(np.log(lrs) - math.log(test.valley))))
        ax.plot([test.valley], [smoothed[i]], "o", color=color, ms=9, mec="black",
                label=f"suggested: {test.valley:.2g}")
        tops.append(min(float(finite.max()), 1.6 * float(np.nanmax(smoothed[: test.valley_span[1] + 1]))))
        bottoms.append(float(finite.min()))
    margin = 0.05 * ((max(tops) - min(bottoms)) or 1.0)
    ax.set_ylim(min(bottoms) - margin, max(tops) + margin)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale), in units of optimizer.learning_rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"LR range test per stage{': ' + title if title else ''}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=9, frameon=False)
    fig.savefig(path, bbox_inches="tight")


def write_curve(test: RangeTest, path: str) -> None:
    """The test's curve as CSV: step, lr, loss, smoothed_loss."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(test.learning_rates, test.losses, test.smoothed)):
            writer.writerow([i] + [f"{x:.8g}" for x in row])


def save(
    test: RangeTest, directory: str, title: str = "", extra: dict | None = None,
    curves: list | None = None,
) -> dict:
    """Writes `lr_find.csv` (step, lr, loss, smoothed_loss), `lr_find.json`
    (the suggestions and `extra`) and `lr_find.png` into `directory`; the
    plot shows `curves` (`(label, RangeTest)` pairs) instead when given.

    Returns:
        The paths written, by kind ("csv", "json", "png").
    """
    os.makedirs(directory, exist_ok=True)
    paths = {kind: os.path.join(directory, name) for kind, name in
             (("csv", CSV_FILE), ("json", JSON_FILE), ("png", PNG_FILE))}
    write_curve(test, paths["csv"])
    try:
        if curves:
            plot_curves(curves, paths["png"], title)
        else:
            plot(test, paths["png"], title)
    except ImportError:
        logging.warning("matplotlib is not installed: no %s written.", PNG_FILE)
        del paths["png"]
    # Last and atomic: a resumed "auto" run reads its suggestion from here.
    workdir.write_json(paths["json"], dict(test.summary(), **(extra or {})))
    return paths


def load_suggestion(directory: str) -> float:
    """The suggestion saved by `save` in `directory` (for resuming a run)."""
    path = os.path.join(directory, JSON_FILE)
    if not os.path.exists(path):
        raise ValueError(
            f"{path} is missing: this run used optimizer.learning_rate='auto' "
            "and its range test result is needed to resume. Restore the file, "
            "or rerun with --config.resume=False to start over."
        )
    with open(path) as f:
        return float(json.load(f)["suggestion"])

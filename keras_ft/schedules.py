"""Learning-rate schedules for fine-tuning, as serialisable Keras schedules.

Each is a `keras.optimizers.schedules.LearningRateSchedule` registered under
the package name "keras_ft", so an optimizer holding one round-trips through
`get_config`/`from_config` and `.keras` files. `step` is the optimizer's
iteration count; the value returned is the base learning rate, which
`keras_ft.optim.SGD` multiplies by the freezing stage's `lr_scale` and the
variable's block multiplier.

    Constant       η, after an optional linear warmup.
    WarmupCosine   linear warmup from 0 to η, then cosine decay to
                   `final_fraction`·η at `total_steps` (Loshchilov & Hutter,
                   2017, without restarts; warmup as in Goyal et al., 2017).
    WarmupLinear   linear warmup from 0 to η, then linear decay to 0 at
                   `total_steps`: BERT's schedule (Devlin et al., 2019: 10%
                   warmup; the Hugging Face `linear` schedule).
    StepDecay      linear warmup, then η × `factor` at each of the
                   `boundaries` (fractions of the run): BiT-HyperRule's
                   schedule (Kolesnikov et al., 2020: /10 at 30, 60, 90%).
    SlantedTriangular
                   ULMFiT's STLR (Howard & Ruder, 2018, eq. 3): a short
                   linear rise over `cut_frac` of the run from η/`ratio` to
                   η, then a long linear decay back to η/`ratio`.

Linear warmup follows Keras' `CosineDecay` and BiT: η·step/warmup_steps,
so the first step (step 0) has rate 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
from keras import ops

# The choices of `schedule.name` (built by `create`).
NAMES = ("constant", "cosine", "warmup_cosine", "warmup_linear", "step", "stlr")


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"schedule.warmup_steps must be in [0, {total_steps}] (the run's "
            f"total steps), got {warmup_steps}."
        )


def _warmup(learning_rate: float, step, warmup_steps: int):
    """η·min(1, step/warmup_steps) (η when there is no warmup)."""
    if not warmup_steps:
        return ops.convert_to_tensor(learning_rate, "float32")
    return learning_rate * ops.minimum(1.0, step / float(warmup_steps))


class _Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """Casts the step to float32 and keeps the config."""

    def __call__(self, step):
        return self.value(ops.cast(step, "float32"))

    def value(self, step):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_ft")
class Constant(_Schedule):
    """A constant learning rate after an optional linear warmup.

    Args:
        learning_rate: η.
        warmup_steps: steps of linear warmup from 0 (0 = none).
    """

    def __init__(self, learning_rate: float, warmup_steps: int = 0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)

    def value(self, step):
        return _warmup(self.learning_rate, step, self.warmup_steps)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable(package="keras_ft")
class WarmupCosine(_Schedule):
    """Linear warmup to η, then half a cosine down to `final_fraction`·η.

    For warmup_steps ≤ step ≤ total_steps, with p = (step − warmup) /
    (total − warmup): η_t = η·(f + (1 − f)·(1 + cos(πp))/2). After
    `total_steps` the rate stays at f·η.

    Args:
        learning_rate: the peak η.
        total_steps: length of the run in optimizer steps.
        warmup_steps: steps of linear warmup from 0.
        final_fraction: f, the final rate as a fraction of η.

    Example:

    ```python
    schedule = keras_ft.schedules.WarmupCosine(0.01, total_steps=1000, warmup_steps=50)
    optimizer = keras_ft.SGD(schedule, momentum=0.9)
    ```
    """

    def __init__(
        self,
        learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        final_fraction: float = 0.0,
    ):
        _check_steps(total_steps, warmup_steps)
        if not 0.0 <= final_fraction <= 1.0:
            raise ValueError(f"final_fraction must be in [0, 1], got {final_fraction}.")
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_fraction = float(final_fraction)

    def value(self, step):
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        f = self.final_fraction
        cosine = self.learning_rate * (f + (1.0 - f) * 0.5 * (1.0 + ops.cos(math.pi * progress)))
        if not self.warmup_steps:
            return cosine
        warmup = _warmup(self.learning_rate, step, self.warmup_steps)
        return ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "final_fraction": self.final_fraction,
        }


@keras.saving.register_keras_serializable(package="keras_ft")
class WarmupLinear(_Schedule):
    """Linear warmup to η, then a straight line down to 0 at `total_steps`.

    η_t = η·t/w for t < w (w = warmup_steps), then η·(T − t)/(T − w) for
    w ≤ t ≤ T, and 0 after T: BERT's fine-tuning schedule.

    Args:
        learning_rate: the peak η.
        total_steps: T, the run's optimizer steps.
        warmup_steps: w.
    """

    def __init__(self, learning_rate: float, total_steps: int, warmup_steps: int = 0):
        _check_steps(total_steps, warmup_steps)
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def value(self, step):
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        remaining = ops.clip((self.total_steps - step) / decay_steps, 0.0, 1.0)
        linear = self.learning_rate * remaining
        if not self.warmup_steps:
            return linear
        warmup = _warmup(self.learning_rate, step, self.warmup_steps)
        return ops.where(step < self.warmup_steps, warmup, linear)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable(package="keras_ft")
class StepDecay(_Schedule):
    """Linear warmup, then η multiplied by `factor` at each boundary.

    BiT-HyperRule (Kolesnikov et al., 2020): η/10 at 30%, 60% and 90% of the
    run (40/60/80% for its shortest, 500-step schedule).

    Args:
        learning_rate: η, the rate between warmup and the first boundary.
        total_steps: length of the run in optimizer steps.
        warmup_steps: steps of linear warmup from 0.
        boundaries: fractions of `total_steps`, increasing, in (0, 1]; at
            step ≥ boundary·total_steps the rate is multiplied by `factor`.
        factor: the decay factor in (0, 1].
    """

    def __init__(
        self,
        learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        boundaries: Sequence[float] = (0.3, 0.6, 0.9),
        factor: float = 0.1,
    ):
        _check_steps(total_steps, warmup_steps)
        boundaries = [float(b) for b in boundaries]
        if any(not 0.0 < b <= 1.0 for b in boundaries) or boundaries != sorted(boundaries):
            raise ValueError(
                "schedule.decay_boundaries must be increasing fractions in (0, 1], "
                f"got {boundaries}."
            )
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"schedule.decay_factor must be in (0, 1], got {factor}.")
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = boundaries
        self.factor = float(factor)

    def value(self, step):
        rate = _warmup(self.learning_rate, step, self.warmup_steps)
        for boundary in self.boundaries:
            at = float(round(boundary * self.total_steps))
            rate = ops.where(step >= at, rate * self.factor, rate)
        return rate

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "boundaries": list(self.boundaries),
            "factor": self.factor,
        }


@keras.saving.register_keras_serializable(package="keras_ft")
class SlantedTriangular(_Schedule):
    """ULMFiT's slanted triangular learning rate (Howard & Ruder, 2018).

    With T = total_steps, cut = ⌊T·cut_frac⌋ and
    p = t/cut for t < cut, else 1 − (t − cut)/(cut·(1/cut_frac − 1)):
    η_t = η·(1 + p·(ratio − 1))/ratio. The rate rises linearly from η/ratio
    to η over the first `cut_frac` of the run, then falls linearly back to
    η/ratio at T (and stays there).

    Args:
        learning_rate: the peak η.
        total_steps: T, the length of the run in optimizer steps.
        cut_frac: the fraction of the run spent rising (ULMFiT: 0.1).
        ratio: how much smaller the lowest rate is than η (ULMFiT: 32).
    """

    def __init__(
        self,
        learning_rate: float,
        total_steps: int,
        cut_frac: float = 0.1,
        ratio: float = 32.0,
    ):
        _check_steps(total_steps, 0)
        if not 0.0 < cut_frac < 1.0:
            raise ValueError(f"schedule.stlr_cut_frac must be in (0, 1), got {cut_frac}.")
        if ratio < 1.0:
            raise ValueError(f"schedule.stlr_ratio must be >= 1, got {ratio}.")
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.cut_frac = float(cut_frac)
        self.ratio = float(ratio)

    def value(self, step):
        cut = float(max(math.floor(self.total_steps * self.cut_frac), 1))
        rise = step / cut
        fall = 1.0 - (step - cut) / (cut * (1.0 / self.cut_frac - 1.0))
        p = ops.clip(ops.where(step < cut, rise, fall), 0.0, 1.0)
        return self.learning_rate * (1.0 + p * (self.ratio - 1.0)) / self.ratio

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "cut_frac": self.cut_frac,
            "ratio": self.ratio,
        }


def create(
    name: str,
    peak,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_fraction: float = 0.0,
    decay_boundaries: Sequence[float] = (0.3, 0.6, 0.9),
    decay_factor: float = 0.1,
    stlr_cut_frac: float = 0.1,
    stlr_ratio: float = 32.0,
    as_schedule: bool = False,
):
    """The learning rate of the `schedule` config: a float or a schedule.

    Args:
        name: one of `NAMES` (`schedule.name`).
        peak: the peak rate, or "auto": a placeholder 1.0 until the range
            test's suggestion is known (then always a schedule object, so
            the optimizer's variables and checkpoints are the same before
            and after the suggestion is set).
        total_steps: the run's optimizer updates.
        warmup_steps, ...: the other `schedule.*` keys. `warmup_fraction`
            (0 < f < 1) sets the warmup to round(f·total_steps) updates
            (at least 1), in place of `warmup_steps`.
        as_schedule: a constant rate as a `Constant` object, not a float.

    A constant rate without warmup stays a float (Keras keeps it as an
    optimizer variable, which a resumed run may change); everything else is
    one of this module's schedules.
    """
    if name not in NAMES:
        raise ValueError(f"Unknown schedule.name {name!r}. Choose one of: {', '.join(NAMES)}.")
    if peak == "auto":
        peak, as_schedule = 1.0, True
    if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not 0 < peak < math.inf:
        raise ValueError(f"The learning rate must be a positive number, got {peak!r}.")
    given = (f"schedule.warmup_fraction={warmup_fraction:g}" if warmup_fraction
             else f"schedule.warmup_steps={warmup_steps}")
    if warmup_fraction:
        if warmup_steps:
            raise ValueError("Set schedule.warmup_steps or schedule.warmup_fraction, not both.")
        if not 0.0 < warmup_fraction < 1.0:
            raise ValueError(f"schedule.warmup_fraction must be in (0, 1), got {warmup_fraction}.")
        warmup_steps = max(1, round(warmup_fraction * total_steps))
    if warmup_steps and name in ("cosine", "stlr"):
        raise ValueError(
            f"{given} does not apply to schedule {name!r}: "
            "use 'warmup_cosine', 'warmup_linear', 'constant' or 'step', or no warmup."
        )
    if name == "warmup_cosine" and not warmup_steps:
        raise ValueError("schedule.name='warmup_cosine' needs schedule.warmup_steps > 0 "
                         "(or schedule.warmup_fraction).")
    peak = float(peak)
    if name == "constant":
        _check_steps(total_steps, warmup_steps)
        return Constant(peak, warmup_steps) if warmup_steps or as_schedule else peak
    if name in ("cosine", "warmup_cosine"):
        return WarmupCosine(peak, total_steps, warmup_steps)
    if name == "warmup_linear":
        return WarmupLinear(peak, total_steps, warmup_steps)
    if name == "step":
        return StepDecay(peak, total_steps, warmup_steps, decay_boundaries, decay_factor)
    return SlantedTriangular(peak, total_steps, stlr_cut_frac, stlr_ratio)

"""SGD with momentum and AdamW, both with decoupled weight decay, written out.

Both optimizers update a trainable variable θ with gradient g at the
learning rate η = schedule(step) · lr_scale (the freezing stage's) · the
variable's multiplier (discriminative fine-tuning, `set_lr_multipliers`),
and decay it decoupled from the gradient (Loshchilov & Hutter, 2019) by λ.

`SGD`, with momentum μ:

    v ← μ·v + g
    θ ← θ − η·λ·θ − η·v            (plain momentum)
    θ ← θ − η·λ·θ − η·(g + μ·v)    (Nesterov)

This is the form used by PyTorch and by the fine-tuning papers keras_ft
follows (BiT, ULMFiT); Keras' own `SGD` folds η into the velocity, which
changes the effective step whenever a schedule changes η.

`AdamW`, with t the variable's own 1-based update count (see `AdamW`):

    m ← β1·m + (1 − β1)·g          m̂ = m / (1 − β1^t)
    v ← β2·v + (1 − β2)·g²         v̂ = v / (1 − β2^t)
    θ ← θ − η·λ·θ − η·m̂ / (√v̂ + ε)

the BERT fine-tuning recipe (Devlin et al., 2019), with ε added to √v̂ as
the paper writes it. Keras' own `AdamW` adds ε/√(1 − β2^t) instead, decays
biases and γ/β unless told not to, and counts t in optimizer updates, which
is wrong for a variable that starts training in a later freezing stage.

Weight decay skips 1-D variables (biases, LayerNorm and BatchNorm γ/β), as
timm does: decaying a normalisation scale toward zero has no regularising
meaning.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_ft import compat


class _FineTuningOptimizer(keras.optimizers.Optimizer):
    """What `SGD` and `AdamW` share: the learning rate η of each variable and
    the decoupled weight decay. Subclasses add their slots in `build_slots`
    and call `variable_learning_rate` and `decay` in `update_step`."""

    def __init__(self, learning_rate, weight_decay: float, name: str, **kwargs):
        # weight_decay is ours (decoupled, skipping 1-D variables): the base
        # class gets None so it does not decay a second time.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if weight_decay is None or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        self.decoupled_weight_decay = float(weight_decay)
        self._multipliers = {}  # variable index -> learning-rate multiplier
        # Keras keeps a float learning rate in a variable, a schedule as an
        # object it calls on `iterations`; `learning_rate` reads only the
        # value now, so the schedule itself is kept here (None for a float).
        self.learning_rate_schedule = None
        self._record_schedule(learning_rate)

    @property
    def learning_rate(self):
        return super().learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        keras.optimizers.Optimizer.learning_rate.fset(self, learning_rate)
        self._record_schedule(learning_rate)

    def _record_schedule(self, learning_rate) -> None:
        # A float (or a value assigned to the float's variable) keeps None.
        if callable(learning_rate) and not isinstance(learning_rate, keras.Variable):
            self.learning_rate_schedule = learning_rate

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        # Paths in `build()`'s order: `set_lr_multipliers` maps them to the
        # indices `update_step` finds variables by. Strings, so the optimizer
        # does not track (or checkpoint) the model's variables.
        self._variable_paths = [v.path for v in variables]
        # Multiplies the learning rate; set by the freezing stage schedule.
        # A variable, so changing it needs no retrace and is checkpointed.
        self.lr_scale = self.add_variable(
            shape=(), initializer="ones", name="lr_scale"
        )
        self.build_slots(variables)

    def build_slots(self, variables) -> None:
        """Creates the per-variable optimizer variables (after `lr_scale`)."""

    def set_lr_multipliers(self, multipliers) -> None:
        """Per-variable learning-rate multipliers, by variable path (others 1).

        Discriminative fine-tuning: lower blocks learn more slowly. The values
        are constants of the traced train step: retrace it after a change
        (`model.make_train_function(force=True)`; `StageSchedule` does so).
        """
        if not self.built:
            raise ValueError("Build the optimizer (compile the model) before setting multipliers.")
        by_path = {path: i for i, path in enumerate(self._variable_paths)}
        unknown = set(multipliers) - set(by_path)
        if unknown:
            raise ValueError(f"No optimizer variable for path(s): {sorted(unknown)[:5]}")
        self._multipliers = {by_path[p]: float(m) for p, m in multipliers.items() if m != 1.0}

    def variable_learning_rate(self, variable, learning_rate):
        """η = learning_rate · lr_scale · the variable's multiplier, in its dtype."""
        multiplier = self._multipliers.get(compat.variable_index(self, variable), 1.0)
        return ops.cast(
            ops.multiply(ops.multiply(learning_rate, self.lr_scale), multiplier),
            variable.dtype,
        )

    def decay(self, variable, lr) -> None:
        """θ ← θ − η·λ·θ for variables of 2 or more dims (not biases or γ/β)."""
        if self.decoupled_weight_decay and len(variable.shape) > 1:
            wd = ops.cast(self.decoupled_weight_decay, variable.dtype)
            self.assign_sub(variable, ops.multiply(ops.multiply(lr, wd), variable))

    def get_config(self):
        config = super().get_config()
        config.update(weight_decay=self.decoupled_weight_decay)
        return config


@keras.saving.register_keras_serializable(package="keras_ft")
class SGD(_FineTuningOptimizer):
    """SGD with momentum, optional Nesterov and decoupled weight decay.

    Args:
        learning_rate: a float or a `keras.optimizers.schedules` schedule.
        momentum: μ in [0, 1). 0 disables the velocity buffers.
        nesterov: use Nesterov's look-ahead step.
        weight_decay: λ, decoupled; applied to variables with 2 or more dims.
        **kwargs: passed to `keras.optimizers.Optimizer` (e.g. `clipnorm`).

    Attributes:
        learning_rate_schedule: the schedule (or callable) the learning rate
            follows, None for a float learning rate; kept in step with the
            `learning_rate` setter.

    Example:

    ```python
    optimizer = keras_ft.optim.SGD(learning_rate=0.01, momentum=0.9,
                                   weight_decay=1e-4)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    ```
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        name: str = "sgd",
        **kwargs,
    ):
        super().__init__(learning_rate, weight_decay, name, **kwargs)
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.momentum = momentum
        self.nesterov = bool(nesterov)

    def build_slots(self, variables) -> None:
        self.momentums = []
        if self.momentum:
            self.momentums = [
                self.add_variable_from_reference(v, "momentum") for v in variables
            ]

    def update_step(self, gradient, variable, learning_rate):
        lr = self.variable_learning_rate(variable, learning_rate)
        g = ops.cast(gradient, variable.dtype)
        self.decay(variable, lr)
        if not self.momentum:
            self.assign_sub(variable, ops.multiply(lr, g))
            return
        mu = ops.cast(self.momentum, variable.dtype)
        v = self.momentums[compat.variable_index(self, variable)]
        self.assign(v, ops.add(ops.multiply(mu, v), g))
        step = ops.add(g, ops.multiply(mu, v)) if self.nesterov else v
        self.assign_sub(variable, ops.multiply(lr, step))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, nesterov=self.nesterov)
        return config


@keras.saving.register_keras_serializable(package="keras_ft")
class AdamW(_FineTuningOptimizer):
    """Adam with bias correction and decoupled weight decay (the BERT recipe).

    With t the number of updates this variable has had, this one included:

        m ← β1·m + (1 − β1)·g          m̂ = m / (1 − β1^t)
        v ← β2·v + (1 − β2)·g²         v̂ = v / (1 − β2^t)
        θ ← θ − η·λ·θ − η·m̂ / (√v̂ + ε)

    (Loshchilov & Hutter, 2019), the decay λ only on variables of 2 or more
    dims, η as for `SGD`: schedule(step) · lr_scale · multiplier.

    t is counted per variable, not in optimizer updates (`iterations`): the
    train step applies the optimizer to the freezing stage's variables only
    (`apply(grads, subset)`, over an optimizer built once on all of them), so
    a block unfrozen at update 1000 starts from m = v = 0 there. With
    t = 1000 its m̂ and v̂ would go uncorrected: after k updates of a steady
    g, m̂/√v̂ = (1 − β1^k)/√(1 − β2^k), 3.2 at k = 1, 6.5 at k = 10, 3.2 at
    k = 100, not 1: the too-large early steps bias correction is there to
    prevent, for hundreds of updates. Its own count gives it t = 1 and a
    first step of η·g/(|g| + ε), as for a variable trained from the start.
    (Under gradient accumulation t counts updates, not micro-batches.)

    Its slots (`momentums` m, `velocities` v, `update_counts` t) are
    optimizer variables, saved by a `tf.train.Checkpoint` of the optimizer.

    Args:
        learning_rate: a float or a `keras.optimizers.schedules` schedule.
        beta_1: β1 in [0, 1), the decay of the gradient's moving mean.
        beta_2: β2 in [0, 1), the decay of the squared gradient's mean.
        epsilon: ε > 0, added to √v̂.
        weight_decay: λ, decoupled; applied to variables with 2 or more dims.
        **kwargs: passed to `keras.optimizers.Optimizer` (e.g. `clipnorm`).

    Attributes:
        learning_rate_schedule: as for `SGD`.

    Example:

    ```python
    optimizer = keras_ft.optim.AdamW(learning_rate=2e-5, weight_decay=0.01)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    ```
    """

    def __init__(
        self,
        learning_rate=1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-6,
        weight_decay: float = 0.01,
        name: str = "adamw",
        **kwargs,
    ):
        super().__init__(learning_rate, weight_decay, name, **kwargs)
        for key, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {beta}.")
        if not float(epsilon) > 0.0:
            raise ValueError(f"epsilon must be > 0 (it keeps the step finite), got {epsilon}.")
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def build_slots(self, variables) -> None:
        self.momentums = [self.add_variable_from_reference(v, "momentum") for v in variables]
        self.velocities = [self.add_variable_from_reference(v, "velocity") for v in variables]
        self.update_counts = [
            self.add_variable(
                shape=(), dtype="int64", name=f"{v.path.replace('/', '_')}_update_count"
            )
            for v in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        index = compat.variable_index(self, variable)
        m, v, count = self.momentums[index], self.velocities[index], self.update_counts[index]
        dtype = variable.dtype
        lr = self.variable_learning_rate(variable, learning_rate)
        g = ops.cast(gradient, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        self.assign_add(count, 1)
        t = ops.cast(count, dtype)
        self.assign(m, ops.add(ops.multiply(beta_1, m), ops.multiply(1 - beta_1, g)))
        self.assign(v, ops.add(ops.multiply(beta_2, v), ops.multiply(1 - beta_2, ops.square(g))))
        m_hat = ops.divide(m, 1 - ops.power(beta_1, t))
        v_hat = ops.divide(v, 1 - ops.power(beta_2, t))
        self.decay(variable, lr)
        step = ops.divide(m_hat, ops.add(ops.sqrt(v_hat), ops.cast(self.epsilon, dtype)))
        self.assign_sub(variable, ops.multiply(lr, step))

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return config


def unwrap(optimizer):
    """The optimizer that applies the update: under `mixed_float16` Keras
    wraps the compiled one in a `LossScaleOptimizer`; the stage schedule and
    the range test set the learning-rate scales of the `SGD` or `AdamW`
    inside it."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer

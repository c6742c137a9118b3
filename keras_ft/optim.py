"""SGD with momentum and decoupled weight decay, written out.

The update applied to every trainable variable θ with gradient g is

    v ← μ·v + g
    θ ← θ − η·λ·θ − η·v            (plain momentum)
    θ ← θ − η·λ·θ − η·(g + μ·v)    (Nesterov)

with momentum μ, decoupled weight decay λ (Loshchilov & Hutter, 2019) and
learning rate η = schedule(step) · lr_scale (the freezing stage's) · the
variable's multiplier (discriminative fine-tuning, `set_lr_multipliers`). This is the form used by PyTorch and by the fine-tuning papers
keras_ft follows (BiT, ULMFiT); Keras' own `SGD` folds η into the velocity,
which changes the effective step whenever a schedule changes η.

Weight decay skips 1-D variables (biases, BatchNorm γ/β), as timm does: decaying
a BatchNorm scale toward zero has no regularising meaning.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_ft import compat


@keras.saving.register_keras_serializable(package="keras_ft")
class SGD(keras.optimizers.Optimizer):
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
        # weight_decay is ours (decoupled, skipping 1-D variables): the base
        # class gets None so it does not decay a second time.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        if weight_decay is None or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        self.momentum = momentum
        self.nesterov = bool(nesterov)
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
        self.momentums = []
        if self.momentum:
            self.momentums = [
                self.add_variable_from_reference(v, "momentum") for v in variables
            ]

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

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self._multipliers.get(compat.variable_index(self, variable), 1.0)
        lr = ops.cast(
            ops.multiply(ops.multiply(learning_rate, self.lr_scale), multiplier),
            variable.dtype,
        )
        g = ops.cast(gradient, variable.dtype)
        if self.decoupled_weight_decay and len(variable.shape) > 1:
            wd = ops.cast(self.decoupled_weight_decay, variable.dtype)
            self.assign_sub(variable, ops.multiply(ops.multiply(lr, wd), variable))
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
        config.update(
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.decoupled_weight_decay,
        )
        return config


def unwrap(optimizer):
    """The optimizer that applies the update: under `mixed_float16` Keras
    wraps the compiled one in a `LossScaleOptimizer`; the stage schedule and
    the range test set the learning-rate scales of the `SGD` inside it."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer

"""The private Keras APIs keras_ft relies on, each with its reason.

Everything else in keras_ft uses Keras' public API. What is here has no
public route (yet); each item says why it is needed and what would let it go.
`tests/test_compat.py` has one test per item that fails when Keras changes
the private name, its signature or the behaviour worked around.

Checks, so a Keras upgrade fails loudly rather than silently:

* Importing this module under a Keras release outside `TESTED_KERAS` warns
  once (`RuntimeWarning`): the workarounds may still hold, run
  `tests/test_compat.py` to find out.
* A private name that is gone, or whose parameters changed, raises
  `KerasCompatError` at import, naming the workaround that needs it.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Iterable

import keras
import tensorflow as tf

# Keras releases (major.minor) the workarounds below were checked against.
TESTED_KERAS = ("3.15",)


class KerasCompatError(RuntimeError):
    """A private Keras API that keras_ft relies on is gone or has changed."""


def check_keras_version(version: str | None = None) -> bool:
    """Warns (`RuntimeWarning`) if Keras is not a release in `TESTED_KERAS`.

    Args:
        version: a Keras version string; the installed Keras' by default.

    Returns:
        Whether the version was tested.
    """
    version = version or keras.version()
    if ".".join(version.split(".")[:2]) in TESTED_KERAS:
        return True
    warnings.warn(
        f"keras_ft's workarounds for private Keras APIs (keras_ft/compat.py) were "
        f"tested with Keras {', '.join(TESTED_KERAS)}.x, not Keras {version}; run "
        "tests/test_compat.py to check them.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def require(owner: type, name: str, parameters: tuple[str, ...], workaround: str) -> None:
    """Raises `KerasCompatError` unless `owner.name` is a method taking
    exactly `parameters` (after `self`).

    Args:
        owner: the Keras class that should define the private method.
        name: the method's name.
        parameters: its expected parameter names, in order, without `self`.
        workaround: the keras_ft workaround that needs it, for the message.
    """
    method = getattr(owner, name, None)
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    if not callable(method):
        raise KerasCompatError(
            f"{workaround}: Keras {keras.version()} has no {where}; the workaround "
            "in keras_ft/compat.py needs updating for this Keras."
        )
    found = tuple(inspect.signature(method).parameters)[1:]
    if found != parameters:
        raise KerasCompatError(
            f"{workaround}: {where} takes {found} in Keras {keras.version()}, not "
            f"{parameters}; the workaround in keras_ft/compat.py needs updating."
        )


# --------------------------------------------------------------------------
# Optimizer: the index of a variable inside `update_step`
# --------------------------------------------------------------------------

_VARIABLE_INDEX = "compat.variable_index (per-variable optimizer slots)"
require(keras.optimizers.Optimizer, "_get_variable_index", ("variable",), _VARIABLE_INDEX)


def variable_index(optimizer: keras.optimizers.Optimizer, variable) -> int:
    """The position of `variable` in the list `optimizer.build()` was given.

    A custom optimizer's `update_step` needs it to find the variable's slots
    (momentum) and its learning-rate multiplier. The variable arrives as a
    Keras variable, its backing `tf.Variable`, or, under `tf.distribute`, one
    replica's component of a mirrored variable; only the optimizer's
    `_get_variable_index` (through the TF backend's `_var_key`) maps all of
    them back. Keras' own `Optimizer` docstring uses it for exactly this in
    its custom optimizer example, but has no public name for it; a public
    one (or public per-variable slots) would let this go.

    Args:
        optimizer: a built Keras optimizer.
        variable: the variable `update_step` received.

    Returns:
        Its index, e.g. into slot lists made in `build()`.
    """
    return optimizer._get_variable_index(variable)


# --------------------------------------------------------------------------
# Model: the first-batch build under MultiWorkerMirroredStrategy
# --------------------------------------------------------------------------

_LOCAL_BATCH_BUILD = "compat.LocalBatchBuild (keras-team/keras#20585)"
require(keras.Model, "_maybe_symbolic_build", ("iterator", "data_batch"), _LOCAL_BATCH_BUILD)


class LocalBatchBuild:
    """Model mixin: builds compiled loss and metrics from one replica's batch.

    Before `fit()` or `evaluate()`, Keras builds the compiled loss and metrics
    from a first batch when the model was made under a strategy. It averages
    that distributed batch over the replicas with an eager `strategy.reduce`
    only to read its shapes, and under `MultiWorkerMirroredStrategy` that
    reduce fails ("Attempt to convert a value (PerReplica...) to a Tensor",
    keras-team/keras#20585, open). One replica's local batch has the same
    structure and dtypes and needs no collective, so this mixin hands Keras
    that instead. Keras still decides whether to build at all (only for a
    model made under a strategy): the batch is read only when it would be.

    The hook is Keras' private `Model._maybe_symbolic_build`, which the TF
    trainer calls with the epoch iterator (`fit`, `evaluate`) or a batch
    (`train_on_batch`, `test_on_batch`). Drop the mixin once #20585 is fixed.

    Put it before `keras.Model` in the bases. A subclass may override
    `_batch_for_build(data_batch)` to change the batch Keras builds from
    (only shapes and dtypes are read).
    """

    def _batch_for_build(self, data_batch):
        """The batch (local to one replica) Keras builds compiled metrics from."""
        return data_batch

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            iterator = _first_replica(iterator, self.distribute_strategy, self._batch_for_build)
        if data_batch is not None:
            data_batch = self._batch_for_build(data_batch)
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def _first_replica(
    epoch: Iterable, strategy: tf.distribute.Strategy, prepare: Callable[[Any], Any]
):
    """Keras' epoch iterator, its batches replaced by the first replica's."""
    for begin, end, batches in epoch:
        yield begin, end, _FirstReplicaBatches(batches, strategy, prepare)


class _FirstReplicaBatches:
    """An iterator of distributed batches that yields each one's first replica."""

    def __init__(self, batches, strategy: tf.distribute.Strategy, prepare: Callable[[Any], Any]):
        self._batches = batches
        self._strategy = strategy
        self._prepare = prepare

    def __iter__(self):
        return self

    def __next__(self):
        return self._prepare(tf.nest.map_structure(self._local, next(self._batches)))

    def _local(self, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return self._strategy.experimental_local_results(value)[0]
        return value


check_keras_version()

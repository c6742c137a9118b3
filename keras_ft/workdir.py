"""The workdir contract: what a run writes, and when a rerun may resume it.

Layout of a run's directory (scripts, docs and users rely on it):

    config.json     the resolved config of the run (`write_json`)
    data_scan.json  the check of every input file before training
    checkpoints/    atomic checkpoints (keras_ft.checkpoint); a rerun resumes
                    from the newest at the exact step
    history.csv     one row per finished epoch (`write_history`)
    tensorboard/    TensorBoard logs
    metrics.json    final metrics: the task's main metric (`val_accuracy`,
                    ...), `val_loss`, `train_images_per_sec`, `epochs`,
                    `steps`, ...
    export/         the SavedModel

Every file here is written whole or not at all: to a temporary name,
flushed and fsynced, then renamed over the old one (`write_atomic`).

A rerun on the same workdir resumes only with the config it started with
(`check_resumable`), except for `RESUMABLE_CHANGES`. Saved configs are read
over today's defaults (`with_defaults`): keys added since take their
defaults, renamed keys (`RENAMED`) move to their new names, so a workdir
from an older keras_ft still resumes, evaluates and exports.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time

import ml_collections
from absl import logging

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
SCAN_FILE = "data_scan.json"
CHECKPOINTS = "checkpoints"
EXPORT = "export"
TENSORBOARD = "tensorboard"
MAX_CONFIG_BYTES = 2**20  # a config.json is a few KB
# Temporary names of a write that a killed run left behind (`write_atomic`,
# keras_ft.export); checkpoints sweep their own (keras_ft.checkpoint).
LEFTOVERS = (".export-", ".tflite-")

# Keys that may differ between a run and its resumption: the learning rate,
# so that a run stopped by a NaN loss can resume from its last good
# checkpoint at a lower rate, and what changes speed, not results: the
# strategy among them, since the global batch (and so every step) stays the
# same on any number of replicas; a run preempted on 8 GPUs may go on on 4.
RESUMABLE_CHANGES = frozenset({
    "resume", "optimizer.learning_rate", "data.cache_images_mb", "train.jit_compile",
    "distribute.strategy", "distribute.cpu_devices", "train.progress", "export.which",
})

# Keys of configs saved by earlier keras_ft versions, and their names today.
RENAMED = {
    "data.tfds_split": "data.tfds.split",
    "data.tfds_val_split": "data.tfds.val_split",
    "data.tfds_data_dir": "data.tfds.data_dir",
    "data.tfds_download": "data.tfds.download",
    "data.tfds_image_key": "data.tfds.image_key",
    "data.tfds_label_key": "data.tfds.label_key",
    "optimizer.schedule": "schedule.name",
    "optimizer.warmup_steps": "schedule.warmup_steps",
    "optimizer.decay_boundaries": "schedule.decay_boundaries",
    "optimizer.decay_factor": "schedule.decay_factor",
    "optimizer.stlr_cut_frac": "schedule.stlr_cut_frac",
    "optimizer.stlr_ratio": "schedule.stlr_ratio",
}


# ------------------------------------------------------------------ writing


def write_atomic(path: str, content: str | bytes) -> None:
    """Writes `content` to `path` whole or not at all: a temporary file in
    the same folder, flushed and fsynced, then renamed over `path`."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    """`obj` as indented, key-sorted JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_history(path: str, history: list[dict]) -> None:
    """One CSV row per finished epoch (column `epoch` counts from 1), atomically."""
    keys = sorted({k for row in history for k in row})
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["epoch"] + keys, lineterminator="\n")
    writer.writeheader()
    for epoch, row in enumerate(history, 1):
        writer.writerow(dict(row, epoch=epoch))
    write_atomic(path, text.getvalue())


# ------------------------------------------------------------------ configs


def flatten(d: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A saved config over today's defaults (configs/base.py).

    Keys added to keras_ft since the run was trained take their defaults;
    renamed keys (`RENAMED`) take their new names; keys that no longer exist
    are ignored with a warning.
    """
    from configs import base

    config = base.get_config()
    for key, value in flatten(saved).items():
        key = RENAMED.get(key, key)
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            logging.warning("Ignoring config key %s of the saved run (unknown today).", key)
            continue
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except TypeError:  # a value of the wrong type, as the flag parser refuses it
            kind = {int: "an integer", float: "a number", str: "a string", bool: "True or False",
                    tuple: "a list"}.get(type(node[leaf]), type(node[leaf]).__name__)
            raise ValueError(f"{key} must be {kind}, got {value!r:.80}.") from None
    return config


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with, over today's defaults.

    What every entry point that reuses a run (evaluate, export) must read:
    e.g. `data.resize`, the resize policy of training, validation and the
    export, is "resize" for runs from before the key existed.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{workdir} has no {CONFIG_FILE}: is it a keras_ft workdir?")
    if not os.path.isfile(path):  # a FIFO would block the read
        raise ValueError(f"{path} is not a regular file; restore it or use another workdir.")
    try:
        with open(path, "rb") as f:
            saved = json.loads(f.read(MAX_CONFIG_BYTES + 1))
    except ValueError as e:  # also UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or use another workdir.") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a JSON object of config keys; restore it or use another workdir.")
    try:
        return with_defaults(saved)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------ resuming


def has_checkpoints(workdir: str) -> bool:
    """Whether `workdir/checkpoints/` holds any checkpoint (complete or not)."""
    from keras_ft import checkpoint  # TensorFlow: only when a run starts

    directory = os.path.join(workdir, CHECKPOINTS)
    return os.path.isdir(directory) and any(
        name.startswith(checkpoint.PREFIX) for name in os.listdir(directory)
    )


def check_resumable(workdir: str, resolved: dict) -> None:
    """A rerun must match the config the workdir was started with.

    Keys added to keras_ft since the run started count as their defaults, so
    a new key does not stop old runs from resuming; setting one does.

    Raises:
        ValueError: naming every differing key with both values.
    """
    def plain(config: dict) -> dict:  # tuples and lists compare equal, as in JSON
        return flatten(json.loads(json.dumps(config)))

    before, now = plain(load_config(workdir).to_dict()), plain(resolved)
    differing = sorted(
        k for k in before.keys() | now.keys()
        if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)
    )
    if differing:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differing)
        raise ValueError(
            f"Cannot resume {workdir}: config differs ({details}). Use the same "
            "config, another --workdir, or --config.resume=False to start over."
        )
    for k in sorted(RESUMABLE_CHANGES - {"resume"}):
        if before.get(k) != now.get(k):
            logging.warning("Resuming with %s changed: %r -> %r.", k, before.get(k), now.get(k))


def set_aside(workdir: str) -> str | None:
    """Moves old checkpoints aside (never deletes them); returns where to."""
    old = os.path.join(workdir, CHECKPOINTS)
    if not (os.path.isdir(old) and os.listdir(old)):
        return None
    aside = f"{old}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(old, aside)
    logging.warning("resume=False: previous checkpoints moved to %s.", aside)
    return aside


def start(workdir: str, out: str, resolved: dict, resume: bool) -> bool:
    """Opens `workdir` for a run of the `resolved` config; returns whether it
    holds checkpoints to resume from.

    A rerun with `resume` must match the saved config; without it, old
    checkpoints are set aside. `out` is where this process writes: the
    workdir itself, or a scratch folder on a worker that is not the chief.
    """
    check_writable(out)
    found = has_checkpoints(workdir)
    if resume and found:
        check_resumable(workdir, resolved)
    elif not resume and out == workdir:
        set_aside(workdir)
    sweep(out)
    write_json(os.path.join(out, CONFIG_FILE), resolved)
    return found


def check_writable(path: str) -> None:
    """Creates the folder `path` if need be and writes a file in it, so that a
    workdir that cannot be written fails before any long work.

    Raises:
        ValueError: naming the folder and why (a file, read-only, no space).
    """
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(20, "it is a file, not a folder", path)
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        write_atomic(probe, b"")
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"workdir {path} is not writable: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename and e.filename != path else "")
            + "; give another --workdir."
        ) from None


def sweep(path: str) -> None:
    """Removes what a killed run left half-written in `path` (`LEFTOVERS`,
    and `write_atomic`'s temporary files): never a finished file."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name.startswith(LEFTOVERS) or (name.startswith(".") and ".tmp-" in name):
            logging.warning("Removing %s, left by a run that was stopped.", full)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.remove(full)

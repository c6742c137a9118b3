"""Atomic, resumable checkpoints of a training run.

A checkpoint is a folder `checkpoints/ckpt-EEEEEE` holding a
`tf.train.Checkpoint` of the model and optimizer (weights, velocities,
iteration count, learning-rate scale) and `state.json` (the epoch it ends,
the training history so far). It is written into a temporary folder, flushed
to disk and renamed into place, so a crash mid-save never leaves a partial
checkpoint under a final name; leftover temporary folders are swept on start.
The newest `keep` checkpoints are kept. If the newest cannot be read, the one
before it is used, and the log says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf
from absl import logging

PREFIX = "ckpt-"
STATE_FILE = "state.json"


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves and restores `tf.train.Checkpoint`s atomically.

    Args:
        directory: where the `ckpt-*` folders live.
        keep: how many of the newest checkpoints to keep.
        **objects: what to checkpoint (e.g. `model=..., optimizer=...`).
    """

    def __init__(self, directory: str, keep: int = 2, **objects):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}.")
        self.directory = directory
        self.keep = keep
        self.checkpoint = tf.train.Checkpoint(**objects)
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.startswith(".tmp-"):
                logging.warning("Removing incomplete checkpoint %s.", name)
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

    def all(self) -> list[str]:
        """Complete checkpoint folders, oldest first."""
        names = [n for n in os.listdir(self.directory) if n.startswith(PREFIX)]
        return [os.path.join(self.directory, n) for n in sorted(names)]

    def save(self, epoch: int, state: dict) -> str:
        """Writes the checkpoint that ends epoch `epoch` (1-based)."""
        final = os.path.join(self.directory, f"{PREFIX}{epoch:06d}")
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=self.directory)
        try:
            self.checkpoint.write(os.path.join(tmp, "ckpt"))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(dict(state, epoch=epoch), f)
            _fsync_tree(tmp)
            if os.path.exists(final):  # rewriting an epoch after a fallback
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore_latest(self) -> dict | None:
        """Restores the newest readable checkpoint; returns its state or None."""
        for path in reversed(self.all()):
            try:
                with open(os.path.join(path, STATE_FILE)) as f:
                    state = json.load(f)
                self.checkpoint.read(os.path.join(path, "ckpt")).assert_consumed()
            except (OSError, ValueError, IndexError, AssertionError, tf.errors.OpError) as e:
                logging.warning(
                    "Checkpoint %s is unreadable (%s); trying the one before.",
                    path, str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
                continue
            logging.info("Resumed from %s (epoch %d).", path, state["epoch"])
            return state
        return None


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves a checkpoint at the end of every epoch, with the history so far.

    Args:
        manager: the `CheckpointManager` to save with.
        history: the list of per-epoch log dicts to store (and extend).
        extra: more JSON-able state to store with every checkpoint.
    """

    def __init__(self, manager: CheckpointManager, history: list[dict], extra: dict | None = None):
        super().__init__()
        self.manager = manager
        self.history = history
        self.extra = dict(extra or {})

    def on_epoch_end(self, epoch, logs=None):
        self.history.append({k: float(v) for k, v in (logs or {}).items()})
        self.manager.save(epoch + 1, dict(self.extra, history=self.history))

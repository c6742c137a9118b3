"""Checkpoints that never lose work: atomic, step-exact, finite, preemptible.

A checkpoint is a folder `checkpoints/ckpt-SSSSSSSSS`, named by the global
training step it was taken after, holding a `tf.train.Checkpoint` of the
model, the optimizer (weights, velocities, iteration count, learning-rate
scale), the L2-SP reference weights and the random-number state of the
model's layers (dropout, augmentation), and `state.json`: the epoch and the
step within it, the stage, the training history so far and the partial sums
of the epoch's metrics. Together with the seeded training stream
(`keras_ft.data.make_dataset`), that is everything needed to continue the run
at the exact step, as if it had never stopped.

Guarantees:
- Atomic: a checkpoint is written into a temporary folder, flushed to disk
  and renamed into place, so a crash mid-save never leaves a partial
  checkpoint under a final name; leftover temporary folders are swept on
  start. The newest `keep` checkpoints are kept.
- Fallback: if the newest cannot be read (truncated, corrupt), the one
  before it is restored, and the log says so.
- Finite: a save whose variables hold a NaN or infinity is refused
  (`NonFiniteState`), so every committed checkpoint is a good one.
- Preemption: `TrainingCheckpoint` saves at the next step boundary after a
  SIGTERM (`keras_ft.preemption`) and raises `Preempted`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_ft import best as best_lib, callbacks

PREFIX = "ckpt-"
STATE_FILE = "state.json"
BEST = "best"  # checkpoints/best/: the checkpoint.keep_best checkpoint


class NonFiniteState(FloatingPointError):
    """A variable to be checkpointed holds a NaN or infinity."""


class Preempted(Exception):
    """Training stopped on request (SIGTERM) after saving a checkpoint.

    Attributes:
        path: the checkpoint written before stopping.
        global_step: the training step it holds.
    """

    def __init__(self, path: str | None, global_step: int):
        saved = f"saved {path}" if path else "stopped before training (nothing new to save)"
        super().__init__(
            f"Preempted: {saved} at step {global_step}; rerun the same command to resume."
        )
        self.path = path
        self.global_step = global_step


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


def rng_state(model: keras.Model) -> list:
    """The state variables of the model's seed generators (dropout, random
    augmentation): not part of Keras' own checkpoint, but needed for a resumed
    run to draw the same random numbers as an uninterrupted one."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def model_objects(model: keras.Model, reference: list) -> dict:
    """What a training checkpoint of a `keras_ft.Classifier` holds: the
    model, its optimizer, θ0, the random-number state and, with
    `optimizer.ema_decay`, the weights' moving averages (`keras_ft.ema`)."""
    objects = dict(
        model=model, optimizer=model.optimizer, reference=reference, rng=rng_state(model)
    )
    if getattr(model, "ema", None) is not None:
        objects["ema"] = model.ema.averages
    return objects


def _variables(trackable) -> list:
    if isinstance(trackable, (list, tuple)):
        return [v for t in trackable for v in _variables(t)]
    if isinstance(trackable, keras.optimizers.Optimizer):
        return list(trackable.variables)
    if isinstance(trackable, keras.Model):
        return list(trackable.variables)
    return [trackable]


def fingerprint(model: keras.Model) -> str:
    """SHA-256 of every variable of `model` (values, in order): equal on two
    machines exactly when their weights are bitwise equal, e.g. the workers
    of a multi-worker run."""
    digest = hashlib.sha256()
    for v in model.variables:
        digest.update(np.ascontiguousarray(v.numpy()).tobytes())
    return digest.hexdigest()


class CheckpointManager:
    """Saves and restores `tf.train.Checkpoint`s atomically.

    Args:
        directory: where the `ckpt-*` folders live.
        keep: how many of the newest checkpoints to keep.
        read_directory: where `restore_latest` looks (default: `directory`).
            A multi-worker run's other workers save into a temporary
            folder but restore the chief's checkpoints.
        **objects: what to checkpoint (e.g. `model=..., optimizer=...`);
            `model_objects` gives those of a training run.
    """

    def __init__(
        self, directory: str, keep: int = 2, read_directory: str | None = None, **objects
    ):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}.")
        self.directory = directory
        self.read_directory = read_directory or directory
        self.keep = keep
        self.objects = objects
        self.checkpoint = tf.train.Checkpoint(**objects)
        os.makedirs(directory, exist_ok=True)
        for folder in (directory, os.path.join(directory, BEST)):
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                if name.startswith(".tmp-"):
                    logging.warning("Removing incomplete checkpoint %s.",
                                    os.path.relpath(os.path.join(folder, name), directory))
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)

    def all(self, directory: str | None = None) -> list[str]:
        """Complete checkpoint folders in `directory` (default: the one saved
        to), oldest first."""
        return self.all_in(directory or self.directory)

    @staticmethod
    def all_in(directory: str) -> list[str]:
        """Complete checkpoint folders in `directory`, oldest first."""
        if not os.path.isdir(directory):
            return []
        names = [n for n in os.listdir(directory) if n.startswith(PREFIX)]
        return [os.path.join(directory, n) for n in sorted(names)]

    def non_finite(self) -> list[str]:
        """Paths of the checkpointed float variables holding a NaN or infinity."""
        bad = []
        for value in self.objects.values():
            for v in _variables(value):
                dtype = tf.as_dtype(v.dtype)
                if dtype.is_floating and not np.isfinite(np.asarray(v.numpy())).all():
                    bad.append(getattr(v, "path", None) or v.name)
        return bad

    def save(self, global_step: int, state: dict) -> str:
        """Writes the checkpoint taken after training step `global_step`.

        Raises:
            NonFiniteState: a variable holds a NaN or infinity; nothing is
                written, the previous checkpoints stay as they are.
        """
        bad = self.non_finite()
        if bad:
            raise NonFiniteState(
                f"Not saving step {global_step}: {len(bad)} variable(s) are NaN or "
                f"infinite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                "the last checkpoint is the last good state. Lower "
                "optimizer.learning_rate (or set optimizer.clip_norm) and rerun to resume."
            )
        final = os.path.join(self.directory, f"{PREFIX}{global_step:09d}")
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=self.directory)
        try:
            self.checkpoint.write(os.path.join(tmp, "ckpt"))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(dict(state, global_step=global_step), f)
            _fsync_tree(tmp)
            if os.path.exists(final):  # rewriting a step after a fallback
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @property
    def best_directory(self) -> str:
        return os.path.join(self.directory, BEST)

    def keep_as_best(self, path: str) -> str:
        """Keeps the checkpoint folder `path` (already saved) as the best one:
        `checkpoints/best/ckpt-SSSSSSSSS`, its files hard-linked (copied where
        links fail), atomically, replacing the previous best.

        Resume never reads it: it is what `export.which="best"` exports.
        """
        os.makedirs(self.best_directory, exist_ok=True)
        final = os.path.join(self.best_directory, os.path.basename(path))
        if os.path.isdir(final):
            return final
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=self.best_directory)
        try:
            for name in os.listdir(path):
                try:
                    os.link(os.path.join(path, name), os.path.join(tmp, name))
                except OSError:  # another file system, or no hard links
                    shutil.copy2(os.path.join(path, name), os.path.join(tmp, name))
            _fsync_tree(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.best_directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.all(self.best_directory):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def read_state(path: str) -> dict:
        """The `state.json` of the checkpoint folder `path`.

        Raises:
            ValueError: not JSON, not an object, or a known key missing or of
                the wrong type (a corrupt file: the caller falls back).
        """
        if not os.path.isfile(os.path.join(path, STATE_FILE)):  # missing, or a FIFO
            raise ValueError(f"{STATE_FILE} is missing or not a regular file")
        with open(os.path.join(path, STATE_FILE), "rb") as f:
            state = json.loads(f.read(2**26))  # 64 MB: far more than any history
        types = {"global_step": int, "epoch": int, "step": int, "history": list, "class_names": list}
        if not isinstance(state, dict) or "global_step" not in state or any(
            key in state and not isinstance(state[key], kind) for key, kind in types.items()
        ) or not all(isinstance(n, str) for n in state.get("class_names", [])):
            raise ValueError(f"{STATE_FILE} is not a checkpoint state")
        return state

    def restore_latest(self) -> dict | None:
        """Restores the newest readable checkpoint; returns its state or None."""
        for path in reversed(self.all(self.read_directory)):
            try:
                state = self.read_state(path)
                self.checkpoint.read(os.path.join(path, "ckpt")).assert_consumed()
            except (OSError, ValueError, IndexError, AssertionError, tf.errors.OpError) as e:
                logging.warning(
                    "Checkpoint %s is unreadable (%s); trying the one before.",
                    path, str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
                continue
            logging.info("Restored %s.", path)
            return dict(state, path=path)
        return None


class TrainingCheckpoint(callbacks.ResumableStep, keras.callbacks.Callback):
    """Saves checkpoints during `fit()`: at every epoch end, every
    `every_steps` steps, every `every_seconds` seconds, and on preemption.

    A checkpoint taken inside an epoch also stores the partial sums of the
    epoch's metrics, so the resumed epoch reports the same loss and accuracy
    as an uninterrupted one. The last step of an epoch is saved by the epoch
    end (after validation), not twice.

    Args:
        manager: the `CheckpointManager` to save with.
        history: the list of per-epoch log dicts to store (and extend).
        steps_per_epoch: the run's steps per epoch.
        every_steps: also save every this many global steps (0 = off).
        every_seconds: also save when this long has passed since the last
            save (0 = off).
        extra: more JSON-able state to store with every checkpoint.
        preemption: a `keras_ft.preemption.Watch`; when it reports a request,
            save at the next step boundary and raise `Preempted`.
        describe_stage: a function of no arguments giving the current stage,
            stored for the record.
        agree: a function from a list of flags to the same flags OR-ed over
            all workers (`keras_ft.distribute.any_worker`), so that every
            worker of a multi-worker run saves at the same step (a save
            reads the metric sums, a collective) and stops together when
            any of them is preempted. Default: each worker decides alone.
        more_state: a function of no arguments giving more JSON-able state
            as it is at the save (e.g. `keras_ft.health.LossGuard.state`).
        best: a `keras_ft.best.BestMetric` updated at each epoch end before
            the save (its state saved with it); with `keep_best`, a new best epoch's
            checkpoint is also kept in `checkpoints/best/`. When it says
            stop (early stopping), `fit()` ends after the save.
        keep_best: keep the best epoch's checkpoint (`checkpoint.keep_best`).
    """

    def __init__(
        self,
        manager: CheckpointManager,
        history: list[dict],
        steps_per_epoch: int,
        every_steps: int = 0,
        every_seconds: float = 0.0,
        extra: dict | None = None,
        preemption=None,
        describe_stage=None,
        agree=None,
        more_state=None,
        best: best_lib.BestMetric | None = None,
        keep_best: bool = False,
    ):
        super().__init__()
        if every_steps < 0 or every_seconds < 0:
            raise ValueError(
                "checkpoint.every_steps and checkpoint.every_seconds must be >= 0, got "
                f"{every_steps} and {every_seconds}."
            )
        self.manager = manager
        self.history = history
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.extra = dict(extra or {})
        self.preemption = preemption
        self.describe_stage = describe_stage
        self.agree = agree or (lambda flags: flags)
        self.more_state = more_state or dict
        self.best, self.keep_best = best, keep_best
        self.metric_sums = None  # a resumed epoch's partial metric sums
        self._epoch = 0
        self._last_save = time.monotonic()

    def resume_at(self, step: int, metric_sums: list | None = None) -> None:
        """The next `fit()` starts `step` steps into its first epoch, whose
        metrics had summed to `metric_sums` (from the checkpoint's state)."""
        super().resume_at(step)
        self.metric_sums = metric_sums if step else None

    def save_start(self, model) -> str:
        """Saves `model` as it is before its first training step: what a
        rollback (keras_ft.health) in the first epoch returns to."""
        self.set_model(model)
        return self._save(0, 0, None)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.metric_sums is not None:  # after the resumed epoch's first step
            variables = self.model.metrics_variables
            if len(variables) != len(self.metric_sums):
                raise ValueError(
                    f"The checkpoint holds {len(self.metric_sums)} metric sums, the "
                    f"model has {len(variables)} metric variables: compile() changed."
                )
            for v, total in zip(variables, self.metric_sums):
                v.assign(v.value + np.asarray(total, v.dtype))
            self.metric_sums = None
        step = self.step_in_epoch(batch)
        if step >= self.steps_per_epoch:
            return  # on_epoch_end saves it, with the validation results
        global_step = self._epoch * self.steps_per_epoch + step
        preempted, due = self.agree([
            self._preempted(),
            bool(
                (self.every_steps and global_step % self.every_steps == 0)
                or (self.every_seconds
                    and time.monotonic() - self._last_save >= self.every_seconds)
            ),
        ])
        if preempted or due:
            metric_sums = [np.asarray(v.numpy()).tolist() for v in self.model.metrics_variables]
            path = self._save(self._epoch, step, metric_sums)
            if preempted:
                raise Preempted(path, global_step)

    def on_epoch_end(self, epoch, logs=None):
        self.end_resumed_epoch()
        self.history.append({k: float(v) for k, v in (logs or {}).items()})
        global_step = (epoch + 1) * self.steps_per_epoch
        improved = self.best is not None and self.best.update(epoch + 1, global_step, logs or {})
        path = self._save(epoch + 1, 0, None)
        if improved and self.keep_best:
            logging.info("New %s: kept as %s.", self.best.describe(),
                         self.manager.keep_as_best(path))
        if self.agree([self._preempted()])[0]:
            raise Preempted(path, global_step)
        if self.best is not None and self.best.stop:
            self.model.stop_training = True  # early stopping: after the save

    def repair_best(self) -> None:
        """After a resume: a kill between an epoch's save and keeping it as
        the best leaves the best only in the state; keep its checkpoint now."""
        step = self.best.global_step if self.best is not None else None
        if not self.keep_best or step is None:
            return
        path = os.path.join(self.manager.directory, f"{PREFIX}{step:09d}")
        kept = os.path.join(self.manager.best_directory, f"{PREFIX}{step:09d}")
        if not os.path.isdir(kept) and os.path.isdir(path):
            logging.info("Keeping %s as the best checkpoint (the run stopped before it was).", path)
            self.manager.keep_as_best(path)

    def _preempted(self) -> bool:
        return self.preemption is not None and self.preemption.requested

    def _save(self, epoch: int, step: int, metric_sums) -> str:
        state = dict(
            self.extra,
            **self.more_state(),
            **(self.best.state() if self.best is not None else {}),
            epoch=epoch,
            step=step,
            steps_per_epoch=self.steps_per_epoch,
            iterations=int(self.model.optimizer.iterations.numpy()),
            stage=self.describe_stage() if self.describe_stage else None,
            history=self.history,
            metric_sums=metric_sums,
            time=time.time(),
        )
        path = self.manager.save(epoch * self.steps_per_epoch + step, state)
        self._last_save = time.monotonic()
        logging.info("Saved %s.", path)
        return path

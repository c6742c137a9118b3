"""Progress of long work: a Keras progress bar on a terminal, log lines elsewhere.

`train.progress` chooses, once per run (`choose`): "bar" draws Keras' own
`Progbar` on stdout (training epochs, with ETA, images/s and the running
loss and accuracy; and the long preparations: the file scan, feature
caching, the range test); "log" writes a concise absl line every
`EVERY_S` seconds instead, which is what files, CI logs and the workers
other than the chief get. "auto" is "bar" exactly when stdout is a terminal
(or a Jupyter notebook) and this process is the chief.

The choice is process-wide (`set_mode`), set by the trainer and the
`launch.*` scripts from the config, because the preparations it governs
are deep inside modules that take no config.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import time

import keras
from absl import logging

MODES = ("auto", "bar", "log")
EVERY_S = 30.0  # seconds between log lines in "log" mode

_mode = "log"


def choose(setting: str, chief: bool = True) -> str:
    """The mode for `train.progress` = `setting`: "bar" or "log"."""
    if setting not in MODES:
        raise ValueError(f"Unknown train.progress {setting!r}. Choose one of: {', '.join(MODES)}.")
    if setting == "auto":
        return "bar" if chief and _is_terminal(sys.stdout) else "log"
    return setting


def _is_terminal(stream) -> bool:
    """A terminal, or a Jupyter notebook (where Progbar redraws in place)."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def set_mode(mode: str) -> None:
    """Sets the process-wide mode ("bar" or "log") for `Counter`s."""
    global _mode
    if mode not in ("bar", "log"):
        raise ValueError(f"progress mode must be 'bar' or 'log', got {mode!r}.")
    _mode = mode


def mode() -> str:
    return _mode


class Counter:
    """Progress of `total` units of work named `label` (e.g. "Scanning images").

    In "bar" mode a `keras.utils.Progbar`; in "log" mode a line every
    `EVERY_S` seconds ("Scanning images: 1,200/5,000 files (410/s)").
    Nothing is printed for work that ends before the first line is due.

    Args:
        total: units of work (files, batches, steps); None if unknown.
        label: what is being done, for the log line.
        unit: the unit's name, plural ("files", "batches", "steps").
    """

    def __init__(self, total: int | None, label: str, unit: str = "steps"):
        self.total, self.label, self.unit = total, label, unit
        self._start = self._last = time.monotonic()
        self._bar = None
        if _mode == "bar":
            print(f"{label}:", flush=True)
            self._bar = keras.utils.Progbar(total, unit_name=unit.rstrip("s"))

    def update(self, done: int, **values) -> None:
        """`done` units are finished; `values` are shown beside them."""
        if self._bar is not None:
            self._bar.update(done, values=list(values.items()) or None)
            if self.total is not None and done >= self.total:
                self._bar = None  # Progbar ends itself at its target
            return
        now = time.monotonic()
        if now - self._last >= EVERY_S:
            self._last = now
            total = f"/{self.total:,}" if self.total else ""
            extra = "".join(f", {k}={v:.4g}" for k, v in values.items())
            logging.info("%s: %s%s %s (%.0f/s%s).", self.label, f"{done:,}", total,
                         self.unit, done / max(now - self._start, 1e-9), extra)

    def close(self, done: int | None = None) -> None:
        """Ends the bar (at `done` units, default the total)."""
        if self._bar is not None:
            done = self.total if done is None else done
            if done is not None:
                self._bar.update(done, finalize=True)
            self._bar = None



class _QuietFramework(std_logging.Filter):
    """Drops TensorFlow's and Keras' INFO chatter from the absl log (a line
    per checkpoint save, per SavedModel signature, per asset): a run's log
    holds keras_ft's lines, the user's, and every warning."""

    _FRAMEWORK = tuple(
        os.sep + name + os.sep for name in ("tensorflow", "keras", "tensorboard", "absl")
    )

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        return not any(part in record.pathname for part in self._FRAMEWORK)


_QUIET = _QuietFramework()


def quiet_framework_logs() -> None:
    """Installs `_QuietFramework` on absl's logger (once; idempotent)."""
    for name in ("absl", "tensorflow"):  # TensorFlow logs through both
        logger = std_logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)

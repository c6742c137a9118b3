"""Preemption: turn SIGTERM into "save at the next step boundary, then stop".

Schedulers (Kubernetes, Slurm, spot/preemptible VMs) send SIGTERM and, after
a grace period, SIGKILL. `Watch` records the request instead of dying;
`keras_ft.checkpoint.TrainingCheckpoint` then saves after the step in flight
and raises `Preempted`, and `launch.train` exits with `EXIT_PREEMPTED` (42,
TensorFlow's restart code in its own preemption handling). Rerunning the same
command resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

from absl import logging

EXIT_PREEMPTED = 42


class Watch:
    """A context manager that catches SIGTERM while it is active.

    Outside the main thread signals cannot be caught; the watch then does
    nothing (and says so), and SIGTERM keeps its usual effect.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        del frame
        if not self.requested:
            logging.warning(
                "%s received: saving a checkpoint at the next step boundary, then stopping.",
                signal.Signals(signum).name,
            )
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Not in the main thread: SIGTERM will not be caught.")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
        return False

"""`launch.train` with one fault injected at a global training step.

    python tests/faults.py KIND STEP --config=... --workdir=... [--config.X=...]

KIND:
    kill          SIGKILL (kill -9) right after step STEP (and its checkpoint,
                  if one is due there)
    kill_in_save  SIGKILL inside the first checkpoint save after step STEP,
                  once its files are written but before they are renamed
                  into place
    sigterm       SIGTERM during step STEP, as a scheduler's preemption notice
    nan           a NaN written into the head's kernel before step STEP

The rest of the command line is `launch.train`'s. Rerunning the plain
`python -m launch.train` command with the same flags must then resume.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, logging  # noqa: E402

from keras_ft import checkpoint, trainer  # noqa: E402
from launch import cli, train  # noqa: E402

KINDS = ("kill", "kill_in_save", "sigterm", "nan")


class Fault(keras.callbacks.Callback):
    def __init__(self, kind: str, step: int):
        super().__init__()
        self.kind, self.step = kind, step
        self.done = 0  # batches trained by this (fresh) run

    def on_train_batch_begin(self, batch, logs=None):
        if self.done + 1 != self.step:
            return
        if self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.kind == "nan":
            kernel = self.model.head.kernel
            kernel.assign(np.full(kernel.shape, np.nan, kernel.dtype))

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        done = self.done
        if self.kind == "kill" and done == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "kill_in_save" and done >= self.step:
            real_fsync = checkpoint._fsync_tree

            def fsync_then_die(path):
                real_fsync(path)
                os.kill(os.getpid(), signal.SIGKILL)

            checkpoint._fsync_tree = fsync_then_die


def main():
    kind, step, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if kind not in KINDS:
        sys.exit(f"KIND must be one of {', '.join(KINDS)}, got {kind!r}.")
    real_train = trainer.train
    trainer.train = lambda config, workdir: real_train(
        config, workdir, extra_callbacks=[Fault(kind, step)]
    )
    logging.set_verbosity(logging.INFO)
    app.run(train.main, argv=[sys.argv[0]] + rest, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()

"""What every `launch.*` script shares: exit codes, one-line errors, flags.

Exit codes:
    0  success
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input: flags, config, data, weights, workdir (one line on stderr)
    3  launch.train: the training loss or weights became NaN or infinite
       launch.export: the TFLite model failed its parity check
    4  launch.train: multi-worker, another worker was lost; restart all
    5  launch.train: the final validation result is at chance level
    42 launch.train: preempted (SIGTERM); saved, rerun to resume
"""

import os
import sys

from absl import flags

# TensorFlow's C++ start-up lines (CPU features, CUDA probing, oneDNN) are
# not the run's; TF_CPP_MIN_LOG_LEVEL=0 brings them back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_BAD_INPUT = 2

# What user-facing mistakes raise in keras_ft: reported as one line, exit 2.
# OSError: a path given by the user (workdir, weights, data, config) that
# cannot be read or written; its message names the path.
INPUT_ERRORS = (ValueError, KeyError, OSError)


def fail(message) -> int:
    """Prints `error: message` (one line) on stderr; returns EXIT_BAD_INPUT."""
    if isinstance(message, OSError) and message.filename:
        message = f"cannot use {message.filename}: {message.strerror or message}."
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"error: {text}", file=sys.stderr)
    return EXIT_BAD_INPUT


def parse_flags(argv):
    """absl's flag parsing, with a misspelt or mistyped key as a one-line error."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e)
        if "Traceback (most recent call last)" in text:  # a config file raised
            text = text.strip().splitlines()[-1]
        text = text.replace("\\n", " ").replace("\\'", "").strip("'\"")
        kind = "unknown config key" if isinstance(e, AttributeError) else "bad flags"
        sys.exit(fail(f"{kind}: {text}"))


def loaded_config(config_flag):
    """The value of a `config_flags` flag; None (after a one-line error) if
    its file failed to load (config_flags defers that error to first use)."""
    try:
        config = config_flag.value
        config.get("seed")
    except OSError as e:
        fail(e)
        return None
    return config


def load_workdir(workdir: str):
    """`(model, state, spec)` of a trained workdir's newest checkpoint
    (`keras_ft.job.load_trained`), or None after a one-line error (no such
    folder, not a workdir, no checkpoint)."""
    import os

    if not os.path.isdir(workdir):
        fail(f"workdir {workdir} does not exist.")
        return None
    from keras_ft import job  # after the checks: TensorFlow is slow to import

    try:
        return job.load_trained(workdir)
    except INPUT_ERRORS as e:
        fail(e)
        return None

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
import re
import sys
import tempfile

from absl import flags

# TensorFlow's C++ start-up lines (CPU features, CUDA probing, oneDNN) are
# not the run's; TF_CPP_MIN_LOG_LEVEL=0 brings them back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The start-up lines TensorFlow's C++ side writes before its logging is set
# up, which TF_CPP_MIN_LOG_LEVEL does not reach: import_tensorflow drops them.
_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|\] oneDNN custom operations are on"
    r"|cudart_stub\.cc|cpu_feature_guard\.cc|To enable the following instructions"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit")

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


def import_tensorflow():
    """`import tensorflow`, without its start-up lines on stderr.

    TensorFlow's C++ libraries log at load time, before `absl::InitializeLog`,
    so TF_CPP_MIN_LOG_LEVEL does not silence them (TF 2.21). The import and
    the device probe run with file descriptor 2 sent to a temporary file;
    afterwards every captured line that is not start-up noise (see
    `_STARTUP_NOISE`) is written to stderr, so nothing else is lost.
    TF_CPP_MIN_LOG_LEVEL=0 keeps them all.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow as tf

        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA probing logs here
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _STARTUP_NOISE.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()
    return tf


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
    import_tensorflow()  # after the checks: TensorFlow is slow to import
    from keras_ft import job

    try:
        return job.load_trained(workdir)
    except INPUT_ERRORS as e:
        fail(e)
        return None

"""Fine-tunes a pretrained backbone: `python -m launch.train`.

    python -m launch.train --config=configs/quickstart.py --workdir=/tmp/qs \\
        [--config.optimizer.learning_rate=0.003 ...]

Rerunning the same command on the same workdir resumes the run.

Exit codes:
    0  success
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input: config, data, weights (one line on stderr says what and how)
    3  the training loss became NaN or infinite (the last checkpoint is intact)
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE_LOSS = 3

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of this run.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's flag parsing, with a misspelt or mistyped key as a one-line error."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e)
        if "Traceback (most recent call last)" in text:  # a config file raised
            text = text.strip().splitlines()[-1]
        text = text.replace("\\n", " ").replace("\\'", "")
        message = " ".join(text.split()).strip("'\"")
        kind = "unknown config key" if isinstance(e, AttributeError) else "bad flags"
        print(f"error: {kind}: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = _CONFIG.value
        config.get("seed")  # a config file that failed to load raises here
    except OSError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from keras_ft import callbacks, trainer  # after flag parsing: TF is slow to import

    try:
        trainer.train(config, _WORKDIR.value)
    except callbacks.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE_LOSS
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=parse_flags)

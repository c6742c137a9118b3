"""Fine-tunes a pretrained backbone: `python -m launch.train`.

    python -m launch.train --config=configs/quickstart.py --workdir=/tmp/qs \\
        [--config.optimizer.learning_rate=0.003 ...]

Rerunning the same command on the same workdir resumes the run.

Exit codes:
    0  success
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input: config, data, weights (one line on stderr says what and how)
    3  the training loss (or a weight) became NaN or infinite; the last
       checkpoint is intact and finite: lower the learning rate and rerun
    4  multi-worker: another worker stopped or became unreachable mid-run;
       restart all workers (the job's own restart policy does)
    5  the final validation result is at chance level (train.fail_at_chance):
       one line names the likely cause and the fix; nothing was exported
    42 preempted: SIGTERM arrived, a checkpoint was saved at the next step
       boundary; rerun the same command to resume (TensorFlow's restart code)

The command is idempotent: a scheduler can simply run it again after any
exit, including a kill -9; it resumes at the newest complete checkpoint and
does nothing more once the run is complete.
"""


from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

EXIT_NON_FINITE_LOSS = 3
EXIT_PEER_LOST = 4
EXIT_CHANCE_LEVEL = 5

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of this run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = cli.loaded_config(_CONFIG)
    if config is None:
        return cli.EXIT_BAD_INPUT
    # After flag parsing: TensorFlow is slow to import.
    tf = cli.import_tensorflow()

    from keras_ft import checkpoint, health, preemption, trainer

    try:
        trainer.train(config, _WORKDIR.value)
    except FloatingPointError as e:  # callbacks.NonFiniteLoss, checkpoint.NonFiniteState
        cli.fail(e)
        return EXIT_NON_FINITE_LOSS
    except health.ChanceLevel as e:
        cli.fail(e)
        return EXIT_CHANCE_LEVEL
    except checkpoint.Preempted as e:
        logging.warning("%s", e)
        return preemption.EXIT_PREEMPTED
    except tf.errors.UnavailableError as e:  # multi-worker: a peer process is gone
        peer = next((l.strip() for l in str(e).splitlines() if "/job:" in l), "")
        cli.fail(
            f"lost contact with another worker{' (' + peer + ')' if peer else ''}; "
            "restart every worker with the same command: they resume together from "
            "the chief's last checkpoint."
        )
        return EXIT_PEER_LOST
    except cli.INPUT_ERRORS as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=cli.parse_flags)

"""Runs the learning-rate range test of a config: `python -m launch.lr_find`.

    python -m launch.lr_find --config=configs/quickstart.py --workdir=/tmp/qs_lr

Builds the model and data exactly as `launch.train` would (same config file
and overrides, same strategy) and runs `keras_ft.lr_finder.find_learning_rate`
over the training stream (`optimizer.lr_find.*`) in each freezing stage that
trains a new set of blocks (`keras_ft.lr_stages`), and writes

    WORKDIR/lr_find/lr_find.csv         stage 1: step, lr, loss, smoothed_loss
    WORKDIR/lr_find/lr_find_stageK.csv  each further tested stage's curve
    WORKDIR/lr_find/lr_find.png         the curves with their suggestions
    WORKDIR/lr_find/lr_find.json        the suggestions: stage 1's ("suggestion",
                                        the learning rate) and each stage's

then prints them. It trains nothing that is kept: the model is restored after
each test and no checkpoint is written. Pass stage 1's value with
`--config.optimizer.learning_rate=...` (and the stages' factors to their
`lr_scale`), or let `launch.train` run the tests itself with
`--config.optimizer.learning_rate=auto`.

Runtime: about 15 s per tested stage for configs/quickstart.py on 2 CPU
cores (100 steps each).
Exit codes as `launch.train`: 0 success, 1 a bug, 2 bad input.
"""

import os

from absl import app, flags, logging

from launch import cli
from launch import train  # noqa: F401  (defines the same --config and --workdir flags)

FLAGS = flags.FLAGS


def run(config, workdir: str) -> dict:
    """The range tests of `config`'s stages; returns the saved summary."""
    import json

    cli.import_tensorflow()
    from keras_ft import job as job_lib, lr_finder, lr_stages, progress, spec as spec_lib
    from keras_ft import workdir as workdir_lib

    spec = spec_lib.resolve(config)
    progress.quiet_framework_logs()
    progress.set_mode(progress.choose(spec.train.progress))
    directory = os.path.join(workdir, "lr_find")
    workdir_lib.check_writable(directory)  # before the sweep, not after it
    job = job_lib.assemble(spec)
    job_lib.reestimate_if_configured(job)
    rates = lr_stages.find(job, directory, spec.model.backbone)  # augmented as launch.train's
    first = rates.tests[0]
    lines = [
        f"Suggested learning rate (valley): {first.valley:.3g}; steepest descent: "
        f"{first.steepest:.3g}; {len(first.losses)} steps"
        f"{', stopped on divergence' if first.diverged else ''}."
    ]
    for i, test in rates.tests.items():
        if i:
            lines.append(
                f"Stage {i + 1} ({spec.freeze.stages[i].describe()}): suggestion {test.valley:.3g}, "
                f"so its lr_scale x{rates.factors[i]:.3g}."
            )
    lines.append(
        f"Use --config.optimizer.learning_rate={first.valley:.3g} (or =auto in launch.train, "
        "which also applies the stages' factors)."
    )
    lines.append(f"Wrote {directory}/{{{', '.join(sorted(os.listdir(directory)))}}}")
    print("\n".join(lines))
    with open(os.path.join(directory, lr_finder.JSON_FILE)) as f:
        return json.load(f)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = cli.loaded_config(flags.FLAGS["config"])
    if config is None:
        return cli.EXIT_BAD_INPUT
    try:
        run(config, FLAGS.workdir)
    except cli.INPUT_ERRORS as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=cli.parse_flags)

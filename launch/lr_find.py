"""Runs the learning-rate range test of a config: `python -m launch.lr_find`.

    python -m launch.lr_find --config=configs/quickstart.py --workdir=/tmp/qs_lr

Builds the model and data exactly as `launch.train` would (same config file
and overrides, same strategy), puts the model in its first freezing stage,
runs `keras_ft.lr_finder.find_learning_rate` over the training stream
(`optimizer.lr_find.*`), and writes

    WORKDIR/lr_find/lr_find.csv    step, lr, loss, smoothed_loss
    WORKDIR/lr_find/lr_find.png    the curve with both suggestions
    WORKDIR/lr_find/lr_find.json   the suggestions (valley = "suggestion")

then prints the suggestion. It trains nothing that is kept: the model is
restored after the test and no checkpoint is written. Pass the value with
`--config.optimizer.learning_rate=...`, or let `launch.train` run the test
itself with `--config.optimizer.learning_rate=auto`.

Runtime: about 15 s for configs/quickstart.py on 2 CPU cores (100 steps).
Exit codes as `launch.train`: 0 success, 1 a bug, 2 bad input.
"""

import os

from absl import app, flags, logging

from launch import cli
from launch import train  # noqa: F401  (defines the same --config and --workdir flags)

FLAGS = flags.FLAGS


def run(config, workdir: str) -> dict:
    """The range test of `config`'s first stage; returns the saved summary."""
    from keras_ft import job as job_lib, lr_finder, spec as spec_lib, workdir as workdir_lib

    spec = spec_lib.resolve(config)
    directory = os.path.join(workdir, "lr_find")
    workdir_lib.check_writable(directory)  # before the sweep, not after it
    job = job_lib.assemble(spec)
    job_lib.reestimate_if_configured(job)
    job_lib.enter_first_stage(job)
    finder = spec.optimizer.lr_find
    test = lr_finder.find_learning_rate(
        job.model, job.data.train_stream(),  # augmented as launch.train's
        finder.start_lr, finder.end_lr, finder.steps,
    )
    title = f"{spec.model.backbone}, stage 1: {spec.freeze.stages[0].describe()}"
    paths = lr_finder.save(
        test, directory, title,
        extra={"stage": 1, "global_batch_size": job.batch, "data": spec.data.source},
    )
    summary = test.summary()
    print(
        f"Suggested learning rate (valley): {test.valley:.3g}; steepest descent: "
        f"{test.steepest:.3g}; {summary['steps_run']} steps"
        f"{', stopped on divergence' if test.diverged else ''}.\n"
        f"Use --config.optimizer.learning_rate={test.valley:.3g} "
        "(or =auto in launch.train).\n"
        f"Wrote {', '.join(sorted(paths.values()))}"
    )
    return summary


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

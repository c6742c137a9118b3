"""Answers the fine-tuning questions on a config's own data, by measurement.

    python -m launch.study --config=configs/fashion_mnist.py --study=depth --workdir=/tmp/fm_depth
    python -m launch.study --config=configs/quickstart.py --study=all --seeds=3 --workdir=/tmp/qs_study

--study: depth (all layers or the last few?), lr (which learning rate?),
scratch (fine-tune or train from scratch?), size (where does scratch catch
up?), peft (how cheaply?), a comma-separated list, or all. Each arm is a
normal keras_ft run of the config with a few keys changed, once per seed
(`keras_ft.study` lists the arms). Writes WORKDIR/study.json, study.md (the
tables and answers) and the plots (depth_params.png, peft_params.png,
lr.png, scratch.png, size.png), and prints each study's answer: the best
arm (and those inside its 95% interval) and the cheapest arm within one
point of it. Rerunning with the same flags skips recorded arms and resumes
an interrupted one. --config.KEY=VALUE overrides apply to every arm.

Exit codes: 0 done (failed arms are recorded in the results and the log),
1 a bug, 2 bad input.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file of the runs the study varies.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study (one sub-folder per arm).")
_STUDY = flags.DEFINE_string("study", "all", "depth, lr, scratch, size, peft, a comma-separated list, or all.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Runs per arm (seeds config.seed, +1, ...); at least 2.")
_FT_SCALE = flags.DEFINE_float("finetune_lr_scale", 0.1, "lr_scale of the stages that train blocks.")
_LR_GRID = flags.DEFINE_list("lr_grid", ["0.0333", "0.1", "0.333", "1", "3", "10"],
                             "lr study: multiples of the range test's suggestion.")
_SCRATCH = flags.DEFINE_list("scratch_steps", ["1", "3", "10"], "scratch study: multiples of the steps.")
_SIZES = flags.DEFINE_list("sizes", ["10", "50", "200", "1000"], "size study: training images per class.")
_RANKS = flags.DEFINE_list("lora_ranks", ["4", "16"], "peft study: LoRA ranks.")
flags.mark_flags_as_required(["config", "workdir"])


def _numbers(flag, kind):
    try:
        return tuple(kind(v) for v in flag.value)
    except ValueError:
        raise ValueError(f"--{flag.name}={','.join(flag.value)}: give {kind.__name__} values.") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = cli.loaded_config(_CONFIG)
    if config is None:
        return cli.EXIT_BAD_INPUT
    cli.import_tensorflow()
    from keras_ft import progress, study

    progress.quiet_framework_logs()
    try:
        options = study.Options(
            seeds=_SEEDS.value, finetune_lr_scale=_FT_SCALE.value,
            lr_grid=_numbers(_LR_GRID, float), scratch_steps=_numbers(_SCRATCH, int),
            sizes=_numbers(_SIZES, int), lora_ranks=_numbers(_RANKS, int),
        )
        result = study.run(config, _WORKDIR.value, study.parse_studies(_STUDY.value), options)
    except cli.INPUT_ERRORS as e:
        return cli.fail(e)
    lines = [f"{name}: {s['answer']}" for name, s in result["studies"].items()]
    failed = sum(1 for s in result["studies"].values() for r in s["runs"] if r["status"] != "ok")
    if failed:
        lines.append(f"{failed} run(s) failed: their causes are in study.md.")
    lines.append(f"Wrote {_WORKDIR.value}/study.json, study.md and the plots.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=cli.parse_flags)

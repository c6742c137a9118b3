"""BatchNorm statistics in fine-tuning: frozen, trainable, precise, re-estimated.

    python benchmarks/batchnorm.py [--per_class=150] [--scratch_epochs=15] \
        [--workdir=/tmp/keras_ft_batchnorm]

Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`): the
runs train on `sample:fashion_mnist_N` (N images per class, 10 classes, a
fifth held out for validation) at 97 px with the quickstart's pretrained
MobileNetV2, and report the final validation accuracy of:

- scratch: random init, every block and BatchNorm layer training from step 0
  (`freeze.batchnorm="trainable"`, lr 0.02), with `freeze.precise_bn="off"`
  (the moving statistics training leaves) and `"final"` (the default).
- the quickstart recipe (head 2 epochs, then the top 3 blocks; lr 0.01) with
  BatchNorm frozen; trainable with precise BN off; trainable with precise BN
  on (the default); and, from the precise-off run's weights, every backbone
  BatchNorm layer re-estimated afterwards (the tempting wrong fix: it also
  replaces the statistics the frozen blocks were trained against).

Each arm is a normal keras_ft run (`keras_ft.trainer.train`) in its own
sub-folder of --workdir; a finished arm is reused when the script runs
again. Precise BN never changes a trained weight, so a precise-off run's
weights with `keras_ft.freezing.precise_batchnorm` applied must score what
the precise-on run scores: the script checks that too. It also times one
precise-BN pass (the cost per epoch of `freeze.precise_bn="every_epoch"`).
Writes benchmarks/results/batchnorm.json.
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart  # noqa: E402
from keras_ft import freezing, job as job_lib, tasks, trainer  # noqa: E402

import _results  # noqa: E402  (benchmarks/_results.py)


def arms(per_class: int, scratch_epochs: int) -> dict:
    """Config overrides of each trained arm, over configs/quickstart.py."""
    # Op determinism: the precise-BN-off and -on runs of a pair train the
    # same weights bitwise (multi-threaded CPU kernels otherwise differ in
    # the last bit, and training from scratch amplifies that).
    # Some arms end at chance on purpose: they are measured, not failed.
    data = {
        "data.source": f"sample:fashion_mnist_{per_class}", "deterministic": True,
        "train.fail_at_chance": False,
    }
    scratch = dict(
        data,
        **{
            "model.weights": "none",
            "freeze.batchnorm": "trainable",
            "freeze.stages": (dict(epochs=scratch_epochs, blocks=-1),),
            "train.epochs": scratch_epochs,
            "optimizer.learning_rate": 0.02,
        },
    )
    trainable = dict(data, **{"freeze.batchnorm": "trainable"})
    return {
        "scratch_precise_off": dict(scratch, **{"freeze.precise_bn": "off"}),
        "scratch_precise_final": dict(scratch, **{"freeze.precise_bn": "final"}),
        "recipe_frozen": dict(data, **{"freeze.batchnorm": "frozen"}),
        "recipe_trainable_precise_off": dict(trainable, **{"freeze.precise_bn": "off"}),
        "recipe_trainable_precise_final": dict(trainable, **{"freeze.precise_bn": "final"}),
    }


def config_of(overrides: dict):
    config = quickstart.get_config()
    for key, value in overrides.items():
        *section, leaf = key.split(".")
        (config[section[0]] if section else config)[leaf] = value
    return config


def train(name: str, overrides: dict, workdir: str) -> dict:
    path = os.path.join(workdir, name)
    metrics_file = os.path.join(path, "metrics.json")
    if os.path.exists(metrics_file):
        print(f"{name}: done before, reading {metrics_file}", flush=True)
        with open(metrics_file) as f:
            return json.load(f)
    print(f"{name}: training ...", flush=True)
    start = time.time()
    metrics = trainer.train(config_of(overrides), path)
    metrics["wall_seconds"] = time.time() - start
    with open(metrics_file, "w") as f:  # the wall time, for the record
        json.dump(metrics, f)
    return metrics


def same_training(workdir: str, other: str) -> bool:
    """Whether two finished runs trained the same weights, bitwise (moving
    statistics aside)."""
    a, b = job_lib.load_trained(workdir)[0], job_lib.load_trained(other)[0]
    return all(
        (v.numpy() == w.numpy()).all()
        for v, w in zip(a.weights, b.weights) if "moving_" not in v.path
    )


def after_the_fact(workdir: str, how: str, batches: int) -> tuple[float, float]:
    """Validation accuracy of a finished run's weights after `how`
    ("precise": `precise_batchnorm` over the final stage's batch-statistics
    layers; "reestimate_all": every backbone BatchNorm layer), and the
    seconds that took."""
    model, _, spec = job_lib.load_trained(workdir)
    data = tasks.get(spec.task).load_data(spec)
    f = spec.freeze
    freezing.apply_stage(model, f.stages[-1], f.method, f.batchnorm)
    start = time.time()
    if how == "precise":
        freezing.precise_batchnorm(model, data.statistics_stream(), batches)
    else:
        freezing.reestimate_batchnorm(model, data.statistics_stream(), batches)
    seconds = time.time() - start
    results = model.evaluate(data.eval_stream("val"), verbose=0, return_dict=True)
    return float(results["accuracy"]), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per_class", type=int, default=150)
    parser.add_argument("--scratch_epochs", type=int, default=15)
    parser.add_argument("--workdir", default="/tmp/keras_ft_batchnorm")
    parser.add_argument("--out", default=_results.default_path("batchnorm"))
    args = parser.parse_args()

    start = time.time()
    runs = {
        name: train(name, overrides, args.workdir)
        for name, overrides in arms(args.per_class, args.scratch_epochs).items()
    }
    batches = quickstart.get_config().freeze.precise_bn_batches
    derived = {}
    for name, how in [
        ("scratch_precise_off", "precise"),
        ("recipe_trainable_precise_off", "precise"),
        ("recipe_trainable_precise_off", "reestimate_all"),
    ]:
        accuracy, seconds = after_the_fact(os.path.join(args.workdir, name), how, batches)
        derived[f"{name}+{how}"] = {"val_accuracy": accuracy, "seconds": seconds}
    same = {
        pair: same_training(*(os.path.join(args.workdir, f"{pair}_precise_{m}") for m in ("off", "final")))
        for pair in ("scratch", "recipe_trainable")
    }

    rows = [
        ("From random init, BatchNorm trainable", "scratch_precise_off", "precise BN off"),
        ("", "scratch_precise_final", "precise BN (default)"),
        ("Quickstart recipe, BatchNorm frozen (default)", "recipe_frozen", "-"),
        ("Quickstart recipe, BatchNorm trainable", "recipe_trainable_precise_off", "precise BN off"),
        ("", "recipe_trainable_precise_final", "precise BN (default)"),
    ]
    print("\n| run | statistics | val_accuracy | bn_train_eval_gap | wall |")
    print("|---|---|---|---|---|")
    for label, name, how in rows:
        m = runs[name]
        gap = m.get("bn_train_eval_gap")
        print(
            f"| {label} | {how} | {m['val_accuracy']:.3f} | "
            f"{'-' if gap is None else f'{gap:+.3f}'} | {m['wall_seconds']:.0f} s |"
        )
    reestimated = derived["recipe_trainable_precise_off+reestimate_all"]["val_accuracy"]
    print(f"| Quickstart recipe, BatchNorm trainable | all layers re-estimated after | "
          f"{reestimated:.3f} | - | - |")
    print("\nPrecise BN applied afterwards to the precise-off runs' weights (must equal "
          "the precise-BN runs, which trained the same weights: "
          + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()) + "):")
    for key, value in derived.items():
        print(f"  {key}: val_accuracy {value['val_accuracy']:.3f} ({value['seconds']:.1f} s "
              f"for {batches} batches)")
    results = {
        "per_class": args.per_class,
        "scratch_epochs": args.scratch_epochs,
        "runs": runs,
        "after_the_fact": derived,
        "same_trained_weights": same,
        "wall_seconds": time.time() - start,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }
    _results.write(results, args.out)


if __name__ == "__main__":
    main()

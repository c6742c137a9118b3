"""The cost of weight EMA (`optimizer.ema_decay`) per train step, side by side.

    python benchmarks/ema.py [--backbones=mobilenet_v2,resnet50] [--image_size=128] \
        [--batch_size=32] [--rounds=5] [--steps=3]

For each backbone, two worker processes train the same classifier (all
blocks, BatchNorm frozen, keras_ft's SGD) on one in-memory batch, one with
an EMA of every tunable weight (decay 0.999) folded after each update and
one without; they are timed in interleaved rounds (benchmarks/_rounds.py).
Reports the median images/s of each and the ratio (EMA / without).

Writes benchmarks/results/ema.json (or --out).
"""

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _results  # noqa: E402  (benchmarks/_results.py)
import _rounds  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECAY = 0.999


def worker(backbone: str, image_size: int, batch_size: int, ema: bool) -> None:
    import keras
    import numpy as np

    sys.path.insert(0, REPO)
    import keras_ft
    from keras_ft import freezing
    from keras_ft.stages import Stage

    keras.utils.set_random_seed(0)
    model = keras_ft.build_classifier(backbone, 10, image_size=image_size)
    model.compile(keras_ft.SGD(1e-4, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if ema:
        model.enable_ema(DECAY)
    freezing.apply_stage(model, Stage(epochs=1, blocks=-1))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch_size)
    start = time.perf_counter()
    model.train_on_batch(x, y)  # trace
    model.train_on_batch(x, y)
    print(f"ready {time.perf_counter() - start:.1f}", flush=True)
    _rounds.serve(lambda: model.train_on_batch(x, y))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="mobilenet_v2,resnet50")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=_results.default_path("ema"))
    args = parser.parse_args()
    if args.worker:
        backbone, variant = args.worker.split(":")
        return worker(backbone, args.image_size, args.batch_size, variant == "ema")

    start = time.perf_counter()
    results = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
               "decay": DECAY, "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores", "backbones": {}}
    for backbone in args.backbones.split(","):
        commands = {
            f"{backbone} {variant}": [__file__, f"--worker={backbone}:{variant}",
                                      f"--image_size={args.image_size}",
                                      f"--batch_size={args.batch_size}"]
            for variant in ("off", "ema")
        }
        seconds, _ = _rounds.interleaved(commands, args.rounds, args.steps, args.batch_size)
        off, on = (statistics.median(seconds[f"{backbone} {v}"]) for v in ("off", "ema"))
        results["backbones"][backbone] = {
            "images_per_sec_without": args.batch_size / off,
            "images_per_sec_ema": args.batch_size / on,
            "ema_over_without": off / on,  # throughput ratio: < 1 means EMA costs
            "seconds_per_step_added": on - off,
        }
        print(f"{backbone}: EMA {args.batch_size / on:.1f} img/s, without "
              f"{args.batch_size / off:.1f}: x{off / on:.3f}", flush=True)
    results["wall_seconds"] = time.perf_counter() - start
    _results.write(results, args.out)


if __name__ == "__main__":
    main()

"""Mixed precision and XLA: training images/s side by side, and accuracy.

    python benchmarks/precision.py [--backbone=resnet50] [--image_size=128] \
        [--batch_size=32] [--variants=float32,mixed_bfloat16] [--rounds=3] \
        [--steps=3] [--accuracy]

Each variant is `PRECISION` or `PRECISION+xla` (`train.precision`,
`train.jit_compile`): float32, mixed_float16 (GPU), mixed_bfloat16 (TPU,
Ampere+ GPU, CPUs with AVX512-BF16/AMX). One worker process per variant
trains the same classifier, all blocks, on in-memory data (the input pipeline
is not measured); the workers are driven round by round, interleaved, so
machine noise hits all alike. Reports the median images/s and the ratio to
the first variant.

`--accuracy` also runs the quickstart fine-tune (real ImageNet features,
real photos; configs/quickstart.py) once per precision through
`launch.train` and reports its val_accuracy, val_loss and images/s.

Writes benchmarks/results/precision_BACKBONE.json (or --out). `benchmarks/gpu.sh`
runs this on a GPU with ResNet50 at 224 px.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _results  # noqa: E402  (benchmarks/_results.py)
import _rounds  # noqa: E402  (benchmarks/_rounds.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_variant(variant: str) -> tuple[str, bool]:
    """"mixed_float16+xla" -> ("mixed_float16", True)."""
    precision, _, xla = variant.partition("+")
    if xla not in ("", "xla"):
        raise SystemExit(f"bad variant {variant!r}: PRECISION or PRECISION+xla")
    return precision, xla == "xla"


def worker(backbone, image_size, batch_size, variant):
    """Reads "train N" lines on stdin, prints the seconds per step."""
    import keras
    import numpy as np

    sys.path.insert(0, REPO)
    import keras_ft
    from keras_ft import freezing
    from keras_ft.stages import Stage

    precision, xla = parse_variant(variant)
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    model = keras_ft.build_classifier(backbone, 10, image_size=image_size)
    # A small, clipped rate keeps random weights on random labels finite.
    model.compile(keras_ft.SGD(1e-4, momentum=0.9, global_clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=xla)
    freezing.apply_stage(model, Stage(epochs=1, blocks=-1))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch_size)
    start = time.perf_counter()
    model.train_on_batch(x, y)  # trace (and compile, with XLA)
    model.train_on_batch(x, y)
    print(f"ready {time.perf_counter() - start:.1f}", flush=True)
    _rounds.serve(lambda: model.train_on_batch(x, y))


def speed(args) -> dict:
    variants = args.variants.split(",")
    for v in variants:
        parse_variant(v)
    commands = {
        v: [__file__, "--worker", v, f"--backbone={args.backbone}",
            f"--image_size={args.image_size}", f"--batch_size={args.batch_size}"]
        for v in variants
    }
    seconds, warmup = _rounds.interleaved(commands, args.rounds, args.steps, args.batch_size)
    base = statistics.median(seconds[variants[0]])
    return {
        v: {
            "images_per_sec": args.batch_size / statistics.median(s),
            "speedup": base / statistics.median(s),
            "first_two_steps_seconds": warmup[v],
        }
        for v, s in seconds.items()
    }


def accuracy(precisions: list[str]) -> dict:
    """The quickstart fine-tune once per precision, through launch.train."""
    out = {}
    for precision in precisions:
        with tempfile.TemporaryDirectory(prefix="keras_ft_bench_") as workdir:
            cmd = [sys.executable, "-m", "launch.train", "--config=configs/quickstart.py",
                   f"--workdir={workdir}", f"--config.train.precision={precision}",
                   "--config.export.enabled=False"]
            start = time.perf_counter()
            result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"quickstart with {precision} failed:\n{result.stderr[-3000:]}")
            with open(os.path.join(workdir, "metrics.json")) as f:
                metrics = json.load(f)
        out[precision] = {
            "val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"],
            "train_images_per_sec": metrics["train_images_per_sec"],
            "wall_seconds": time.perf_counter() - start,
        }
        print(f"quickstart {precision}: {out[precision]}", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--variants", default="float32,mixed_bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--accuracy", action="store_true",
                        help="also fine-tune the quickstart once per precision")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="default: benchmarks/results/precision_BACKBONE.json")
    args = parser.parse_args()
    if args.worker:
        return worker(args.backbone, args.image_size, args.batch_size, args.worker)

    import tensorflow as tf  # only to record the machine

    results = {
        "backbone": args.backbone, "image_size": args.image_size,
        "batch_size": args.batch_size, "rounds": args.rounds, "steps_per_round": args.steps,
        "devices": [d.device_type for d in tf.config.list_physical_devices()],
        "speed": speed(args),
    }
    print(f"\n{args.backbone} {args.image_size}px batch {args.batch_size}, all blocks "
          f"training (median of {args.rounds} interleaved rounds x {args.steps} steps)")
    print(f"{'variant':<22}{'img/s':>9}{'vs ' + args.variants.split(',')[0]:>16}"
          f"{'first 2 steps (s)':>19}")
    for v, r in results["speed"].items():
        print(f"{v:<22}{r['images_per_sec']:>9.1f}{r['speedup']:>15.2f}x"
              f"{r['first_two_steps_seconds']:>19.1f}")
    if args.accuracy:
        precisions = list(dict.fromkeys(parse_variant(v)[0] for v in args.variants.split(",")))
        results["quickstart"] = accuracy(precisions)
        print(f"\n{'quickstart':<22}{'val_accuracy':>14}{'val_loss':>10}{'img/s':>9}")
        for p, r in results["quickstart"].items():
            print(f"{p:<22}{r['val_accuracy']:>14.3f}{r['val_loss']:>10.4f}"
                  f"{r['train_images_per_sec']:>9.1f}")
    _results.write(results, args.out or _results.default_path(f"precision_{args.backbone}"))


if __name__ == "__main__":
    main()

"""Before committing: is keras_ft's train step still as fast as plain Keras?

    python -m benchmarks.guard [--rounds=3] [--steps=5] [--floor=0.9]

About a minute on 2 CPU cores: MobileNetV2 at 64 px, batch 32, full
fine-tuning and head only, keras_ft's step (BatchNorm frozen and
trainable) against the same network in plain Keras `compile()`/`fit()`
like for like, interleaved as `benchmarks.run` does (this is its `guard`
suite). Prints each ratio and exits 1 when one falls below its floor
(--floor; --frozen_floor for BatchNorm frozen, where keras_ft also trains
γ/β). Not a test: timings belong in benchmarks, never in the test suite.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--floor", type=float, default=0.9,
                        help="the lowest keras_ft / plain Keras ratio that passes")
    # keras_ft's frozen policy also trains γ/β, which plain Keras's frozen
    # BatchNorm does not: on MobileNetV2 at 64 px that costs 15-23% (benchmarks/README.md).
    parser.add_argument("--frozen_floor", type=float, default=0.7,
                        help="the same for full fine-tuning with BatchNorm frozen")
    args = parser.parse_args()
    from launch import cli

    cli.import_tensorflow()
    results = run.run_suite("guard", args.rounds, args.steps, None)
    (case,) = results["cases"].values()
    print()
    low = []
    for key in case["images_per_sec"]:
        variant, mode = key.split("|")
        if not variant.startswith("keras_ft/"):
            continue
        partner = run.keras_partner(variant, mode)
        ours, theirs = run.rate(case, variant, mode), run.rate(case, partner, mode)
        ratio = ours / theirs
        floor = args.frozen_floor if partner.startswith("keras/frozen_bn/") else args.floor
        print(f"{mode:>5} {variant:<28} {ours:7.1f} img/s  vs {partner:<26} {theirs:7.1f}  "
              f"{ratio:.2f}x  (floor {floor})")
        if ratio < floor:
            low.append(f"{mode} {variant} {ratio:.2f}x")
    if low:
        sys.exit(f"below its floor against plain Keras: {', '.join(low)}")
    print("keras_ft's step is at or above its floor against plain Keras in every case.")


if __name__ == "__main__":
    main()

"""Before committing: is keras_ft's train step still as fast as plain Keras?

    python -m benchmarks.guard [--rounds=3] [--steps=5] [--floor=0.9]

About a minute on 2 CPU cores: MobileNetV2 at 64 px, batch 32, full
fine-tuning and head only, keras_ft's step (BatchNorm frozen and
trainable) against the same network in plain Keras `compile()`/`fit()`
like for like, interleaved as `benchmarks.run` does (this is its `guard`
suite). Prints each ratio and exits 1 when one falls below --floor. Not a
test: timings belong in benchmarks, never in the test suite.
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
        print(f"{mode:>5} {variant:<28} {ours:7.1f} img/s  vs {partner:<26} {theirs:7.1f}  "
              f"{ratio:.2f}x")
        if ratio < args.floor:
            low.append(f"{mode} {variant} {ratio:.2f}x")
    if low:
        sys.exit(f"below {args.floor}x plain Keras: {', '.join(low)}")
    print(f"keras_ft's step is at least {args.floor}x plain Keras in every case.")


if __name__ == "__main__":
    main()

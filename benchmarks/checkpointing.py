"""What exactness costs: op determinism and checkpoint saves, side by side.

    python benchmarks/checkpointing.py [--backbones=mobilenet_v2,resnet50] \
        [--image_size=128] [--batch_size=32] [--rounds=3] [--steps=3]

For each backbone, two worker processes train the same classifier (all
blocks, in-memory data, so the input pipeline is not measured): one with
`tf.config.experimental.enable_op_determinism()` (`--config.deterministic=True`),
one without. Op determinism is process-wide, hence two processes; they are
driven round by round, interleaved, so machine noise hits both alike. Each
round also times one atomic checkpoint save (`keras_ft.checkpoint`: finite
check, write, fsync, rename) in the non-deterministic worker, to price
`checkpoint.every_steps`. Reports medians and ratios; writes
benchmarks/results/checkpointing.json.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _results  # noqa: E402  (benchmarks/_results.py)


def worker(backbone, image_size, batch_size, deterministic):
    """Reads commands on stdin ("train N", "save"), prints seconds per item."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_ft
    from keras_ft import checkpoint, freezing
    from keras_ft.stages import Stage

    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    model = keras_ft.build_classifier(backbone, 10, image_size=image_size)
    # A small, clipped rate: random weights on random labels must stay finite
    # (a save refuses non-finite weights).
    model.compile(keras_ft.SGD(1e-4, momentum=0.9, global_clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    freezing.apply_stage(model, Stage(epochs=1, blocks=-1))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch_size)
    model.train_on_batch(x, y)  # trace
    directory = tempfile.mkdtemp(prefix="keras_ft_bench_")
    manager = checkpoint.CheckpointManager(
        directory, keep=1, **checkpoint.model_objects(model, model.snapshot_reference())
    )
    step = 0
    print("ready", flush=True)
    for line in sys.stdin:
        command, *arg = line.split()
        start = time.perf_counter()
        if command == "train":
            for _ in range(int(arg[0])):
                model.train_on_batch(x, y)
            seconds = (time.perf_counter() - start) / int(arg[0])
        elif command == "save":
            step += 1
            manager.save(step, {})
            seconds = time.perf_counter() - start
        else:
            break
        print(seconds, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="mobilenet_v2,resnet50")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    parser.add_argument("--worker", nargs=2, metavar=("BACKBONE", "DETERMINISTIC"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", default=_results.default_path("checkpointing"))
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], args.image_size, args.batch_size, args.worker[1] == "1")

    results = {"image_size": args.image_size, "batch_size": args.batch_size,
               "rounds": args.rounds, "steps_per_round": args.steps, "backbones": {}}
    for backbone in args.backbones.split(","):
        procs = {}
        for det in (0, 1):
            procs[det] = subprocess.Popen(
                [sys.executable, __file__, "--worker", backbone, str(det),
                 f"--image_size={args.image_size}", f"--batch_size={args.batch_size}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
        for p in procs.values():
            assert p.stdout.readline().strip() == "ready"

        def ask(det, command):
            procs[det].stdin.write(command + "\n")
            procs[det].stdin.flush()
            return float(procs[det].stdout.readline())

        step = {0: [], 1: []}
        save = []
        for r in range(args.rounds):
            for det in (0, 1):
                step[det].append(ask(det, f"train {args.steps}"))
            save.append(ask(0, "save"))
            print(f"{backbone} round {r + 1}/{args.rounds}: step {step[0][-1]:.3f}s, "
                  f"deterministic step {step[1][-1]:.3f}s, save {save[-1]:.3f}s", flush=True)
        for p in procs.values():
            p.stdin.close()
            p.wait()
        plain, det, saved = (statistics.median(step[0]), statistics.median(step[1]),
                             statistics.median(save))
        results["backbones"][backbone] = {
            "step_seconds": plain, "deterministic_step_seconds": det,
            "deterministic_cost": det / plain, "save_seconds": saved,
            "save_in_steps": saved / plain,
        }

    print(f"\n{args.image_size}px batch {args.batch_size}, all blocks training "
          f"(median of {args.rounds} interleaved rounds x {args.steps} steps)")
    print(f"{'backbone':<14}{'img/s':>8}{'img/s determ.':>15}{'determ. cost':>14}"
          f"{'save (s)':>10}{'save / step':>13}")
    for name, r in results["backbones"].items():
        print(f"{name:<14}{args.batch_size / r['step_seconds']:>8.1f}"
              f"{args.batch_size / r['deterministic_step_seconds']:>15.1f}"
              f"{r['deterministic_cost']:>13.2f}x{r['save_seconds']:>10.3f}{r['save_in_steps']:>12.2f}x")
    _results.write(results, args.out)


if __name__ == "__main__":
    main()

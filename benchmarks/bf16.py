"""Where a bfloat16 train step spends its time: TensorFlow against PyTorch.

    python -m benchmarks.bf16 [--backbone=resnet50] [--image_size=128] [--steps=3]

On a CPU with AVX512-BF16 / AMX, PyTorch's bfloat16 autocast roughly
doubles its train step while TensorFlow's `mixed_bfloat16` gains far less.
This script measures why, on the workers `benchmarks.run` times
(`benchmarks/_workers.py`: keras_ft's full fine-tuning step with BatchNorm
frozen, and the PyTorch loop in channels_last with autocast), each in its
own process, float32 and bfloat16:

1. oneDNN's own log (`ONEDNN_VERBOSE=1`): every primitive both frameworks
   run through oneDNN, with its implementation (`brg_conv_fwd:..._amx`
   means AMX bfloat16 tiles), data types and execution time, summed per
   step by primitive kind and direction (convolution forward, backward
   data, backward weights; reorders; batch normalisation; ...).
2. TensorFlow's profiler: the host-side time of every TensorFlow op type
   in the step (oneDNN-backed `_MklNative*` ops, Eigen ops such as casts
   and the optimizer's updates), from the trace's XPlane.

Writes benchmarks/results/bf16.json and .md.
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import _results, _workers  # noqa: E402

VARIANTS = ("keras_ft/frozen/float32", "keras_ft/frozen/bfloat16",
            "torch/channels_last/float32", "torch/channels_last/bfloat16")
START, END = "=== timed steps start", "=== timed steps end"


# ------------------------------------------------------------------ workers


def worker(variant, backbone, image_size, steps, profile_dir):
    """Warms up, then runs `steps` timed steps between two marker lines."""
    captured = {}

    def serve(step_fns, switch):
        switch("full")
        for _ in range(3):
            step_fns["full"]()
        sys.stdout.flush()
        print(START, flush=True)
        start = time.perf_counter()
        if profile_dir:
            import tensorflow as tf

            tf.profiler.experimental.start(profile_dir)
        for _ in range(steps):
            step_fns["full"]()
        if profile_dir:
            tf.profiler.experimental.stop()
        captured["seconds"] = (time.perf_counter() - start) / steps
        print(END, flush=True)
        print(f"seconds_per_step {captured['seconds']}", flush=True)

    _workers.serve = serve
    _workers.ready = lambda *a, **k: None
    _workers.main(variant, backbone, image_size, 32, ["full"])


def run_worker(variant, args, verbose: bool, profile_dir=None) -> tuple[list[str], float]:
    env = dict(os.environ, ONEDNN_VERBOSE="1" if verbose else "0")
    cmd = [sys.executable, "-m", "benchmarks.bf16", f"--worker={variant}",
           f"--backbone={args.backbone}", f"--image_size={args.image_size}", f"--steps={args.steps}"]
    if profile_dir:
        cmd.append(f"--profile_dir={profile_dir}")
    result = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if result.returncode:
        raise SystemExit(f"{variant} failed (its error is above)")
    lines = result.stdout.splitlines()
    seconds = float(next(line for line in lines if line.startswith("seconds_per_step")).split()[1])
    inside = lines[lines.index(START) + 1:lines.index(END)]
    return inside, seconds


# ------------------------------------------------------------------ oneDNN


def onednn_breakdown(lines: list[str], steps: int) -> dict:
    """Milliseconds per step by (primitive, direction, implementation, type).

    A verbose exec line: onednn_verbose,v1,primitive,exec,cpu,KIND,IMPL,
    PROP_KIND,MEMORY_DESCRIPTORS,...,TIME_MS."""
    totals = collections.defaultdict(lambda: [0.0, 0])
    for line in lines:
        if not line.startswith("onednn_verbose") or ",exec," not in line:
            continue
        f = line.split(",")
        kind, impl, prop, memory = f[5], f[6], f[7], f[8]
        src = re.search(r"src:(\w+):", memory)
        dtype = src.group(1) if src else "?"
        if kind == "reorder":
            dst = re.search(r"dst:(\w+):", memory)
            dtype = f"{dtype}->{dst.group(1) if dst else '?'}"
        key = f"{kind} | {prop} | {impl} | {dtype}"
        totals[key][0] += float(f[-1])
        totals[key][1] += 1
    return {k: {"ms_per_step": t / steps, "calls_per_step": n / steps}
            for k, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])}


def summarise(breakdown: dict, seconds: float) -> dict:
    by_kind = collections.defaultdict(float)
    amx_conv = total_conv = 0.0
    for key, v in breakdown.items():
        kind, prop, impl, _ = key.split(" | ")
        by_kind[f"{kind} {prop}"] += v["ms_per_step"]
        if kind == "convolution":
            total_conv += v["ms_per_step"]
            if "amx" in impl:
                amx_conv += v["ms_per_step"]
    onednn = sum(by_kind.values())
    return {
        "step_ms": seconds * 1000, "onednn_ms": onednn,
        "outside_onednn_ms": seconds * 1000 - onednn,
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "convolution_ms_on_amx": amx_conv, "convolution_ms": total_conv,
    }


# ------------------------------------------------------------------ TF profiler


def tf_op_breakdown(profile_dir: str, steps: int) -> dict:
    """Host milliseconds per step of each TensorFlow op type, from the trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = [os.path.join(d, f) for d, _, files in os.walk(profile_dir)
             for f in files if f.endswith(".xplane.pb")]
    if not paths:
        raise SystemExit(f"the profiler wrote no trace under {profile_dir}")
    space = xplane_pb2.XSpace()
    with open(paths[0], "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.defaultdict(float)
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:  # executor threads: op events are "name:Type"
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" not in name or name.startswith("__inference"):
                    continue
                op_type = name.rsplit(":", 1)[1]
                if not op_type or not op_type[0].isalpha() or " " in op_type:
                    continue
                totals[op_type] += event.duration_ps / 1e9
    return {k: v / steps for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


# ------------------------------------------------------------------ report


def table(results: dict) -> str:
    out = [f"{results['backbone']} {results['image_size']} px, batch 32, full fine-tuning "
           f"(keras_ft: BatchNorm frozen; PyTorch: channels_last, `model.train()`), "
           f"{results['steps']} steps per measurement; {os.cpu_count()} CPU cores.", "",
           "| variant | step (ms) | in oneDNN | outside oneDNN | convolutions | of which on AMX | "
           "reorders | batch norm |", "|---|---|---|---|---|---|---|---|"]
    for v, r in results["variants"].items():
        s = r["summary"]
        reorders = sum(ms for k, ms in s["by_kind_ms"].items() if k.startswith("reorder"))
        bn = sum(ms for k, ms in s["by_kind_ms"].items() if k.startswith("batch_normalization"))
        out.append(f"| {v} | {s['step_ms']:.0f} | {s['onednn_ms']:.0f} | {s['outside_onednn_ms']:.0f} | "
                   f"{s['convolution_ms']:.0f} | {s['convolution_ms_on_amx']:.0f} | {reorders:.0f} | "
                   f"{bn:.0f} |")
    for v, r in results["variants"].items():
        out += ["", f"#### {v}: oneDNN primitives (ms per step)", "",
                "| primitive | direction | implementation | type | ms | calls |", "|---|---|---|---|---|---|"]
        for key, x in list(r["onednn"].items())[:12]:
            out.append(f"| {' | '.join(key.split(' | '))} | {x['ms_per_step']:.1f} | "
                       f"{x['calls_per_step']:.0f} |")
        if r.get("tf_ops_ms"):
            out += ["", f"#### {v}: TensorFlow op types, host time (ms per step)", "",
                    "| op type | ms |", "|---|---|"]
            out += [f"| {k} | {ms:.1f} |" for k, ms in list(r["tf_ops_ms"].items())[:15]]
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=_results.default_path("bf16"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.backbone, args.image_size, args.steps, args.profile_dir)
    start = time.time()
    results = {"backbone": args.backbone, "image_size": args.image_size, "steps": args.steps,
               "variants": {}}
    for v in args.variants.split(","):
        _workers.parse(v)
        print(f"{v}: oneDNN verbose run ...", flush=True)
        lines, seconds_verbose = run_worker(v, args, verbose=True)
        breakdown = onednn_breakdown(lines, args.steps)
        print(f"{v}: timed run ...", flush=True)
        _, seconds = run_worker(v, args, verbose=False)
        entry = {"seconds_per_step": seconds, "seconds_per_step_verbose": seconds_verbose,
                 "onednn": breakdown, "summary": summarise(breakdown, seconds)}
        if v.startswith("keras_ft/"):
            print(f"{v}: profiled run ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="keras_ft_profile_") as d:
                run_worker(v, args, verbose=False, profile_dir=d)
                try:
                    entry["tf_ops_ms"] = tf_op_breakdown(d, args.steps)
                except Exception as e:  # the trace format is TensorFlow's, not ours
                    entry["tf_ops_error"] = f"{type(e).__name__}: {e}"
                    print(f"{v}: could not read the profile: {entry['tf_ops_error']}", flush=True)
        results["variants"][v] = entry
    results["wall_seconds"] = time.time() - start
    report = table(results)
    print("\n" + report)
    _results.write(results, args.out)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"<!-- python -m benchmarks.bf16 --backbone={args.backbone} "
                f"--image_size={args.image_size} --steps={args.steps} -->\n\n" + report)


if __name__ == "__main__":
    main()

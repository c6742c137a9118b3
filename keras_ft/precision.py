"""`train.precision="auto"`: bfloat16 where it was measured faster, else float32.

bfloat16 pays on a CPU with AMX-BF16 tiles only for networks whose time
goes to large dense convolutions: there oneDNN runs them on AMX. For
depthwise-separable networks the casts and layout reorders around each
small convolution cost more than the tiles save. The decision is a table
of measured speed-ups, not a guess: `BF16_SPEEDUP_AMX_CPU` holds the
ratio of keras_ft's full fine-tuning step in `mixed_bfloat16` to float32
(images/s, batch 32, BatchNorm frozen), from `python -m benchmarks.run
--suite=cpu` (benchmarks/README.md). Backbones not in the table, GPUs and
CPUs without AMX-BF16 get float32: nothing was measured there, and an
unmeasured change of numerics is not a default. On a GPU set the
precision yourself (`mixed_float16`, or `mixed_bfloat16` on Ampere and
newer).
"""

from __future__ import annotations

# Backbone -> mixed_bfloat16 / float32 train-step images/s on a 2-core
# Xeon with AVX512-BF16 and AMX (TensorFlow 2.21, oneDNN 3.7), 128 px,
# BatchNorm fused (keras_ft.fused_bn): 46.6 / 30.1 and 90.2 / 110.6
# (benchmarks/results/suite_cpu_fused_bn.md).
BF16_SPEEDUP_AMX_CPU = {
    "resnet50": 1.55,
    "mobilenet_v2": 0.82,
}
# Backbones that share a measured one's building blocks (and so its ratio).
SAME_BLOCKS = {"resnet101": "resnet50", "resnet152": "resnet50"}
WORTH_IT = 1.1  # the speed-up that justifies bfloat16's coarser numerics


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve(precision: str, backbone: str, accelerators: int | None = None,
            flags: set[str] | None = None) -> tuple[str, str]:
    """The Keras dtype policy for `precision` and why.

    Args:
        precision: `train.precision`: "auto" or a Keras policy name (kept).
        backbone: `model.backbone`.
        accelerators: GPUs and TPUs visible (None: ask TensorFlow).
        flags: the CPU's flags (None: read them).

    Returns:
        `(policy, reason)`, e.g. `("mixed_bfloat16", "auto: resnet50 ...")`.
    """
    if precision != "auto":
        return precision, "as configured"
    if accelerators is None:
        import tensorflow as tf

        accelerators = len(tf.config.list_physical_devices("GPU")) + len(
            tf.config.list_physical_devices("TPU"))
    if accelerators:
        return "float32", ("auto: float32 on GPUs and TPUs (not measured by keras_ft; "
                           "set train.precision=mixed_float16 or mixed_bfloat16)")
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" not in flags:
        return "float32", "auto: float32 (this CPU has no AMX-BF16)"
    measured = SAME_BLOCKS.get(backbone, backbone)
    speedup = BF16_SPEEDUP_AMX_CPU.get(measured)
    if speedup is None:
        return "float32", f"auto: float32 ({backbone}'s bfloat16 speed was not measured)"
    if speedup < WORTH_IT:
        return "float32", (f"auto: float32 ({measured} measured {speedup:.2f}x in bfloat16 "
                           "on AMX CPUs)")
    return "mixed_bfloat16", (f"auto: mixed_bfloat16 ({measured} measured {speedup:.2f}x "
                              "faster than float32 on AMX CPUs)")

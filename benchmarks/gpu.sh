#!/usr/bin/env bash
# ResNet50 fine-tuning speed on a GPU: float32 against mixed_float16, each
# with and without XLA, at 224 px, all blocks training. Prints a table of
# images/s and ratios; writes benchmarks/results/gpu.json.
#
#   bash benchmarks/gpu.sh [--batch_size=128] [--rounds=5] [--accuracy]
#
# Extra flags go to benchmarks/precision.py (later flags win). Add
# mixed_bfloat16 with --variants=... on Ampere or newer GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
if not gpus:
    sys.exit("benchmarks/gpu.sh: TensorFlow sees no GPU (is the CUDA build installed? "
             "pip install 'tensorflow[and-cuda]').")
print(f"GPUs: {[tf.config.experimental.get_device_details(g).get('device_name', g.name) for g in gpus]}")
PY
python benchmarks/precision.py --backbone=resnet50 --image_size=224 --batch_size=64 \
    --variants=float32,mixed_float16,float32+xla,mixed_float16+xla \
    --rounds=3 --steps=20 --out=benchmarks/results/gpu.json "$@"

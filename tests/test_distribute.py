"""The custom train step under MirroredStrategy over two logical CPU devices."""

import json

import numpy as np
import pytest
import tensorflow as tf

from test_launch import images, run_train  # noqa: F401  (fixture)


@pytest.mark.slow
def test_mirrored_two_replicas_matches_one_device(tmp_path, images):  # noqa: F811
    common = [f"--config.data.source=folder:{images}", "--config.model.dropout=0.0"]
    one = run_train(tmp_path / "one", *common)
    two = run_train(
        tmp_path / "two", *common,
        "--config.distribute.strategy=mirrored", "--config.distribute.cpu_devices=2",
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in two.stderr
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["replicas"] == 2

    # Same global batch and seed: the same SGD steps, up to float summation order.
    batch = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    outputs = [
        tf.saved_model.load(str(tmp_path / name / "export"))
        .signatures["serving_uint8"](images=tf.constant(batch))["probabilities"].numpy()
        for name in ("one", "two")
    ]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)


def test_global_batch_must_divide_by_replicas(tmp_path, images):  # noqa: F811
    result = run_train(
        tmp_path / "run", f"--config.data.source=folder:{images}",
        "--config.distribute.strategy=mirrored", "--config.distribute.cpu_devices=2",
        "--config.train.global_batch_size=5",
    )
    assert result.returncode == 2
    assert "global_batch_size=5 must be a positive multiple of the 2 replica(s)" in result.stderr

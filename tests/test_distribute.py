"""The custom train step and a stage switch under MirroredStrategy."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_train
from runs import ONE_DEVICE, PARITY, run_trains, start_train


def _variables(path):
    """Every variable in a checkpoint: weights, statistics, velocities, θ0."""
    reader = tf.train.load_checkpoint(path)
    return {
        k: reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if k.endswith("VARIABLE_VALUE")
    }


TWO_REPLICAS = ("--config.distribute.strategy=mirrored", "--config.distribute.cpu_devices=2")


def checkpoint_variables(workdir, step):
    """Every variable of a run's checkpoint taken after global step `step`."""
    return _variables(os.path.join(str(workdir), "checkpoints", f"ckpt-{step:09d}", "ckpt"))


def _one_and_two_replicas(tmp_path, common):
    """The run of `common` flags on one device (tmp_path/one) and on two
    replicas (tmp_path/two), side by side; both must succeed."""
    one, two = run_trains((tmp_path / "one", *common), (tmp_path / "two", *common, *TWO_REPLICAS))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return one, two


@pytest.mark.slow
def test_mirrored_two_replicas_matches_one_device(tmp_path, tmp_path_factory, images):
    # configs/tiny.py switches stage at epoch 2 (head only -> top 2 blocks);
    # re-estimated BatchNorm statistics give the random backbone real gradients.
    # The one-device run is the session's (runs.ONE_DEVICE), trained alongside.
    ONE_DEVICE.start(tmp_path_factory, images)
    with start_train(tmp_path / "two", f"--config.data.source=folder:{images}", *PARITY,
                     "--config.export.enabled=False", *TWO_REPLICAS) as launch:
        one = ONE_DEVICE.workdir(tmp_path_factory, images)
        two = launch.result()
    assert two.returncode == 0, two.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in two.stderr
    assert "Stage 2/2 at epoch 2" in two.stderr
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["replicas"] == 2

    # Same global batch and seed: the same SGD steps, up to float summation
    # order. Tolerance: 1e-5 absolute plus 1e-5 relative (a momentum slot of
    # ~35 differs by float32 summation order alone; one of 0.35 by 1.05e-5
    # after the traced statistics pass).
    final = {"one": checkpoint_variables(one, 6), "two": checkpoint_variables(tmp_path / "two", 6)}
    assert final["one"].keys() == final["two"].keys() and len(final["one"]) > 200
    for key, value in final["one"].items():
        np.testing.assert_allclose(final["two"][key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    # The comparison is not vacuous: stage 2 moved the top blocks.
    first = checkpoint_variables(one, 3)
    moved = [k for k in first if not np.array_equal(first[k], final["one"][k])]
    assert len(moved) > 6, moved


def test_global_batch_must_divide_by_replicas(tmp_path, images):
    result = run_train(
        tmp_path / "run", f"--config.data.source=folder:{images}",
        *TWO_REPLICAS, "--config.train.global_batch_size=5",
    )
    assert result.returncode == 2
    assert "global_batch_size=5 must be a positive multiple of the 2 replica(s)" in result.stderr


@pytest.mark.slow
def test_cached_features_on_two_replicas_match_one_device(tmp_path, images):
    # The first fit() of a cached run sees feature batches; under a strategy
    # Keras builds the compiled metrics from the first batch, which must be
    # done as for images (the model's input), not the features.
    common = [
        f"--config.data.source=folder:{images}", "--config.model.dropout=0.0",
        "--config.freeze.batchnorm=reestimate", "--config.data.cache_features=True",
        "--config.train.epochs=1", "--config.export.enabled=False",
    ]
    _one_and_two_replicas(tmp_path, common)
    final = {name: checkpoint_variables(tmp_path / name, 3) for name in ("one", "two")}
    for key, value in final["one"].items():
        np.testing.assert_allclose(final["two"][key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    assert len(final["one"]) > 200
    # Not vacuous: the head trained (its momentum buffers are not zero).
    assert any(np.abs(v).max() > 0 for k, v in final["one"].items()
               if k.startswith("optimizer/_variables/"))

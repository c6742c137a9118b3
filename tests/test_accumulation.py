"""Gradient accumulation: N micro-batches, one SGD update, as one big batch."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ft
from keras_ft import freezing
from runs import start_train, tiny_config, train_error

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _trained(batch_size, accumulation, data):
    keras.utils.set_random_seed(0)
    # Dropout off and BatchNorm frozen (inference mode): no batch-dependent
    # op, so the average of micro-batch gradients is the big batch's gradient.
    model = keras_ft.build_classifier("mobilenet_v2", 3, image_size=32, dropout=0.0)
    x, y = data
    # Statistics of real activations, so the random backbone's features (and
    # the head's gradients) are not vanishingly small.
    freezing.reestimate_batchnorm(model, tf.data.Dataset.from_tensors((x, y)))
    model.backbone.trainable = False
    model.compile(
        keras_ft.SGD(0.05, momentum=0.9, weight_decay=1e-3, global_clipnorm=10.0,
                     gradient_accumulation_steps=accumulation),
        loss=LOSS,
    )
    model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
    return model


def test_accumulated_micro_batches_equal_the_big_batch():
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 255, (16, 32, 32, 3)).astype(np.float32), np.arange(16) % 3
    big = _trained(8, None, data)
    accumulated = _trained(4, 2, data)
    assert int(big.optimizer.iterations.numpy()) == 4  # 2 epochs x 2 updates
    assert int(accumulated.optimizer.iterations.numpy()) == 4  # updates, not micro-steps
    for a, b in zip(big.trainable_variables, accumulated.trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-6, err_msg=a.path)
    # Not vacuous: four micro-batch updates (no accumulation) end elsewhere.
    unaccumulated = _trained(4, None, data)
    assert np.abs(unaccumulated.head.kernel.numpy() - big.head.kernel.numpy()).max() > 1e-3


@pytest.mark.slow
def test_train_with_accumulation_counts_updates_and_checks_the_epoch(tmp_path, images):
    common = [f"--config.data.source=folder:{images}", "--config.export.enabled=False",
              "--config.optimizer.accumulation_steps=2"]
    with start_train(tmp_path / "run", *common, "--config.train.steps_per_epoch=4") as launch:
        # Meanwhile, in-process: configs/tiny.py's 3 steps per epoch are refused (exit 2).
        config = tiny_config({"data.source": f"folder:{images}", "export.enabled": False,
                              "optimizer.accumulation_steps": 2})
        bad = train_error(config, tmp_path / "bad")
        assert "accumulation_steps=2 must divide the 3 steps per epoch" in bad
        result = launch.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "one update per 2 batches of 4 (effective batch 8)" in result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4  # 2 epochs x 4 batches, one update per 2

"""Feature caching: the cached stream is the image stream through the backbone."""

import keras
import numpy as np
import pytest

import keras_ft
from conftest import write_image_folder
from configs import tiny
from keras_ft import augment, data, features, freezing, sources, spec


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    images = sources.from_folder(
        write_image_folder(tmp_path_factory.mktemp("f"), {"a": 6, "b": 5}, size=24)
    )
    return data.split(images, 0.3, seed=0)


def test_cached_stream_is_the_image_stream_through_the_backbone(split):
    train, val = split
    keras.utils.set_random_seed(0)
    model = keras_ft.build_classifier("mobilenet_v2", 2, image_size=32, class_names=["a", "b"])
    # Random weights at initial BatchNorm statistics give vanishing features;
    # statistics of these images make them depend on the pixels.
    freezing.reestimate_batchnorm(model, data.make_dataset(train, 32, 4, training=False))
    cache = features.compute(model, train, val, 32, 4)
    scale = np.abs(cache.train).max()
    assert scale > 1e-2
    assert np.abs(cache.train[0] - cache.train[1]).max() > 1e-3 * scale  # flips differ
    assert cache.train.shape == (2, len(train), 1280) and cache.val.shape == (len(val), 1280)
    extractor = model.feature_extractor()
    # 6 batches: two passes and a half, with flips, skipping the first batch.
    images = data.make_dataset(train, 32, 4, training=True, seed=7, skip_batches=1).take(6)
    cached = features.training_stream(cache, 4, seed=7, skip_batches=1).take(6)
    flipped = 0
    for (x, y), (f, fy) in zip(images, cached):
        np.testing.assert_allclose(
            f.numpy(), extractor.predict_on_batch(x), atol=1e-5 * scale
        )
        np.testing.assert_array_equal(y.numpy(), fy.numpy())
        flipped += sum(
            not np.isclose(row, cache.train[0], atol=1e-6 * scale).all(axis=1).any()
            for row in f.numpy()
        )
    assert 0 < flipped < 24  # both views were used: the flip coin is replayed
    val_features = np.concatenate([f for f, _ in features.validation_stream(cache, 4)])
    np.testing.assert_array_equal(val_features, cache.val)


def test_unbounded_augmentation_cannot_be_cached():
    with pytest.raises(ValueError, match="data.augment.randaugment_ops, data.augment.mixup"):
        features.check_cacheable(augment.Augment(randaugment_ops=2, mixup=0.2))
    features.check_cacheable(augment.Augment(flip=False))


def _cached_epochs(first_stage, *later, cache=True, method="full"):
    config = tiny.get_config()
    config.data.cache_features = cache
    config.train.epochs = 5
    config.freeze.method = method
    config.freeze.stages = (first_stage,) + later
    return spec.resolve(config).cached_epochs


def test_cached_epochs_are_the_head_only_first_stage():
    later = dict(epochs=1, blocks=2)
    assert _cached_epochs(dict(epochs=2, blocks=0), later) == 2
    assert _cached_epochs(dict(epochs=2, blocks=0)) == 5  # one stage: the whole run
    assert _cached_epochs(dict(epochs=2, blocks=0), later, cache=False) == 0
    with pytest.raises(ValueError, match="first stage that trains the head only"):
        _cached_epochs(dict(epochs=2, blocks=1), later)
    with pytest.raises(ValueError, match="measured in steps"):
        _cached_epochs(dict(steps=10, blocks=0), later)
    with pytest.raises(ValueError, match="method lora"):
        _cached_epochs(dict(epochs=2, blocks=0), later, method="lora")

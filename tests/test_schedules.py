"""Learning-rate schedules: closed-form values, serialisation, composition."""

import json
import math

import keras
import ml_collections
import numpy as np
import pytest

import keras_ft
from configs import base, tiny
from keras_ft import schedules, spec


def values(schedule, steps):
    return [float(schedule(step)) for step in steps]


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # η·step/warmup, then η.
        (schedules.Constant(0.1, warmup_steps=4), {0: 0.0, 1: 0.025, 4: 0.1, 50: 0.1}),
        (schedules.Constant(0.1), {0: 0.1, 7: 0.1}),
        # Warmup over 10 steps, then half a cosine over the remaining 90.
        (
            schedules.WarmupCosine(1.0, total_steps=100, warmup_steps=10),
            {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0, 130: 0.0,
             32.5: 0.5 * (1 + math.cos(math.pi * 0.25))},
        ),
        (
            schedules.WarmupCosine(2.0, total_steps=10, final_fraction=0.1),
            {0: 2.0, 5: 2.0 * (0.1 + 0.9 * 0.5), 10: 0.2, 11: 0.2},
        ),
        # BERT: warmup over 10 steps, then a straight line to 0 at 100.
        (
            schedules.WarmupLinear(1.0, total_steps=100, warmup_steps=10),
            {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 91: 0.1, 100: 0.0, 130: 0.0},
        ),
        # BiT: /10 at 30, 60, 90% after 10 warmup steps.
        (
            schedules.StepDecay(0.003, total_steps=100, warmup_steps=10),
            {5: 0.0015, 10: 0.003, 29: 0.003, 30: 3e-4, 59: 3e-4, 60: 3e-5, 90: 3e-6, 99: 3e-6},
        ),
        # STLR, T=100, cut=10, ratio 32: η/32 at 0, η at 10, back to η/32 at 100.
        (
            schedules.SlantedTriangular(0.32, total_steps=100),
            {0: 0.01, 5: 0.01 * (1 + 0.5 * 31), 10: 0.32, 55: 0.01 * (1 + 0.5 * 31),
             100: 0.01, 120: 0.01},
        ),
    ],
    ids=["constant_warmup", "constant", "warmup_cosine", "cosine_floor", "warmup_linear", "step",
         "stlr"],
)
def test_schedule_matches_closed_form(schedule, expected):
    np.testing.assert_allclose(
        values(schedule, expected), list(expected.values()), rtol=1e-5, atol=1e-9
    )


def test_warmup_fraction_is_a_share_of_the_run():
    schedule = schedules.create("warmup_linear", 2e-5, 200, warmup_fraction=0.1)
    assert isinstance(schedule, schedules.WarmupLinear) and schedule.warmup_steps == 20
    assert schedules.create("warmup_cosine", 1.0, 3, warmup_fraction=0.1).warmup_steps == 1
    with pytest.raises(ValueError, match="warmup_steps or schedule.warmup_fraction, not both"):
        schedules.create("warmup_linear", 1.0, 100, warmup_steps=5, warmup_fraction=0.1)


def test_cosine_without_warmup_equals_keras_cosine_decay():
    ours = schedules.WarmupCosine(0.01, total_steps=37)
    keras_cosine = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=37)
    steps = [0, 1, 10, 18, 36, 37, 50]
    np.testing.assert_allclose(values(ours, steps), values(keras_cosine, steps), rtol=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.Constant(0.05, warmup_steps=3),
        schedules.WarmupCosine(0.05, total_steps=40, warmup_steps=5, final_fraction=0.01),
        schedules.StepDecay(
            0.05, total_steps=40, warmup_steps=2, boundaries=(0.4, 0.6, 0.8), factor=0.5
        ),
        schedules.SlantedTriangular(0.05, total_steps=40, cut_frac=0.2, ratio=10),
    ],
    ids=lambda s: type(s).__name__,
)
def test_json_round_trip(schedule):
    text = json.dumps(keras.optimizers.schedules.serialize(schedule))
    assert "keras_ft>" in text  # registered under the package name
    restored = keras.optimizers.schedules.deserialize(json.loads(text))
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    steps = range(0, 45, 3)
    assert values(restored, steps) == values(schedule, steps)
    # Inside an optimizer's config too (what a .keras file holds).
    optimizer = keras_ft.SGD.from_config(json.loads(json.dumps(keras_ft.SGD(schedule).get_config())))
    assert optimizer.learning_rate_schedule.get_config() == schedule.get_config()


def test_schedule_composes_with_stage_scale_and_block_multipliers():
    """η = schedule(step) × lr_scale × the variable's multiplier (no momentum)."""
    a = keras.Variable(np.ones((2, 2), np.float32), name="a")
    b = keras.Variable(np.ones((2, 2), np.float32), name="b")
    schedule = schedules.StepDecay(0.4, total_steps=10, boundaries=(0.5,), factor=0.1)
    optimizer = keras_ft.SGD(schedule, momentum=0.0)
    optimizer.build([a, b])
    optimizer.lr_scale.assign(0.5)
    optimizer.set_lr_multipliers({b.path: 0.25})
    optimizer.iterations.assign(6)  # past the boundary: 0.4 * 0.1
    grad = np.full((2, 2), 2.0, np.float32)
    optimizer.apply([grad, grad], [a, b])
    np.testing.assert_allclose(a.numpy(), 1 - 0.04 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), 1 - 0.04 * 0.5 * 0.25 * 2.0, rtol=1e-6)


def run_spec(learning_rate=0.02, **schedule):
    config = tiny.get_config()
    config.optimizer.learning_rate = learning_rate
    config.schedule.update(schedule)
    return spec.resolve(config)


@pytest.mark.parametrize(
    "name, warmup, kind",
    [
        ("cosine", 0, schedules.WarmupCosine),
        ("warmup_cosine", 5, schedules.WarmupCosine),
        ("step", 5, schedules.StepDecay),
        ("stlr", 0, schedules.SlantedTriangular),
        ("constant", 5, schedules.Constant),
        ("constant", 0, float),  # a float: Keras keeps it as an optimizer variable
    ],
)
def test_spec_builds_each_schedule(name, warmup, kind):
    built = run_spec(name=name, warmup_steps=warmup).learning_rate(100)
    assert type(built) is kind
    peak = built if kind is float else max(values(built, range(101)))
    assert peak == pytest.approx(0.02, rel=1e-6)


def test_spec_schedule_for_auto_and_found_rate():
    auto = run_spec(learning_rate="auto", name="constant")
    placeholder = auto.learning_rate(100)
    assert isinstance(placeholder, schedules.Constant) and placeholder.learning_rate == 1.0
    found = auto.learning_rate(100, peak=0.003)
    assert isinstance(found, schedules.Constant) and found.learning_rate == 0.003


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(learning_rate="atuo"),
            "optimizer.learning_rate must be a positive number or 'auto', got 'atuo'",
        ),
        (dict(learning_rate=-0.1), "got -0.1"),
        (dict(learning_rate=True), "got True"),
        (dict(learning_rate="0.1"), "got '0.1'"),
        (dict(name="cosin"), "Unknown schedule.name 'cosin'. Choose one of: constant, cosine"),
        (dict(name="cosine", warmup_steps=5), "use 'warmup_cosine'"),
        (dict(name="warmup_cosine"), "needs schedule.warmup_steps > 0"),
        (dict(name="step", decay_boundaries=(0.6, 0.3)), "increasing fractions"),
        (dict(name="stlr", stlr_cut_frac=1.5), "stlr_cut_frac must be a number in (0, 1)"),
        (dict(name="constant", warmup_steps=-1), "schedule.warmup_steps must be an integer >= 0"),
    ],
)
def test_spec_rejects_bad_rate_or_schedule(overrides, message):
    with pytest.raises(ValueError) as error:
        run_spec(**overrides)
    assert message in str(error.value)


def test_warmup_longer_than_the_run_fails_when_the_data_is_known():
    run = run_spec(name="constant", warmup_steps=50)  # tiny: 2 epochs
    spec.check_steps(run, steps_per_epoch=25)  # 50 updates: fits
    with pytest.raises(ValueError, match=r"schedule.warmup_steps must be in \[0, 20\]"):
        spec.check_steps(run, steps_per_epoch=10)


def test_learning_rate_flag_is_typed_object():
    """The field takes a number or "auto" (its type is `object`)."""
    config = base.get_config()
    config.optimizer.learning_rate = "auto"
    config.optimizer.learning_rate = 0.003
    assert isinstance(config.optimizer.learning_rate, float)
    assert isinstance(config, ml_collections.ConfigDict)

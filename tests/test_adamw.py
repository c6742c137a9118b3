"""`keras_ft.optim.AdamW` applies the update of its docstring, written here in numpy.

Tiny variables and random gradients: each test takes well under a second.
Adam's step is near ±η·1 per entry, so a wrong bias correction (3.2×η on a
first step), a decayed bias (η·λ·θ) or a lost moment is off by 1e-4 or
more, against float32 rounding of ~1e-7 over a few steps.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ft import optim, schedules

BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-6
ATOL = 1e-6  # float32 against float64 over <= 5 steps of ~1e-2


class NumpyAdamW:
    """The docstring's update in float64, one state per variable, its own t."""

    def __init__(self, theta, weight_decay):
        self.theta = np.array(theta, np.float64)
        self.m = np.zeros_like(self.theta)
        self.v = np.zeros_like(self.theta)
        self.t = 0
        self.decay = weight_decay if self.theta.ndim > 1 else 0.0  # not 1-D

    def step(self, g, lr):
        self.t += 1
        self.m = BETA_1 * self.m + (1 - BETA_1) * g
        self.v = BETA_2 * self.v + (1 - BETA_2) * g**2
        m_hat = self.m / (1 - BETA_1**self.t)
        v_hat = self.v / (1 - BETA_2**self.t)
        self.theta = self.theta - lr * self.decay * self.theta - lr * m_hat / (np.sqrt(v_hat) + EPSILON)
        return self.theta


def _variables(seed=0):
    """A 2-D kernel and a 1-D bias, both of order 1 so a decay would show."""
    rng = np.random.default_rng(seed)
    kernel = keras.Variable(rng.normal(size=(3, 2)).astype(np.float32), name="kernel")
    bias = keras.Variable(rng.uniform(0.5, 1.5, size=(2,)).astype(np.float32), name="bias")
    return kernel, bias


def _gradients(step, shapes, seed=1):
    """Random gradients, their size varying from step to step (so a global
    clip norm of 1 clips some steps and not others)."""
    rng = np.random.default_rng([seed, step])
    size = (3.0, 0.2, 2.0, 0.5, 4.0)[step % 5]
    return [(size * rng.normal(size=s)).astype(np.float32) for s in shapes]


def _clip(grads, clipnorm):
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads))
    return [g * (clipnorm / max(norm, clipnorm)) for g in grads]


def _applier(optimizer, variables, graph):
    """`optimizer.apply(grads, variables)` as a function of the gradients,
    eager or traced (the variables are captured, as in a train step)."""
    def apply(grads):
        optimizer.apply(grads, variables)

    return tf.function(apply) if graph else apply


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
@pytest.mark.parametrize("clipnorm", [None, 1.0])
def test_five_steps_match_numpy_with_schedule_and_decay_on_the_kernel_only(graph, clipnorm):
    kernel, bias = _variables()
    # 0 at step 0, then up to the peak and down: the rate changes every step.
    schedule = schedules.create("warmup_cosine", 0.02, total_steps=6, warmup_steps=2)
    rates = [float(schedule(k)) for k in range(5)]
    assert rates[0] == 0.0 and len(set(rates)) == 5
    optimizer = optim.AdamW(schedule, weight_decay=0.1, global_clipnorm=clipnorm)
    optimizer.build([kernel, bias])
    apply = _applier(optimizer, [kernel, bias], graph)
    expected = [NumpyAdamW(v.numpy(), weight_decay=0.1) for v in (kernel, bias)]
    for step in range(5):
        grads = _gradients(step, [(3, 2), (2,)])
        grads[1] *= np.float32(1e-3)  # √v̂ ~ 1e-3: where ε (1e-6) shows
        apply(grads)
        if clipnorm:
            grads = _clip(grads, clipnorm)
        for variable, reference, g in zip((kernel, bias), expected, grads):
            want = reference.step(g, rates[step])
            np.testing.assert_allclose(variable.numpy(), want, rtol=0, atol=ATOL,
                                       err_msg=f"step {step + 1}: {variable.path}")
    assert [int(c.numpy()) for c in optimizer.update_counts] == [5, 5]
    assert int(optimizer.iterations.numpy()) == 5


def test_a_variable_that_joins_late_gets_its_own_first_step():
    """Freezing stages: [a] for 3 updates, then [a, b]. b's first update is
    corrected with t = 1 (not the optimizer's 4); a keeps its moments."""
    rng = np.random.default_rng(0)
    a = keras.Variable(rng.normal(size=(2, 2)).astype(np.float32), name="a")
    b = keras.Variable(rng.normal(size=(2, 2)).astype(np.float32), name="b")
    optimizer = optim.AdamW(0.01, weight_decay=0.1)
    optimizer.build([a, b])  # once, over all variables, as compile() does
    apply_a = _applier(optimizer, [a], graph=True)
    apply_ab = _applier(optimizer, [a, b], graph=True)
    ref_a, ref_b = NumpyAdamW(a.numpy(), 0.1), NumpyAdamW(b.numpy(), 0.1)
    b_before = b.numpy().copy()
    for step in range(3):
        (ga,) = _gradients(step, [(2, 2)])
        apply_a([ga])
        ref_a.step(ga, 0.01)
    np.testing.assert_array_equal(b.numpy(), b_before)  # not in the subset
    assert [int(c.numpy()) for c in optimizer.update_counts] == [3, 0]
    for step in range(3, 5):
        ga, gb = _gradients(step, [(2, 2), (2, 2)])
        b_start = ref_b.theta.copy()
        apply_ab([ga, gb])
        np.testing.assert_allclose(a.numpy(), ref_a.step(ga, 0.01), rtol=0, atol=ATOL,
                                   err_msg=f"a, update {step + 1}")
        np.testing.assert_allclose(b.numpy(), ref_b.step(gb, 0.01), rtol=0, atol=ATOL,
                                   err_msg=f"b, its update {step - 2}")
        if step == 3:
            # Not vacuous: corrected with the optimizer's t = 4, b's first
            # step would be 0.58 of the right one (1 - 0.9**4 vs sqrt(1 - 0.999**4)).
            wrong = NumpyAdamW(b_start, 0.1)
            wrong.t = 3
            assert np.abs(wrong.step(gb, 0.01) - ref_b.theta).max() > 1e-3
    assert [int(c.numpy()) for c in optimizer.update_counts] == [5, 2]
    assert int(optimizer.iterations.numpy()) == 5


def test_stage_scale_and_block_multipliers_scale_the_step_and_the_decay():
    """η = rate × lr_scale × multiplier, as for SGD. A first step is
    η·g/(|g| + ε) ≈ η per entry, plus the decay η·λ·θ on 2-D variables."""
    a = keras.Variable(np.ones((2, 2), np.float32), name="a")
    b = keras.Variable(np.ones((2, 2), np.float32), name="b")
    bias = keras.Variable(np.ones(2, np.float32), name="bias")
    optimizer = optim.AdamW(0.1, weight_decay=0.5)
    optimizer.build([a, b, bias])
    optimizer.lr_scale.assign(0.5)
    optimizer.set_lr_multipliers({b.path: 0.25})
    grad = np.full((2, 2), 2.0, np.float32)
    optimizer.apply([grad, grad, np.full(2, 2.0, np.float32)], [a, b, bias])
    adam = 2.0 / (2.0 + EPSILON)
    np.testing.assert_allclose(a.numpy(), 1 - 0.05 * 0.5 - 0.05 * adam, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), 1 - 0.0125 * 0.5 - 0.0125 * adam, rtol=1e-6)
    np.testing.assert_allclose(bias.numpy(), 1 - 0.05 * adam, rtol=1e-6)  # no decay
    with pytest.raises(ValueError, match="No optimizer variable for path"):
        optimizer.set_lr_multipliers({"nowhere/kernel": 0.5})


def test_gradient_accumulation_updates_once_with_the_mean_gradient():
    (accumulated,), (plain,) = _variables()[:1], _variables()[:1]
    g1, g2 = _gradients(0, [(3, 2)]), _gradients(1, [(3, 2)])
    optimizer = optim.AdamW(0.01, gradient_accumulation_steps=2)
    optimizer.build([accumulated])
    apply = _applier(optimizer, [accumulated], graph=True)
    before = accumulated.numpy().copy()
    apply(g1)
    np.testing.assert_array_equal(accumulated.numpy(), before)  # a micro-batch only
    assert int(optimizer.update_counts[0].numpy()) == 0
    apply(g2)
    reference = optim.AdamW(0.01)
    reference.build([plain])
    reference.apply([(g1[0] + g2[0]) / 2], [plain])
    np.testing.assert_allclose(accumulated.numpy(), plain.numpy(), rtol=0, atol=1e-7)
    assert np.abs(plain.numpy() - before).max() > 1e-3
    assert int(optimizer.update_counts[0].numpy()) == 1  # t counts updates


def test_loss_scale_optimizer_unscales_and_skips_overflowing_steps():
    """Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer:
    scaled gradients give the unscaled update, and a step with an inf
    gradient moves nothing and counts no update (t stays right after it)."""
    (scaled,), (plain,) = _variables()[:1], _variables()[:1]
    wrapped = keras.optimizers.LossScaleOptimizer(optim.AdamW(0.01), initial_scale=2.0**10)
    assert isinstance(optim.unwrap(wrapped), optim.AdamW)
    wrapped.build([scaled])
    reference = optim.AdamW(0.01)
    reference.build([plain])
    apply = _applier(wrapped, [scaled], graph=True)
    for step in range(2):
        (g,) = _gradients(step, [(3, 2)])
        if step == 1:  # overflow: skipped, the scale halves
            before = scaled.numpy().copy()
            apply([np.full((3, 2), np.inf, np.float32)])
            np.testing.assert_array_equal(scaled.numpy(), before)
            assert float(wrapped.dynamic_scale.numpy()) == 2.0**9
        apply([g * np.float32(wrapped.dynamic_scale.numpy())])
        reference.apply([g], [plain])
        np.testing.assert_allclose(scaled.numpy(), plain.numpy(), rtol=0, atol=1e-7)
    assert int(optim.unwrap(wrapped).update_counts[0].numpy()) == 2


def test_a_mixed_float16_model_fits_with_it():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optim.AdamW(0.01), loss="mse")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    kernel = model.layers[0].kernel.numpy().copy()
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    model.fit(x, x[:, :2], batch_size=4, epochs=1, verbose=0)
    inner = optim.unwrap(model.optimizer)
    assert [int(c.numpy()) for c in inner.update_counts] == [2, 2]
    # Adam's first steps move each entry by up to about the rate (0.01) each.
    moved = np.abs(model.layers[0].kernel.numpy() - kernel)
    assert moved.min() > 0 and 0.01 < moved.max() <= 0.0201


def _train(optimizer, variables, steps):
    for step in steps:
        optimizer.apply(_gradients(step, [v.shape for v in variables]), variables)


def test_slots_are_checkpointed_and_a_restore_resumes_bitwise(tmp_path):
    kernel, bias = _variables()
    optimizer = optim.AdamW(schedules.WarmupCosine(0.02, total_steps=6, warmup_steps=1))
    optimizer.build([kernel, bias])
    slots = optimizer.momentums + optimizer.velocities + optimizer.update_counts
    held = {id(v) for v in optimizer.variables}
    assert len(slots) == 6 and all(id(s) in held for s in slots)
    _train(optimizer, [kernel, bias], range(2))
    path = tf.train.Checkpoint(optimizer=optimizer, kernel=kernel, bias=bias).save(
        str(tmp_path / "ckpt")
    )
    _train(optimizer, [kernel, bias], range(2, 4))  # uninterrupted

    kernel2, bias2 = _variables(seed=5)  # other values: all come from the checkpoint
    resumed = optim.AdamW(schedules.WarmupCosine(0.02, total_steps=6, warmup_steps=1))
    resumed.build([kernel2, bias2])
    tf.train.Checkpoint(optimizer=resumed, kernel=kernel2, bias=bias2).restore(path).assert_consumed()
    assert [int(c.numpy()) for c in resumed.update_counts] == [2, 2]
    _train(resumed, [kernel2, bias2], range(2, 4))
    for a, b in zip((kernel, bias), (kernel2, bias2)):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
    for a, b in zip(optimizer.variables, resumed.variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)


def test_config_round_trips_with_a_schedule():
    schedule = schedules.WarmupCosine(3e-4, total_steps=100, warmup_steps=10)
    optimizer = optim.AdamW(schedule, beta_1=0.8, beta_2=0.99, epsilon=1e-8, weight_decay=0.05,
                            global_clipnorm=1.0, gradient_accumulation_steps=2, name="bert")
    config = json.loads(json.dumps(optimizer.get_config()))
    assert (config["beta_1"], config["beta_2"], config["epsilon"]) == (0.8, 0.99, 1e-8)
    assert config["weight_decay"] == 0.05
    restored = optim.AdamW.from_config(config)
    assert restored.get_config() == optimizer.get_config()
    assert restored.learning_rate_schedule.get_config() == schedule.get_config()
    # Registered: a .keras file's optimizer entry comes back as keras_ft's AdamW.
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(optimizer))
    assert type(revived) is optim.AdamW and revived.get_config() == optimizer.get_config()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta_1=1.0), r"beta_1 must be in \[0, 1\), got 1.0."),
        (dict(beta_2=-0.1), r"beta_2 must be in \[0, 1\), got -0.1."),
        (dict(epsilon=0.0), "epsilon must be > 0"),
        (dict(weight_decay=-1e-4), "weight_decay must be >= 0, got -0.0001."),
    ],
)
def test_bad_arguments_are_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.AdamW(1e-3, **kwargs)

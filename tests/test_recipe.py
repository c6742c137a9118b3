"""The dataset-size defaults (BiT-HyperRule, adapted) in keras_ft.recipe."""

import pytest

from keras_ft import recipe


@pytest.mark.parametrize(
    "n, expected",
    [(1, "small"), (19_999, "small"), (20_000, "medium"), (499_999, "medium"), (500_000, "large")],
)
def test_tier_boundaries_are_bits(n, expected):
    assert recipe.tier(n) == expected


def test_tier_rejects_empty_data():
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        recipe.tier(0)


@pytest.mark.parametrize(
    "n, batch, max_epochs, expected",
    [
        (10_000, 512, 1000, 500),  # BiT itself: 500 steps of 512 on a small set
        (100_000, 512, 1000, 10_000),
        (1_000_000, 512, 1000, 20_000),
        (10_000, 32, 1000, 8_000),  # the same 256k examples at batch 32
        (160, 16, 30, 300),  # capped at 30 passes: 4,800 examples
        (1_000_000, 64, 30, 160_000),  # BiT's 10.24M examples < 30 passes
        (3, 16, 30, 6),  # ceil(90 / 16)
    ],
)
def test_total_steps_keeps_examples_seen_capped_by_epochs(n, batch, max_epochs, expected):
    assert recipe.total_steps(n, batch, max_epochs) == expected


@pytest.mark.parametrize(
    "n, steps, expected",
    [(1_000, 500, 100), (1_000, 300, 60), (50_000, 10_000, 500), (10**6, 20_000, 500),
     (10**6, 1_000, 25)],
)
def test_warmup_is_bits_share_of_the_run(n, steps, expected):
    assert recipe.warmup_steps(n, steps) == expected


def test_decay_boundaries_are_bits_supports():
    assert recipe.decay_boundaries(1_000) == (0.4, 0.6, 0.8)  # 200/300/400 of 500
    assert recipe.decay_boundaries(50_000) == (0.3, 0.6, 0.9)  # 3k/6k/9k of 10k
    assert recipe.decay_boundaries(10**6) == (0.3, 0.6, 0.9)  # 6k/12k/18k of 20k


def test_mixup_only_from_20k_examples():
    assert recipe.mixup_alpha(19_999) == 0.0
    assert recipe.mixup_alpha(20_000) == 0.1


@pytest.mark.parametrize(
    "h, w, default, expected",
    [(25, 25, 224, 128), (32, 32, 224, 128), (95, 96, 224, 128), (96, 96, 224, 224),
     (500, 375, 224, 224), (500, 375, 260, 260)],
)
def test_resolution_small_images_128_else_backbone_default(h, w, default, expected):
    assert recipe.resolution(h, w, default) == expected


def test_learning_rate_scales_bits_rate_linearly():
    assert recipe.learning_rate(512) == pytest.approx(0.003)
    assert recipe.learning_rate(32) == pytest.approx(0.003 / 16)


def test_recipe_for_the_quickstart_data_and_its_flags():
    r = recipe.Recipe.for_data(num_examples=160, image_size=(25, 25), batch_size=16)
    assert r == recipe.Recipe(
        total_steps=300, epochs=30, warmup_steps=60, decay_boundaries=(0.4, 0.6, 0.8),
        image_size=128, mixup_alpha=0.0,
        stages=(dict(epochs=30, blocks=-1, lr_scale=1.0),),
    )
    assert r.flags() == (
        "--config.train.epochs=30 --config.schedule.name=step "
        "--config.schedule.warmup_steps=60 "
        "--config.schedule.decay_boundaries='(0.4, 0.6, 0.8)' --config.model.image_size=128 "
        """--config.freeze.stages='({"epochs": 30, "blocks": -1, "lr_scale": 1.0},)'"""
    )


def test_stage_plan_every_block_only_where_batchnorm_can_use_batch_statistics():
    from keras_ft import batchnorm

    assert recipe.MIN_BATCH_STATISTICS == batchnorm.AUTO_MIN_BATCH
    assert recipe.stages(30, 16) == (dict(epochs=30, blocks=-1, lr_scale=1.0),)
    assert recipe.stages(30, 15) == (dict(epochs=10, blocks=0, lr_scale=1.0),
                                     dict(epochs=20, blocks=3, lr_scale=0.1))
    assert recipe.stages(1, 8) == (dict(epochs=1, blocks=0, lr_scale=1.0),)
    # the batch per replica decides: 64 over 8 replicas is 8 per BatchNorm layer
    many = recipe.Recipe.for_data(num_examples=1000, image_size=(64, 64), batch_size=64,
                                  replicas=8)
    assert [s["blocks"] for s in many.stages] == [0, 3]
    with pytest.raises(ValueError, match="replicas"):
        recipe.Recipe.for_data(num_examples=1000, image_size=(64, 64), batch_size=64,
                               replicas=0)


def test_recipe_turns_mixup_on_from_20k_examples():
    r = recipe.Recipe.for_data(num_examples=50_000, image_size=(300, 300), batch_size=64)
    assert r.mixup_alpha == 0.1
    assert r.overrides()["data.augment.mixup"] == 0.1
    assert r.flags().endswith("--config.data.augment.mixup=0.1")
    small = recipe.Recipe.for_data(num_examples=160, image_size=(25, 25), batch_size=16)
    assert "data.augment.mixup" not in small.overrides()  # the default, 0, is off

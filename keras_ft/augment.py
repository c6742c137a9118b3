"""Training augmentation in which every random draw is a pure function of
(seed, position in the stream).

keras_ft resumes a run at the exact step by rebuilding the training stream
and skipping the batches already consumed (`data.make_dataset`), so no op may
keep random state between elements: each draws from a seed derived from
`(seed, position)` (per image) or `(seed, batch index)` (per batch).

Keras preprocessing layers keep their state in a `SeedGenerator` variable,
which inside `tf.data` advances in whatever order elements happen to be
processed, and is not restored by skipping. Their public
`get_random_transformation(data, training, seed=...)` does accept a seed —
an int or a `SeedGenerator`, not a tensor (Keras 3.15 `draw_seed` rejects
tensors), and keras.layers.RandAugment ignores it. So the Keras layers used
here (RandAugment's eleven ops, MixUp, CutMix) are handed `StreamSeeds`: a
`SeedGenerator` with no state, whose k-th `next()` is the k-th seed folded
from one stateless seed tensor. The ops and their parameters are Keras'; the
seeds are ours. (An int seed would not do either: Keras draws several values
per transformation, and with an int every draw gets the same seed —
CutMix's x and y offsets would be equal, its crops all on the diagonal.)

Ops, in the order they run (keys of the `data.augment` sub-config):

    random_resized_crop  per image, on the decoded image: a random crop of
                         `scale` of its area and aspect ratio in [3/4, 4/3]
                         (`tf.image.stateless_sample_distorted_bounding_box`,
                         the Inception crop), resized to S x S. It replaces
                         the `data.resize` policy for training images.
    flip                 per image: left-right with probability 1/2.
    randaugment_ops      per image: that many ops of Keras' RandAugment, each
                         picked uniformly from its eleven, at strength
                         `randaugment_magnitude` (Keras' `factor`).
    mixup, cutmix        per batch, after batching: keras.layers.MixUp /
                         CutMix with that alpha; labels become one-hot
                         mixtures. With both on, each batch gets one of the
                         two, by a coin (as timm's Mixup does).
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

RRC_ASPECT_RATIO = (3 / 4, 4 / 3)  # Inception / torchvision RandomResizedCrop
RRC_ATTEMPTS = 10  # crops tried before falling back to the whole image

# Tags folded into the element's (seed, position) seed, one per op, so the
# ops draw independently. The flip keeps the plain (seed, position) seed it
# has always had, so streams with flips only are what they were before.
_CROP, _RANDAUGMENT, _MIX = 1, 2, 3
_MIX_COIN, _MIXUP, _CUTMIX = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Augment:
    """The `data.augment` sub-config, checked.

    Args:
        flip: flip each training image left-right with probability 1/2.
        random_resized_crop: `()` (off) or `(min, max)`, the crop's share of
            the image's area, e.g. `(0.08, 1.0)` (Inception).
        randaugment_ops: RandAugment ops applied to each image; 0 = off.
        randaugment_magnitude: their strength in [0, 1] (Keras' `factor`).
        mixup: MixUp's alpha (mixing weights ~ Beta(alpha, alpha)); 0 = off.
        cutmix: CutMix's alpha in [0, 1] (Keras' bound); 0 = off.
    """

    flip: bool = True
    random_resized_crop: tuple = ()
    randaugment_ops: int = 0
    randaugment_magnitude: float = 0.5
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self):
        def bad(key, allowed):
            return ValueError(
                f"data.augment.{key} must be {allowed}, got "
                f"{getattr(self, key)!r}."
            )

        if not isinstance(self.flip, bool):
            raise bad("flip", "True or False")
        crop = self.random_resized_crop
        if not (
            isinstance(crop, (tuple, list))
            and (
                len(crop) == 0
                or len(crop) == 2
                and all(_is_number(v) for v in crop)
                and 0 < crop[0] <= crop[1] <= 1
            )
        ):
            raise bad("random_resized_crop", "() (off) or (min, max) with 0 < min <= max <= 1")
        object.__setattr__(self, "random_resized_crop", tuple(float(v) for v in crop))
        ops = self.randaugment_ops
        if isinstance(ops, bool) or not isinstance(ops, int) or ops < 0:
            raise bad("randaugment_ops", "an integer >= 0 (0 = off)")
        if not (_is_number(self.randaugment_magnitude) and 0 <= self.randaugment_magnitude <= 1):
            raise bad("randaugment_magnitude", "a number in [0, 1]")
        if not (_is_number(self.mixup) and 0 <= self.mixup < float("inf")):
            raise bad("mixup", "a number >= 0 (0 = off)")
        if not (_is_number(self.cutmix) and 0 <= self.cutmix <= 1):
            raise bad("cutmix", "a number in [0, 1] (0 = off)")

    @classmethod
    def from_config(cls, augment_config) -> "Augment":
        """From the `data.augment` sub-config (a ConfigDict or a saved dict)."""
        return cls(**{field.name: augment_config[field.name] for field in dataclasses.fields(cls)})

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (MixUp or CutMix): labels are one-hot."""
        return bool(self.mixup or self.cutmix)

    def describe(self) -> str:
        """One line for logs and reports, e.g. "flip, mixup 0.2"."""
        parts = ["flip"] if self.flip else []
        if self.random_resized_crop:
            parts.append("random resized crop {:g}-{:g}".format(*self.random_resized_crop))
        if self.randaugment_ops:
            parts.append(f"RandAugment {self.randaugment_ops} op(s) at {self.randaugment_magnitude:g}")
        if self.mixup:
            parts.append(f"MixUp {self.mixup:g}")
        if self.cutmix:
            parts.append(f"CutMix {self.cutmix:g}")
        return ", ".join(parts) or "none"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def element_seed(seed, position) -> tf.Tensor:
    """The int64 `[2]` seed of the element at `position` of the stream."""
    return tf.stack([tf.cast(seed, tf.int64), tf.cast(position, tf.int64)])


def fold(seed: tf.Tensor, tag: int) -> tf.Tensor:
    """An independent seed for `tag` drawn from `seed` (stateless)."""
    return tf.random.experimental.stateless_fold_in(seed, tag)


class StreamSeeds(keras.random.SeedGenerator):
    """A stateless `SeedGenerator`: its k-th `next()` is `seed` folded with k.

    Keras' random functions call `next()` on a `SeedGenerator` passed as
    `seed`; the calls happen in program order while the op is traced (or run
    eagerly), so a layer's draws are a pure function of `seed`, the same in
    eager mode and inside `tf.data`. It holds no variable: the base class's
    `__init__`, which creates one, is deliberately not called. Make a new one
    for every element or batch.
    """

    def __init__(self, seed: tf.Tensor):  # pylint: disable=super-init-not-called
        self._seed = seed
        self._calls = 0

    def next(self, ordered=True):
        del ordered  # one order only: the calls'
        self._calls += 1
        return fold(self._seed, self._calls)


def random_resized_crop(image: tf.Tensor, scale: tuple, seed: tf.Tensor) -> tf.Tensor:
    """A random crop of uint8 `[H, W, 3]`: `scale` of its area, aspect ratio in
    `RRC_ASPECT_RATIO`. After `RRC_ATTEMPTS` failed tries, the whole image
    (as `tf.image.sample_distorted_bounding_box` does). Resize it afterwards."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=RRC_ASPECT_RATIO,
        area_range=scale,
        max_attempts=RRC_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.slice(image, begin, size)


class SeededRandAugment(keras.layers.RandAugment):
    """keras.layers.RandAugment that draws from the seed it is given.

    Keras 3.15's `get_random_transformation` ignores its `seed` argument and
    uses the layer's own state; this one passes `seed` (a `StreamSeeds`) to
    the op choice and to each op. `transform_images` runs only the chosen
    op (`tf.switch_case`) where Keras runs all eleven and keeps one with
    `where`: the same result (bitwise, checked here), ~4x faster at 224 px.
    """

    def get_random_transformation(self, data, training=True, seed=None):
        if seed is None:
            raise ValueError("SeededRandAugment needs a seed (a StreamSeeds).")
        choice = self.backend.random.randint(
            (self.num_ops,), 0, len(self._AUGMENT_LAYERS), seed=seed
        )
        transforms = {
            name: getattr(self, name).get_random_transformation(data, training=True, seed=seed)
            for name in self._AUGMENT_LAYERS
        }
        return {"transforms": transforms, "layer_idxes": choice}

    def transform_images(self, images, transformation, training=True):
        images = tf.cast(images, self.compute_dtype)
        if not training:
            return images
        transforms = transformation["transforms"]

        def branch(name, x):
            layer = getattr(self, name)
            return lambda: tf.cast(
                layer.transform_images(x, transforms[name], training=True), self.compute_dtype
            )

        for i in range(self.num_ops):
            images = tf.switch_case(
                transformation["layer_idxes"][i],
                [branch(name, images) for name in self._AUGMENT_LAYERS],
            )
        return images


class Pipeline:
    """The ops of one `Augment`, with their Keras layers built once.

    `crop` and `image` work on one image at a time, inside `tf.data.map`
    before batching; `mix` on a batch. Each takes the stream's seed and the
    element's position (or the batch's index) and is a pure function of
    them and its input, in eager mode as inside `tf.data`.
    """

    def __init__(self, augment: Augment):
        self.augment = augment
        # Built eagerly here, never inside a traced function: each layer
        # creates a (never used) seed variable in its constructor.
        self._randaugment = self._mixup = self._cutmix = None
        if augment.randaugment_ops:
            self._randaugment = SeededRandAugment(
                value_range=(0, 255),
                num_ops=augment.randaugment_ops,
                factor=augment.randaugment_magnitude,
                dtype="float32",
            )
        if augment.mixup:
            self._mixup = keras.layers.MixUp(alpha=augment.mixup, dtype="float32")
        if augment.cutmix:  # factor (a, a): alpha fixed at a, as in the paper
            self._cutmix = keras.layers.CutMix(
                factor=(augment.cutmix, augment.cutmix), dtype="float32"
            )

    def crop(self, image: tf.Tensor, seed, position) -> tf.Tensor:
        """`random_resized_crop` of uint8 `[H, W, 3]` (call only when it is on)."""
        return random_resized_crop(
            image, self.augment.random_resized_crop, fold(element_seed(seed, position), _CROP)
        )

    def image(self, image: tf.Tensor, seed, position) -> tf.Tensor:
        """Flip and RandAugment of float32 `[S, S, 3]` in [0, 255]."""
        element = element_seed(seed, position)
        if self.augment.flip:
            image = tf.image.stateless_random_flip_left_right(image, element)
        if self._randaugment is not None:
            seeds = StreamSeeds(fold(element, _RANDAUGMENT))
            batch = image[None]
            transformation = self._randaugment.get_random_transformation(
                batch, training=True, seed=seeds
            )
            image = self._randaugment.transform_images(batch, transformation)[0]
            image = tf.clip_by_value(image, 0.0, 255.0)
        return image

    def mix(self, images: tf.Tensor, labels: tf.Tensor, seed, batch_index):
        """MixUp or CutMix of a batch; `labels` one-hot float32 `[N, C]`.

        Returns the mixed images and labels; each label row still sums to 1.
        """
        base = fold(element_seed(seed, batch_index), _MIX)

        def apply(layer, tag):
            def run():
                transformation = layer.get_random_transformation(
                    images, training=True, seed=StreamSeeds(fold(base, tag))
                )
                return (
                    tf.cast(layer.transform_images(images, transformation), tf.float32),
                    tf.cast(layer.transform_labels(labels, transformation), tf.float32),
                )

            return run

        if self._mixup is not None and self._cutmix is not None:
            coin = tf.random.stateless_uniform([], seed=fold(base, _MIX_COIN))
            return tf.cond(coin < 0.5, apply(self._mixup, _MIXUP), apply(self._cutmix, _CUTMIX))
        if self._mixup is not None:
            return apply(self._mixup, _MIXUP)()
        if self._cutmix is not None:
            return apply(self._cutmix, _CUTMIX)()
        return images, labels

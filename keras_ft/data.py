"""Training data: images with labels, a train/validation split, and tf.data.

An `ImageSet` holds the images of a source (file paths, decoded arrays, or
encoded bytes in memory), integer labels and class names; `keras_ft.sources`
reads one from a `data.source` string (`folder:`, `csv:`, `tfds:`,
`sample:`). `split` divides it into training and validation images, by the
seed or as the source itself divides them. `make_dataset` turns an
`ImageSet` into a batched, prefetched `tf.data.Dataset` of float RGB images
in [0, 255] at the model's input size; the backbone's own preprocessing runs
inside the model, not here.
Images are sized by one of the `RESIZE_POLICIES` (`resize_image`, which the
SavedModel export uses too) and, for training, augmented (`keras_ft.augment`).
"""

from __future__ import annotations

import atexit
import dataclasses
import time

import numpy as np
import tensorflow as tf
from absl import logging

from keras_ft import augment as augment_lib, limits

# The kinds of `ImageSet.images`.
FILES, ARRAYS, ENCODED, RECORDS = "files", "arrays", "encoded", "records"
RESIZE_POLICIES = ("resize", "center_crop", "resize_then_crop", "pad")
# How training images are fed (`data.pipeline`): every worker runs the whole
# stream and keeps its share ("memory", images kept decoded when they fit),
# or each reads only its share, by index ("stream"); "auto" picks by size.
PIPELINES = ("auto", "memory", "stream")
CROP_FRACTION = 0.875  # "resize_then_crop": the crop's share of the short side


class _Reads:
    """When records were last read, so that reads can stop before the
    interpreter exits. tf.data's threads call `RecordImages.read` through
    `tf.numpy_function`; one that enters Python while the interpreter is
    finalizing never returns, and a process whose stream iterator was still
    alive hung at exit (2 runs in 3). At exit, reads return no bytes at
    once (the elements fail to decode, and nobody reads them), and exit
    waits until the threads have stopped calling (their buffers full: they
    wait without Python), at most `EXIT_WAIT` seconds."""

    QUIET, EXIT_WAIT = 0.05, 2.0

    def __init__(self):
        self.last, self.exiting = None, False

    def stop(self):
        self.exiting = True
        deadline = time.monotonic() + self.EXIT_WAIT
        while self.last is not None and time.monotonic() < deadline and (
                time.monotonic() - self.last < self.QUIET):
            time.sleep(self.QUIET / 2)


_READS = _Reads()
atexit.register(_READS.stop)


class RecordImages:
    """Encoded images read one by one, by index, from a random-access store
    (`keras_ft.records`: ArrayRecord shards written by `launch.pack`, or a
    TFDS dataset prepared as ArrayRecord): nothing is held in memory but the
    indices.

    Args:
        store: has `read(i) -> bytes` (the encoded image `i`; safe to call
            from several threads), `describe() -> str` and `name(i) -> str`.
        index: int64 `[N]`: the store's records this set holds, in order.
    """

    def __init__(self, store, index: np.ndarray):
        self.store, self.index = store, np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: np.ndarray) -> "RecordImages":
        return RecordImages(self.store, self.index[np.asarray(index, np.int64)])

    def read(self, i) -> bytes:
        """The encoded bytes of this set's image `i` (a position in `index`)."""
        _READS.last = time.monotonic()
        if _READS.exiting:  # no image: the element fails (unread), quietly
            return b""
        return self.store.read(int(self.index[int(i)]))


@dataclasses.dataclass
class ImageSet:
    """Images with integer labels and the names of their classes.

    Attributes:
        images: one of four kinds (`kind`): a list of image file paths
            ("files", read and decoded by `make_dataset`); a uint8 array
            `[N, H, W, 3]` ("arrays", decoded images of one size); an
            object array of N `bytes` ("encoded": JPEG/PNG/BMP/GIF files
            held in memory, any size, as TFDS stores them); or
            `RecordImages` ("records": encoded images read by index from
            ArrayRecord files when needed).
        labels: int32 `[N]`, indices into `class_names`.
        class_names: the classes, in label order.
        val_mask: bool `[N]`: the source's own train/validation split (True =
            validation), as `train/` and `val/` folders or TFDS splits give
            it; None when `split` draws one by seed.
        names: for "encoded" images, how messages name each one
            (`"tf_flowers train #12"`); None for files (the path names it).
        root: for files from a folder, that folder: links that leave it
            are not followed (`keras_ft.limits.read_regular`).
    """

    images: list[str] | np.ndarray
    labels: np.ndarray
    class_names: list[str]
    val_mask: np.ndarray | None = None
    names: list[str] | None = None
    root: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def kind(self) -> str:
        """`FILES`, `ARRAYS`, `ENCODED` or `RECORDS`: what `images` holds."""
        if isinstance(self.images, RecordImages):
            return RECORDS
        if not isinstance(self.images, np.ndarray):
            return FILES
        return ENCODED if self.images.dtype == object else ARRAYS

    def subset(self, index: np.ndarray) -> "ImageSet":
        index = np.asarray(index, np.int64)
        if isinstance(self.images, (np.ndarray, RecordImages)):
            images = self.images[index]
        else:
            images = [self.images[i] for i in index]
        return ImageSet(
            images,
            self.labels[index],
            self.class_names,
            None if self.val_mask is None else self.val_mask[index],
            None if self.names is None else [self.names[i] for i in index],
            self.root,
        )


def from_arrays(images, labels, class_names=None) -> ImageSet:
    """Wraps in-memory uint8 images `[N, H, W, 3]` and integer labels."""
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3], got {images.shape}.")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if labels.min(initial=0) < 0 or num_classes > len(class_names):
        raise ValueError(
            f"labels must be in [0, {len(class_names)}), got "
            f"[{labels.min()}, {labels.max()}]."
        )
    return ImageSet(images, labels, list(class_names))


def split(data: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Stratified, seeded train/validation split (ignores `data.val_mask`).

    Each class contributes `round(n * val_fraction)` (at least one) images to
    validation, chosen by a permutation drawn from `seed`; the same data and
    seed always give the same split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}.")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in range(len(data.class_names)):
        idx = np.flatnonzero(data.labels == label)
        if len(idx) < 2:
            raise ValueError(
                f"Class {data.class_names[label]!r} has {len(idx)} image(s); "
                "a train/validation split needs at least 2 per class."
            )
        idx = rng.permutation(idx)
        n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return (
        data.subset(np.sort(np.concatenate(train_idx))),
        data.subset(np.sort(np.concatenate(val_idx))),
    )


def per_class(data: ImageSet, count: int, seed: int) -> ImageSet:
    """`count` images of each class of `data`, drawn by `seed` (in their
    original order): `data.train_per_class`. A smaller `count` draws a subset
    of a larger one's, so the sets of a learning curve are nested."""
    rng = np.random.default_rng([seed, 1])  # not the split's stream
    keep = []
    for label, name in enumerate(data.class_names):
        idx = np.flatnonzero(data.labels == label)
        if len(idx) < count:
            raise ValueError(
                f"data.train_per_class={count}, but class {name!r} has {len(idx)} training "
                "image(s) after the validation split: lower it, or add images."
            )
        keep.append(rng.permutation(idx)[:count])
    return data.subset(np.sort(np.concatenate(keep)))


def split_for_run(data, data_spec, seed: int):
    """`(train, val)` of a run's examples (an `ImageSet`, or any set with
    `labels`, `val_mask` and `subset`, e.g. `keras_ft.text_sources.TextSet`):
    the source's own split if it has one, else `split` by
    `data_spec.val_fraction` and `seed`; then `data_spec.train_per_class`
    training examples of each class, if set (`per_class`)."""
    if data.val_mask is None:
        train_set, val_set = split(data, data_spec.val_fraction, seed)
    else:
        train_set, val_set = split_as_given(data)
    if data_spec.train_per_class:
        train_set = per_class(train_set, data_spec.train_per_class, seed)
    return train_set, val_set


def split_as_given(data: ImageSet) -> tuple[ImageSet, ImageSet]:
    """The source's own train/validation split (`data.val_mask`).

    Every class needs training images; validation may lack a class (a TFDS
    validation split sometimes does), but not be empty.
    """
    if data.val_mask is None:
        raise ValueError("The data has no split of its own; use split() with a seed.")
    train = data.subset(np.flatnonzero(~data.val_mask))
    val = data.subset(np.flatnonzero(data.val_mask))
    counts = np.bincount(train.labels, minlength=len(data.class_names))
    empty = [data.class_names[label] for label in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(
            f"Class {empty[0]!r} has no training images in the source's own "
            "train/validation split; give it some."
        )
    if not len(val):
        raise ValueError("The source's own validation split has no images.")
    return (
        dataclasses.replace(train, val_mask=None),
        dataclasses.replace(val, val_mask=None),
    )


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/BMP/GIF bytes to uint8 RGB `[H, W, 3]` (gray -> RGB).

    The same for training, evaluation and the export: more than
    `limits.MAX_PIXELS` decoded pixels fail before decoding (the scan has
    skipped such files already; this holds for a file changed since, and for
    served images); EXIF orientation is ignored, as TensorFlow's decoders do.
    """
    with tf.control_dependencies([limits.check_pixels(encoded)]):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def check_resize(policy: str) -> str:
    """Returns `policy` if it is one of `RESIZE_POLICIES`, else a ValueError."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(
            f"Unknown data.resize {policy!r}. Choose one of: {', '.join(RESIZE_POLICIES)}."
        )
    return policy


def resize_side(image_size: int, policy: str = "resize") -> int:
    """The side the short side is resized to before the final crop.

    `image_size / CROP_FRACTION` (rounded) for "resize_then_crop" — 256 for
    224, as in ImageNet evaluation — else `image_size`. Square images of
    this side are the ones a policy maps to `image_size` by a center crop
    alone (or not at all).
    """
    check_resize(policy)
    if policy == "resize_then_crop":
        return int(round(image_size / CROP_FRACTION))
    return image_size


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
    image = tf.image.resize(tf.cast(image, tf.float32), (height, width), antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def _center_crop(image: tf.Tensor, height, width) -> tf.Tensor:
    shape = tf.shape(image)
    top = (shape[-3] - height) // 2
    left = (shape[-2] - width) // 2
    return image[..., top:top + height, left:left + width, :]


def _scaled(shape, scale) -> tuple[tf.Tensor, tf.Tensor]:
    """Height and width of `shape` ([..., H, W, 3]) times `scale`, at least 1."""
    size = tf.cast(shape[-3:-1], tf.float64) * scale
    size = tf.maximum(tf.cast(tf.round(size), tf.int32), 1)
    return size[0], size[1]


def resize_image(image: tf.Tensor, image_size: int, policy: str = "resize") -> tf.Tensor:
    """Brings uint8 `[..., H, W, 3]` to float32 `[..., S, S, 3]` in [0, 255].

    The one function that sizes images for training (without
    `random_resized_crop`), evaluation and the SavedModel export alike, so
    that the served model sees what training saw. `policy` (`data.resize`):

        resize            bilinear resize of the whole image to S x S (the
                          aspect ratio is not kept).
        center_crop       the largest centered square, resized to S x S.
        resize_then_crop  the short side resized to `resize_side(S)` (S /
                          0.875, aspect ratio kept), then the central S x S:
                          ImageNet evaluation's preprocessing.
        pad               the long side resized to S (aspect ratio kept),
                          centered on an S x S canvas of zeros (black).

    Resizing is bilinear with antialiasing; a batch `[N, H, W, 3]` shares one
    crop or pad, as its images share one size.
    """
    check_resize(policy)
    shape = tf.shape(image)
    height, width = shape[-3], shape[-2]
    if policy == "resize":
        image = _resize(image, image_size, image_size)
    elif policy == "center_crop":
        side = tf.minimum(height, width)
        image = _resize(_center_crop(image, side, side), image_size, image_size)
    elif policy == "resize_then_crop":
        short = tf.cast(tf.minimum(height, width), tf.float64)
        new_height, new_width = _scaled(shape, resize_side(image_size, policy) / short)
        image = _resize(image, new_height, new_width)
        image = _center_crop(image, image_size, image_size)
    else:  # pad
        long = tf.cast(tf.maximum(height, width), tf.float64)
        new_height, new_width = _scaled(shape, image_size / long)
        image = _resize(image, new_height, new_width)
        image = tf.image.pad_to_bounding_box(
            image, (image_size - new_height) // 2, (image_size - new_width) // 2,
            image_size, image_size,
        )
    return tf.ensure_shape(image, image.shape[:-3].concatenate([image_size, image_size, 3]))


def size_all(data: ImageSet, image_size: int, resize: str = "resize") -> np.ndarray:
    """Every image of `data` decoded and sized: float32 `[N, S, S, 3]`.

    The per-image work of `make_dataset` that is the same at every pass, done
    once, by the same ops (so with the same values); pass the result as
    `make_dataset(..., sized=...)`. Needs N x S x S x 12 bytes of memory.
    """
    ds = make_dataset(data, image_size, 256, training=False, resize=resize)
    parts = [x for x, _ in ds.as_numpy_iterator()]
    return np.concatenate(parts) if parts else np.zeros((0, image_size, image_size, 3), np.float32)


class SizedCache:
    """Images decoded and sized once (`size_all`) and kept in memory, when
    they fit in a budget; what `make_dataset(..., sized=...)` takes.

    Args:
        image_size: the model's input side.
        resize: the resize policy (`RESIZE_POLICIES`).
        budget_mb: the most memory all kept images may take (0 = none kept).
    """

    def __init__(self, image_size: int, resize: str, budget_mb: float):
        self.image_size, self.resize, self.budget_mb = image_size, resize, budget_mb
        self._arrays: dict[str, np.ndarray | None] = {}

    def get(self, name: str, images: ImageSet) -> np.ndarray | None:
        """`images` sized, kept under `name` ("train", "val"); None when they
        do not fit the budget with what is kept already."""
        if name not in self._arrays:
            need = len(images) * self.image_size**2 * 3 * 4
            used = sum(a.nbytes for a in self._arrays.values() if a is not None)
            if used + need > self.budget_mb * 2**20:
                if self.budget_mb:
                    logging.info(
                        "Not caching %d decoded %s images: %.0f MB > data.cache_images_mb=%g.",
                        len(images), name, (used + need) / 2**20, self.budget_mb,
                    )
                self._arrays[name] = None
            else:
                start = time.perf_counter()
                self._arrays[name] = size_all(images, self.image_size, self.resize)
                logging.info(
                    "Decoded and sized %d %s images once, kept in memory (%.1f MB, %.1fs).",
                    len(images), name, need / 2**20, time.perf_counter() - start,
                )
        return self._arrays[name]


def choose_pipeline(
    setting: str, train: ImageSet, image_size: int, budget_mb: float, mixes: bool = False
) -> tuple[str, str]:
    """`(pipeline, why)`: the `data.pipeline` a run's training images use.

    "auto" is "memory" when the training images, decoded and sized
    (N x S x S x 12 bytes), fit in `data.cache_images_mb`: decoding them
    once and keeping them beats reading them again. Otherwise it is
    "stream": each worker reads and decodes only its share of every batch,
    and memory does not grow with the data. MixUp/CutMix mix whole global
    batches, which a worker of the stream pipeline does not read: "auto"
    keeps them on "memory".
    """
    if setting not in PIPELINES:
        raise ValueError(f"Unknown data.pipeline {setting!r}. Choose one of: {', '.join(PIPELINES)}.")
    if setting != "auto":
        return setting, f"data.pipeline={setting!r}"
    need_mb = len(train) * image_size**2 * 12 / 2**20
    fits = need_mb <= budget_mb
    if mixes and not fits:
        return "memory", ("MixUp/CutMix mix whole global batches, which the stream "
                          "pipeline's workers do not read")
    return ("memory" if fits else "stream"), (
        f"the {len(train):,} training images decoded at {image_size} px, {need_mb:,.0f} MB, "
        f"{'fit' if fits else 'exceed'} data.cache_images_mb={budget_mb:g}")


def training_order(
    n: int, batch_size: int, seed: int, skip_batches: int = 0, shard: tuple[int, int] = (0, 1)
) -> tf.data.Dataset:
    """The training stream's `(position, index)` pairs, unbatched.

    Pass `p` visits the `n` indices in a permutation drawn from `(seed, p)`
    (a global shuffle, no buffer), cut to whole batches; `position` counts
    elements over the whole stream, so batch `b` holds positions
    `b * batch_size` to `(b + 1) * batch_size - 1`. Shared by the image
    stream (`make_dataset`) and the cached-feature stream
    (`keras_ft.features`), so both visit the same images in the same order.

    Args:
        n: the number of training examples.
        batch_size: the global batch size.
        seed: the stream's seed.
        skip_batches: the first batches left out: the stream starts at batch
            `skip_batches`, computed, not replayed (the same time at any step).
        shard: `(worker, workers)`: this input pipeline's share, the
            `worker`-th contiguous `batch_size / workers` of every batch, so
            the workers' shares of a batch, in worker order, are the batch.
    """
    worker, workers = shard
    if batch_size % workers or not 0 <= worker < workers:
        raise ValueError(
            f"training_order: shard {shard} of batches of {batch_size}: the batch "
            "must divide evenly between the input pipelines."
        )
    steps = n // batch_size  # whole batches only
    if steps == 0:
        raise ValueError(
            f"training_order: {n} training examples do not fill one batch of {batch_size}."
        )
    width = batch_size // workers
    first_pass, first_step = divmod(skip_batches, steps)
    columns = tf.range(worker * width, (worker + 1) * width, dtype=tf.int64)

    def one_pass(p):
        order = tf.random.experimental.index_shuffle(
            tf.range(n, dtype=tf.int64),
            seed=tf.stack([tf.constant(seed, tf.int64), p]),
            max_index=n - 1,
        )
        start = tf.where(p == first_pass, tf.constant(first_step, tf.int64), 0)
        rows = tf.range(start, steps, dtype=tf.int64)
        # Element (row, column) of the pass's [steps, batch_size] grid.
        flat = tf.reshape(rows[:, None] * batch_size + columns[None, :], [-1])
        return tf.data.Dataset.from_tensor_slices((p * steps * batch_size + flat, tf.gather(order, flat)))

    return tf.data.Dataset.range(first_pass, 2**62).flat_map(one_pass)


def make_dataset(
    data: ImageSet,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    skip_batches: int = 0,
    *,
    resize: str = "resize",
    augment: augment_lib.Augment | None = None,
    one_hot: bool = False,
    sized: np.ndarray | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """A batched `tf.data.Dataset` of `(images, labels)`.

    Evaluation sets are one pass in order. Training sets are an endless stream
    of passes: pass `p` visits the images in a permutation drawn from
    `(seed, p)`, and each image is augmented from `(seed, position in the
    stream)` and each batch mixed from `(seed, batch index)`
    (`keras_ft.augment`). The stream is a pure function of the seed, so it is
    the same under any `tf.distribute` strategy, and `skip_batches` resumes it
    exactly where an interrupted run left off. Training drops nothing but
    never mixes passes inside a batch either: every step sees `batch_size`
    images.

    Args:
        data: the images and labels.
        image_size: the side S of the square images produced.
        batch_size: images per batch (global).
        training: the endless augmented stream, or one plain pass.
        seed: the stream's seed (training only).
        skip_batches: batches of the stream to skip (training only).
        resize: the `data.resize` policy (`resize_image`); training images
            use it too unless `augment.random_resized_crop` is on.
        augment: the training augmentation; None = `Augment()` (flips only).
            Evaluation takes none.
        one_hot: labels as float32 one-hot `[N, C]` rather than int32 `[N]`;
            required when `augment` mixes batches (soft labels).
        sized: `size_all(data, image_size, resize)`: every image already
            decoded and sized, read from memory instead of decoded again at
            every pass (the same values; not with `random_resized_crop`,
            which crops the original image).
        input_context: training only, for
            `strategy.distribute_datasets_from_function`: this input
            pipeline reads and decodes only its share of every batch
            (`training_order`'s `shard`), in batches of the per-replica size;
            the replicas' batches of a step make up the global batch (the
            same images as on one device). None = whole global batches.
    """
    check_resize(resize)
    if not training and augment is not None:
        raise ValueError("make_dataset: augment applies to training sets only.")
    augment = augment or augment_lib.Augment()
    if training and augment.mixes and not one_hot:
        raise ValueError("make_dataset: MixUp/CutMix make soft labels; pass one_hot=True.")
    kind = data.kind
    if sized is not None:
        if training and augment.random_resized_crop:
            raise ValueError("make_dataset: random_resized_crop needs the original images, not sized ones.")
        if sized.shape != (len(data), image_size, image_size, 3):
            raise ValueError(
                f"make_dataset: sized images have shape {sized.shape}, expected "
                f"{(len(data), image_size, image_size, 3)}."
            )
        sized = tf.constant(sized)
    shard, replica_batch = (0, 1), batch_size
    if input_context is not None:
        if not training:
            raise ValueError("make_dataset: input_context shards training streams only.")
        if augment.mixes and input_context.num_replicas_in_sync > 1:
            raise ValueError(
                "MixUp/CutMix mix the images of a whole global batch, which no replica "
                "reads under data.pipeline='stream': use data.pipeline='memory', or one "
                "replica, or set data.augment.mixup=0 and data.augment.cutmix=0."
            )
        shard = (input_context.input_pipeline_id, input_context.num_input_pipelines)
        replica_batch = input_context.get_per_replica_batch_size(batch_size)
    records = data.images if kind == RECORDS else None
    images = None if records else tf.constant(data.images)
    labels = tf.constant(data.labels)
    num_classes = len(data.class_names)

    def fetch(index):
        """The image at `index`: its path, encoded bytes or array."""
        if records is None:
            return images[index]
        blob = tf.numpy_function(records.read, [index], tf.string, stateful=False)
        return tf.ensure_shape(blob, [])

    def read_sized(index):
        """The image at the model's size (per `resize`) and its label."""
        if sized is not None:
            _, label = read(index, decode=False)
            return sized[index], label
        image, label = read(index)
        return resize_image(image, image_size, resize), label

    def read(index, decode=True):
        image = fetch(index) if decode else None
        if decode and kind == FILES:
            image = tf.io.read_file(image)
        if decode and kind != ARRAYS:
            image = decode_image(image)
        label = labels[index]
        return image, tf.one_hot(label, num_classes) if one_hot else label

    if not training:
        ds = tf.data.Dataset.range(len(data)).map(
            read_sized, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    pipeline = augment_lib.Pipeline(augment)
    ds = training_order(len(data), batch_size, seed, skip_batches, shard)

    def load_and_augment(position, index):
        if augment.random_resized_crop:
            image, label = read(index)
            image = resize_image(pipeline.crop(image, seed, position), image_size)
        else:
            image, label = read_sized(index)
        return position, pipeline.image(image, seed, position), label

    ds = ds.map(load_and_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(replica_batch, drop_remainder=True)
    if augment.mixes:
        # Batches start at multiples of batch_size (skips are whole batches).
        def mix(positions, x, y):
            return pipeline.mix(x, y, seed, positions[0] // batch_size)

        ds = ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(lambda positions, x, y: (x, y))
    return ds.prefetch(tf.data.AUTOTUNE)

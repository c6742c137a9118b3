"""Semantic segmentation data: images with per-pixel class masks.

A `SegSet` holds images and their masks (files, or arrays in memory) and the
class names; `load_seg_source` reads one from a source string and checks
every pair up front; `split_for_run` splits it by `keras_ft.data`'s rules;
`make_seg_dataset` turns it into a batched `tf.data` stream of `(images,
masks)` at the model's input size.

    folder:PATH   PATH/images/ and PATH/masks/, paired by file stem: image
                  `a.jpg` (.png, .jpg, .jpeg, .bmp) has mask `a.png`. Masks
                  are single-channel 8-bit PNGs of class indices (mode "L",
                  or a palette PNG, mode "P", whose indices are the
                  classes); `IGNORE_LABEL` (255) marks pixels no loss or
                  metric counts. Optional PATH/classes.txt: one class name a
                  line, line i naming class i. If PATH has `train/` and
                  `val/` (or `validation/`) folders, each with images/ and
                  masks/, they are the train/validation split.
    csv:PATH      a CSV with a header and the columns `image` and `mask`
                  (paths relative to the CSV's folder, or absolute).
    tfds:NAME     a prepared TensorFlow Datasets dataset with an image
                  feature and a mask feature (`TfdsOptions`), e.g.
                  oxford_iiit_pet (image, segmentation_mask). Masks are
                  read as stored (oxford_iiit_pet's are 1..3); the classes
                  come from `num_classes` or `TfdsOptions.class_names`.

Without class names, classes are "0".."K-1", K = `num_classes` or the
largest label in any mask + 1. Every problem is a ValueError of one line
naming the file and the fix; nothing is skipped.

Unlike image classification, `make_seg_dataset` decodes and sizes every
pair once and keeps them in memory (`size_seg_all`: N x S x S x 13 bytes),
which suits the small sets fine-tuning a segmenter on typically uses; there
is no streaming from disk.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import os
import re
import time
from typing import Mapping

import numpy as np
import tensorflow as tf
from PIL import Image

from keras_ft import augment as augment_lib, data as data_lib, headers, limits, tfds_source
from keras_ft.sources import own_split_folders

IGNORE_LABEL = 255  # mask pixels that count for no class
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
MASK_EXTENSION = ".png"
KINDS = ("folder", "csv", "tfds")
CLASSES_FILE = "classes.txt"
_DECODED = ("PNG", "JPEG", "BMP", "GIF")  # what data.decode_image reads
_MASK_MODES = ("L", "P")  # 8-bit, one channel: gray or palette indices


@dataclasses.dataclass
class SegSet:
    """Images with per-pixel class masks and the names of the classes.

    Attributes:
        images: a list of image file paths; a uint8 array `[N, H, W, 3]`; or
            an object array of N encoded images (`bytes`, as TFDS stores them).
        masks: in the same kind as `images`: mask file paths (PNG); a uint8
            array `[N, H, W]` of class indices; or N encoded PNGs.
        class_names: the pixel classes, in label order.
        val_mask: bool `[N]`: the source's own train/validation split (True =
            validation); None when `split_for_run` draws one by seed.
        names: for in-memory pairs, how messages name each one
            (`"oxford_iiit_pet train #12"`); None for files (the path names it).
        root: for files from a folder, that folder: links that leave it are
            not followed (`keras_ft.limits.read_regular`).

    Split it with `split_for_run` (this module), not `keras_ft.data`'s: those
    read `class_names` as per-image classes, each needing images of its own.
    """

    images: list[str] | np.ndarray
    masks: list[str] | np.ndarray
    class_names: list[str]
    val_mask: np.ndarray | None = None
    names: list[str] | None = None
    root: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        """int32 zeros `[N]`: every image is in one stratum, so a split by
        seed is a plain seeded split (`split_for_run`), and `per_class` counts
        images in all."""
        return np.zeros(len(self), np.int32)

    def subset(self, index: np.ndarray) -> "SegSet":
        index = np.asarray(index, np.int64)

        def take(items):
            return items[index] if isinstance(items, np.ndarray) else [items[i] for i in index]

        return SegSet(
            take(self.images),
            take(self.masks),
            self.class_names,
            None if self.val_mask is None else self.val_mask[index],
            None if self.names is None else take(self.names),
            self.root,
        )


@dataclasses.dataclass(frozen=True)
class TfdsOptions:
    """How a `tfds:NAME` source is read.

    Args:
        split: the TFDS split (spec) to train on, e.g. `train`, `train[:90%]`.
        val_split: the TFDS split to validate on ("" = a seeded share of `split`).
        data_dir: where prepared datasets live ("" = TFDS's default).
        download: download and prepare the dataset if it is not prepared.
        image_key, mask_key: the `Image` features holding the image and its mask.
        class_names: the classes, mask value i naming class i; () = "0".."K-1"
            with K = `num_classes` (TFDS masks carry no class names).
    """

    split: str = "train"
    val_split: str = ""
    data_dir: str = ""
    download: bool = False
    image_key: str = "image"
    mask_key: str = "segmentation_mask"
    class_names: tuple = ()


@dataclasses.dataclass
class SegReport:
    """What `load_seg_source` read and checked.

    Attributes:
        source: the source string.
        pairs: image/mask pairs.
        pixels: mask pixels per class name, over all masks, in label order.
        ignored_pixels: mask pixels of `IGNORE_LABEL`.
        seconds: time the reading and checking took.
    """

    source: str
    pairs: int
    pixels: dict[str, int]
    ignored_pixels: int
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """A readable summary, one string per line."""
        total = sum(self.pixels.values()) + self.ignored_pixels

        def share(n):
            return f"{n:,} ({100 * n / total:.1f}%)" if total else f"{n:,}"

        per_class = ", ".join(f"{name} {share(n)}" for name, n in self.pixels.items())
        lines = [
            f"Read {self.pairs:,} image/mask pairs in {len(self.pixels)} classes from "
            f"{self.source} ({self.seconds:.1f}s).",
            f"Mask pixels per class: {per_class}; ignored ({IGNORE_LABEL}): "
            f"{share(self.ignored_pixels)}.",
        ]
        absent = [name for name, n in self.pixels.items() if not n]
        if absent:
            lines.append(f"No mask has a pixel of class {', '.join(absent[:10])}.")
        return lines

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


# ------------------------------------------------------------------ sources


def load_seg_source(
    source: str, num_classes: int = 0, tfds_options: TfdsOptions | Mapping | None = None
) -> tuple[SegSet, SegReport]:
    """Reads and checks a segmentation source such as `folder:/data/pets`.

    Every pair is read once here: the image decoded, the mask read with PIL,
    their sizes compared and the mask values checked against the classes.

    Args:
        source: `KIND:ARGUMENT`, KIND one of `KINDS` (this module's docstring).
        num_classes: the number of classes K, mask values in [0, K) or
            `IGNORE_LABEL`; 0 = as many as classes.txt names, or the largest
            mask value + 1. Required for `tfds:` without class names.
        tfds_options: for `tfds:` sources, a `TfdsOptions` or a dict of its
            fields; None = the defaults.

    Returns:
        The pairs, and a `SegReport` of what was read.

    Raises:
        ValueError: an unknown source, or a pair a segmenter cannot train on;
            one line naming the file and the fix.
    """
    kind, sep, arg = source.partition(":")
    if not sep or kind not in KINDS or not arg:
        raise ValueError(
            f"Unknown segmentation data.source {source!r}. Use one of: "
            + ", ".join(f"{k}:..." for k in KINDS)
            + " (e.g. folder:/path/with/images_and_masks)."
        )
    start = time.monotonic()
    class_names = None
    if kind == "folder":
        data, class_names = _from_folder(arg)
    elif kind == "csv":
        data = _from_csv(arg)
    else:
        options = _tfds_options(tfds_options)
        data = _from_tfds(arg, options, num_classes)
        class_names = list(options.class_names) or None
    data, pixels = _check_pairs(data, source, num_classes, class_names)
    report = SegReport(
        source,
        len(data),
        dict(zip(data.class_names, pixels[: len(data.class_names)].tolist())),
        int(pixels[IGNORE_LABEL]),
        time.monotonic() - start,
    )
    return data, report


def _from_folder(path: str) -> tuple[SegSet, list[str] | None]:
    if not os.path.isdir(path):
        raise ValueError(f"Segmentation folder {path!r} does not exist or is not a folder.")
    class_names = _read_classes_file(os.path.join(path, CLASSES_FILE))
    split = own_split_folders(path)
    if split is None:
        images, masks = _pairs_in(path)
        return SegSet(images, masks, [], root=path), class_names
    train_images, train_masks = _pairs_in(split[0])
    val_images, val_masks = _pairs_in(split[1])
    n = len(train_images) + len(val_images)
    data = SegSet(
        train_images + val_images,
        train_masks + val_masks,
        [],
        val_mask=np.arange(n) >= len(train_images),
        root=path,
    )
    return data, class_names


def _pairs_in(path: str) -> tuple[list[str], list[str]]:
    """The `(images, masks)` of `path/images/` and `path/masks/`, paired by
    file stem, in sorted order of the stems."""
    image_dir, mask_dir = os.path.join(path, "images"), os.path.join(path, "masks")
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise ValueError(
                f"Segmentation folder {path!r} has no {os.path.basename(folder)}/ folder: "
                f"put the images in {image_dir} and their masks (PNGs of class "
                f"indices, same file stem) in {mask_dir}."
            )
    images = _by_stem(image_dir, IMAGE_EXTENSIONS, "Images")
    masks = _by_stem(mask_dir, (MASK_EXTENSION,), "Masks")
    if not images:
        raise ValueError(
            f"Image folder {image_dir!r} has no image files ({', '.join(IMAGE_EXTENSIONS)}); "
            "add images and their masks."
        )
    orphans = sorted(masks.keys() - images.keys())
    if orphans:
        stem = orphans[0]
        raise ValueError(
            f"Mask {masks[stem]} has no image {stem}.* ({', '.join(IMAGE_EXTENSIONS)}) "
            f"in {image_dir}: add the image, or remove the mask."
        )
    unmasked = sorted(images.keys() - masks.keys())
    if unmasked:
        stem = unmasked[0]
        raise ValueError(
            f"Image {images[stem]} has no mask {os.path.join(mask_dir, stem + MASK_EXTENSION)}: "
            "add its mask (a PNG of class indices), or remove the image."
        )
    stems = sorted(images)
    return [images[s] for s in stems], [masks[s] for s in stems]


def _by_stem(folder: str, extensions: tuple, what: str) -> dict[str, str]:
    """`{stem: path}` of the files in `folder` (not below it) with one of
    `extensions`; hidden files skipped, two files of one stem an error."""
    found = {}
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or os.path.isdir(full):
            continue
        if ext.lower() not in extensions:
            if what == "Masks" and ext.lower() in IMAGE_EXTENSIONS + (".gif", ".webp", ".tif"):
                raise ValueError(
                    f"Mask {full} is not a PNG: save masks as PNG (lossy formats "
                    "such as JPEG change the class indices)."
                )
            continue
        if stem in found:
            raise ValueError(
                f"{what} {found[stem]} and {full} share the stem {stem!r}: a stem names "
                "one pair; rename or remove one."
            )
        found[stem] = full
    return found


def _read_classes_file(path: str) -> list[str] | None:
    """The class names of a classes.txt, one a line; None if there is none."""
    if not os.path.exists(path):
        return None
    try:
        text = limits.read_regular(path, max_bytes=2**20).decode("utf-8-sig")
    except limits.Refused as e:
        raise ValueError(f"{path}: {e.reason}; make it a text file of class names.") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8.") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    for line, name in enumerate(names, 1):
        if not name:
            raise ValueError(
                f"{path} line {line} is empty: give one class name a line, line i "
                "naming class i (mask value i-1)."
            )
        if names.index(name) != line - 1:
            raise ValueError(
                f"{path} lines {names.index(name) + 1} and {line} both name {name!r}: "
                "name each class once."
            )
    return names


def _from_csv(path: str) -> SegSet:
    if not os.path.isfile(path):
        raise ValueError(f"CSV file {path!r} does not exist or is not a file.")
    base = os.path.dirname(os.path.abspath(path))
    images, masks, first_line = [], [], {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
        reader = csv.reader(f, strict=True)
        try:
            header = [c.strip() for c in next(reader, [])]
            missing = [c for c in ("image", "mask") if header.count(c) != 1]
            if missing:
                raise ValueError(
                    f"{path} line 1: the header {','.join(header)!r} needs one "
                    f"{' and one '.join(repr(c) for c in missing)} column; the first "
                    "line must name the columns, e.g. `image,mask`."
                )
            image_at, mask_at = header.index("image"), header.index("mask")
            for fields in reader:
                line = reader.line_num
                if not any(field.strip() for field in fields):
                    continue
                if len(fields) != len(header):
                    raise ValueError(
                        f"{path} line {line}: {len(fields)} field(s) but the header "
                        f"has {len(header)}; quote fields that contain commas."
                    )
                pair = []
                for column, at in (("image", image_at), ("mask", mask_at)):
                    file = fields[at].strip()
                    full = os.path.normpath(os.path.join(base, file))  # `file` if absolute
                    if not file or not os.path.exists(full):
                        raise ValueError(
                            f"{path} line {line}: {column} {file!r} does not exist"
                            + (f" (-> {full}); relative paths are read from the CSV's "
                               f"folder {base}." if file else "; give its file.")
                        )
                    pair.append(full)
                if pair[0] in first_line:
                    raise ValueError(
                        f"{path} lines {first_line[pair[0]]} and {line} both list the image "
                        f"{pair[0]}: list each pair once (a copy could land in both the "
                        "training and the validation split)."
                    )
                first_line[pair[0]] = line
                images.append(pair[0])
                masks.append(pair[1])
        except csv.Error as e:
            raise ValueError(f"{path} line {reader.line_num}: {e}; check its quotes.") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8.") from None
    if not images:
        raise ValueError(f"{path} has a header but no rows: add one `image,mask` line per pair.")
    return SegSet(images, masks, [])


def _tfds_options(options) -> TfdsOptions:
    if options is None or isinstance(options, TfdsOptions):
        return options or TfdsOptions()
    fields = [f.name for f in dataclasses.fields(TfdsOptions)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown tfds option {unknown[0]!r}. Choose from: {', '.join(fields)}."
        )
    return TfdsOptions(**options)


def _from_tfds(name: str, options: TfdsOptions, num_classes: int) -> SegSet:
    """The pairs of a TFDS dataset, held in memory as stored (encoded)."""
    if options.val_split == options.split:
        raise ValueError(
            f"TFDS dataset {name!r}: val_split is split ({options.split!r}); validate on "
            "another split (e.g. validation, test) or on a seeded share of this one (val_split='')."
        )
    import tensorflow_datasets as tfds  # slow to import: only for tfds: sources

    try:
        builder = tfds.builder(name, data_dir=os.path.expanduser(options.data_dir) or None)
    except tfds.core.registered.DatasetNotFoundError:
        known = sorted(set(tfds.list_builders()))
        close = difflib.get_close_matches(re.split("[/:]", name)[0], known, 3)
        hint = f"did you mean {', '.join(close)}?" if close else "tfds.list_builders() lists them."
        raise ValueError(f"Unknown TFDS dataset {name!r}: {hint}") from None
    except (ValueError, AssertionError) as e:  # an unknown config or version
        raise ValueError(f"TFDS dataset {name!r}: {tfds_source._one_line(e)}") from None
    if not num_classes and not options.class_names:
        raise ValueError(
            f"TFDS dataset {name!r}: its masks name no classes; set num_classes "
            "(mask values 0..K-1) or the tfds class_names."
        )
    features = builder.info.features
    for key, config_key in ((options.image_key, "image_key"), (options.mask_key, "mask_key")):
        tfds_source._check_feature(
            name, features, key, tfds.features.Image, f"data.tfds.{config_key}"
        )
    tfds_source._prepare(builder, name, options.download)

    images, masks, names = _read_tfds_split(builder, name, options.split, options)
    num_train = len(images)
    if options.val_split:
        more = _read_tfds_split(builder, name, options.val_split, options)
        images, masks, names = images + more[0], masks + more[1], names + more[2]
    encoded_images, encoded_masks = np.empty(len(images), object), np.empty(len(masks), object)
    encoded_images[:], encoded_masks[:] = images, masks  # object arrays: no padding
    return SegSet(
        encoded_images,
        encoded_masks,
        [],
        val_mask=np.arange(len(images)) >= num_train if options.val_split else None,
        names=names,
    )


def _read_tfds_split(builder, name: str, spec: str, options: TfdsOptions):
    """`(encoded images, encoded masks, names)` of one split, in stored order."""
    import tensorflow_datasets as tfds

    keys = (options.image_key, options.mask_key)
    read = tfds.decode.PartialDecoding(
        {key: True for key in keys}, decoders={key: tfds.decode.SkipDecoding() for key in keys}
    )
    try:
        ds = builder.as_dataset(split=spec, decoders=read, shuffle_files=False)
    except ValueError as e:  # an unknown split or a bad slice
        raise ValueError(
            f"TFDS dataset {name!r}, split {spec!r}: {tfds_source._one_line(e)}"
        ) from None
    images, masks = [], []
    ds = ds.map(lambda ex: (ex[keys[0]], ex[keys[1]])).batch(256)
    for image_blobs, mask_blobs in tfds.as_numpy(ds):
        images += list(image_blobs)
        masks += list(mask_blobs)
    if not images:
        raise ValueError(f"TFDS dataset {name!r}, split {spec!r}: the split has no examples.")
    return images, masks, [f"{builder.name} {spec} #{i}" for i in range(len(images))]


# -------------------------------------------------------------- the checks


def _check_pairs(
    data: SegSet, source: str, num_classes: int, class_names: list[str] | None
) -> tuple[SegSet, np.ndarray]:
    """`data` with its class names, and the mask pixels per value `[256]`.

    Reads every pair: problems with one pair (unreadable, not a PNG mask,
    sizes differ) are found for all pairs, then the first is raised, with
    how many pairs have one; then mask values are checked against the classes.
    """
    if num_classes and class_names and num_classes != len(class_names):
        raise ValueError(
            f"{source}: num_classes={num_classes} but {_names_source(source)} names "
            f"{len(class_names)} classes ({', '.join(class_names[:10])}); fix one "
            "(num_classes=0 takes the names' count)."
        )
    counts = np.zeros((len(data), 256), np.int64)
    problems = []
    for i in range(len(data)):
        try:
            height, width = _decoded_image(data, i).shape[:2]
            mask = _decoded_mask(data, i)
            if mask.shape != (height, width):
                raise ValueError(
                    f"Image {_name(data, i, 'image')} is {width}x{height} (width x height) "
                    f"but its mask {_name(data, i, 'mask')} is {mask.shape[1]}x{mask.shape[0]}: "
                    "save each mask at its image's size."
                )
            counts[i] = np.bincount(mask.ravel(), minlength=256)
        except ValueError as e:
            problems.append(str(e))
    _raise_first(problems)

    used = np.flatnonzero(counts[:, :IGNORE_LABEL].sum(0))
    k = num_classes or (len(class_names) if class_names else int(used.max(initial=0)) + 1)
    if not 2 <= k <= IGNORE_LABEL:
        raise ValueError(
            f"{source}: {k} class(es) (num_classes, {CLASSES_FILE} or the largest mask "
            f"value + 1); a segmenter needs 2 to {IGNORE_LABEL} ({IGNORE_LABEL} = ignore)."
        )
    for i in range(len(data)):
        bad = np.flatnonzero(counts[i, k:IGNORE_LABEL])
        if len(bad):
            values = ", ".join(str(v + k) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
            problems.append(
                f"Mask {_name(data, i, 'mask')} has value(s) {values} outside the classes "
                f"0..{k - 1} ({_classes_source(num_classes, class_names, source)}) other than "
                f"{IGNORE_LABEL} (ignore): fix the mask, or the number of classes."
            )
    _raise_first(problems)
    names = class_names or [str(c) for c in range(k)]
    return dataclasses.replace(data, class_names=list(names)), counts.sum(0)


def _raise_first(problems: list[str]) -> None:
    if problems:
        more = f" ({len(problems) - 1} more pair(s) have problems too.)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


def _names_source(source: str) -> str:
    return CLASSES_FILE if source.startswith("folder:") else "class_names"


def _classes_source(num_classes: int, class_names, source: str) -> str:
    if num_classes:
        return f"num_classes={num_classes}"
    return f"{_names_source(source)} names {len(class_names)}"


def _name(data: SegSet, i: int, what: str) -> str:
    """How messages name the image or mask of pair `i`."""
    items = data.images if what == "image" else data.masks
    if not isinstance(items, np.ndarray):
        return items[i]
    return f"{data.names[i] if data.names else f'pair #{i}'} ({what})"


def _blob(data: SegSet, i: int, what: str) -> bytes:
    """The encoded bytes of pair `i`'s image or mask (files read safely)."""
    items = data.images if what == "image" else data.masks
    if isinstance(items, np.ndarray):
        return items[i]
    try:
        return limits.read_regular(items[i], data.root)
    except limits.Refused as e:
        raise ValueError(
            f"{what.capitalize()} {items[i]}: {e.reason}; fix or remove the pair."
        ) from None


def _decoded_image(data: SegSet, i: int) -> np.ndarray:
    """uint8 `[H, W, 3]`, decoded as training decodes it (`data.decode_image`)."""
    if isinstance(data.images, np.ndarray) and data.images.dtype != object:
        return data.images[i]
    blob = _blob(data, i, "image")
    kind = headers.sniff(blob)
    if kind not in _DECODED:
        found = kind or limits.file_type(blob)
        raise ValueError(
            f"Image {_name(data, i, 'image')} is not an image TensorFlow decodes ({found}); "
            "save it as PNG, JPEG or BMP, or remove the pair."
        )
    try:
        return data_lib.decode_image(tf.constant(blob)).numpy()
    except tf.errors.OpError as e:
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", " ".join(e.message.split())).strip()
        raise ValueError(
            f"Image {_name(data, i, 'image')} cannot be decoded ({reason[:200]}); "
            "fix or remove the pair."
        ) from None


def _decoded_mask(data: SegSet, i: int) -> np.ndarray:
    """uint8 `[H, W]` class indices, read with PIL (a palette PNG's indices)."""
    if isinstance(data.masks, np.ndarray) and data.masks.dtype != object:
        return data.masks[i]
    where = _name(data, i, "mask")
    try:
        with Image.open(io.BytesIO(_blob(data, i, "mask"))) as mask:
            if mask.format != "PNG":
                raise ValueError(
                    f"Mask {where} is {mask.format or 'not an image'}, not a PNG: save masks "
                    "as PNG (lossy formats such as JPEG change the class indices)."
                )
            if mask.mode not in _MASK_MODES:
                raise ValueError(
                    f"Mask {where} has mode {mask.mode!r}, not single-channel 8-bit: save "
                    "the class indices (0, 1, ...; 255 = ignore) as one 8-bit channel "
                    "(mode L, or a palette PNG), not colours or 16-bit values."
                )
            if mask.width * mask.height > limits.MAX_PIXELS:
                raise ValueError(
                    f"Mask {where} has {mask.width}x{mask.height} pixels, more than "
                    f"{limits.MAX_PIXELS:,}: use smaller images and masks."
                )
            return np.array(mask, np.uint8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's kinds of broken file
        raise ValueError(f"Mask {where} cannot be read ({e}); fix or remove the pair.") from None


# ---------------------------------------------------------------- the split


@dataclasses.dataclass
class _Positions:
    """What `keras_ft.data`'s split functions see of a `SegSet`: its
    positions, all in one stratum (a SegSet's `class_names` are pixel
    classes, which those functions would take for per-image classes)."""

    index: np.ndarray
    val_mask: np.ndarray | None = None
    class_names = ("all images",)  # one stratum (a class attribute, not a field)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return np.zeros(len(self.index), np.int32)

    def subset(self, index) -> "_Positions":
        index = np.asarray(index, np.int64)
        return _Positions(self.index[index], None if self.val_mask is None else self.val_mask[index])


def split_for_run(data: SegSet, data_spec, seed: int) -> tuple[SegSet, SegSet]:
    """`(train, val)` pairs: `keras_ft.data.split_for_run`'s rules, unchanged.

    The source's own split if it has one, else a plain seeded split by
    `data_spec.val_fraction`; then `data_spec.train_per_class` training
    pairs in all, if set. The same data and seed give the split a
    classification set of one class would get.
    """
    positions = _Positions(np.arange(len(data)), data.val_mask)
    train, val = data_lib.split_for_run(positions, data_spec, seed)
    return (
        dataclasses.replace(data.subset(train.index), val_mask=None),
        dataclasses.replace(data.subset(val.index), val_mask=None),
    )


# ---------------------------------------------------------------- tf.data


def resize_mask(mask: tf.Tensor, image_size: int) -> tf.Tensor:
    """Brings uint8 class indices `[..., H, W]` to `[..., S, S]` by nearest
    neighbour (no antialiasing): every value is one of the mask's, never a
    blend of two classes. Pixel centres line up with `data.resize_image`'s."""
    mask = tf.convert_to_tensor(mask)
    resized = tf.image.resize(mask[..., None], (image_size, image_size), method="nearest")
    return resized[..., 0]


def size_seg_all(data: SegSet, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair decoded and sized once: float32 images `[N, S, S, 3]` in
    [0, 255] (`data.resize_image`, policy "resize") and uint8 masks
    `[N, S, S]` (`resize_mask`). Needs N x S x S x 13 bytes of memory."""
    n = len(data)
    images = np.zeros((n, image_size, image_size, 3), np.float32)
    masks = np.zeros((n, image_size, image_size), np.uint8)
    for i in range(n):
        images[i] = data_lib.resize_image(_decoded_image(data, i), image_size, "resize").numpy()
        masks[i] = resize_mask(_decoded_mask(data, i), image_size).numpy()
    return images, masks


def _joint_flip(image: tf.Tensor, mask: tf.Tensor, seed, position) -> tuple[tf.Tensor, tf.Tensor]:
    """Image `[S, S, 3]` and mask `[S, S]` flipped left-right together, with
    probability 1/2 from `(seed, position)`: the draw that
    `tf.image.stateless_random_flip_left_right` makes (`keras_ft.augment`'s
    flip), so a segmentation image flips where a classification one would."""
    coin = tf.random.stateless_uniform([], seed=augment_lib.element_seed(seed, position))
    flip = coin < 0.5
    return tf.where(flip, image[:, ::-1], image), tf.where(flip, mask[:, ::-1], mask)


def make_seg_dataset(
    data: SegSet,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    skip_batches: int = 0,
    flip: bool = True,
    *,
    sized: tuple[np.ndarray, np.ndarray] | None = None,
) -> tf.data.Dataset:
    """A batched `tf.data.Dataset` of `(images, masks)`.

    Images are float32 `[B, S, S, 3]` in [0, 255], masks int32 `[B, S, S]`
    (class indices, `IGNORE_LABEL` kept). Every pair is decoded and sized
    once, up front, and held in memory (`size_seg_all`).

    Evaluation is one pass in order, not augmented. Training is the endless
    stream of `keras_ft.data.training_order` (pass `p` a permutation drawn
    from `(seed, p)`, whole batches only), each pair flipped left-right,
    image and mask together, with probability 1/2 drawn from `(seed,
    position)`: the stream is a pure function of the seed, and
    `skip_batches` resumes it exactly.

    Args:
        data: the pairs.
        image_size: the side S of the square images and masks.
        batch_size: pairs per batch (global).
        training: the endless augmented stream, or one plain pass.
        seed: the stream's seed (training only).
        skip_batches: batches of the stream to skip (training only).
        flip: the joint random flip (training only).
        sized: `size_seg_all(data, image_size)`, to reuse it across streams.
    """
    if training and len(data) < batch_size:  # training_order would yield nothing, forever
        raise ValueError(
            f"make_seg_dataset: batch_size {batch_size} is more than the {len(data)} training "
            "pairs; lower the batch size or add pairs."
        )
    if sized is None:
        sized = size_seg_all(data, image_size)
    expected = ((len(data), image_size, image_size, 3), (len(data), image_size, image_size))
    if (sized[0].shape, sized[1].shape) != expected:
        raise ValueError(
            f"make_seg_dataset: sized pairs have shapes {sized[0].shape} and "
            f"{sized[1].shape}, expected {expected[0]} and {expected[1]}."
        )
    images, masks = tf.constant(sized[0]), tf.constant(sized[1])

    if not training:
        ds = tf.data.Dataset.range(len(data)).map(
            lambda i: (images[i], tf.cast(masks[i], tf.int32)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def load(position, index):
        image, mask = images[index], masks[index]
        if flip:
            image, mask = _joint_flip(image, mask, seed, position)
        return image, tf.cast(mask, tf.int32)

    ds = data_lib.training_order(len(data), batch_size, seed, skip_batches)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

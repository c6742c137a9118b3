"""A scan of the training data before training: bad data never crashes an epoch.

`scan` checks every image file once, up front, so that a truncated JPEG or a
text file named `.jpg` is found before the first step instead of halfway
through an epoch, and is either skipped and listed (`policy="skip"`) or
stops the run with the list (`policy="fail"`). Nothing is dropped silently:
every skipped file is in the `Report` with its reason.

Per file it first looks at the path, never trusting it
(`keras_ft.limits.read_regular`): only regular files of at most
`max_file_bytes` are opened, links only if they stay inside the data folder,
and a file's first bytes are read to identify it before the rest. FIFOs,
devices, folders reached through links, links leaving the folder and link
loops are bad files; so is one file reached under two classes through links.
Then it checks, in this order: empty file; format by magic bytes (not by
extension; a non-image is named by its type, "HTML", "text", never by its
content); formats recognised but not supported here (WebP, TIFF,
HEIC/AVIF, ...); the header (width, height, channels, bit depth, read
WITHOUT decoding, so a decompression bomb is refused before it is decoded;
for a GIF every frame counts); a missing end marker (PNG `IEND`, JPEG
`FFD9`: a cut file); then a real `tf.io.decode_image` of what is left. Grayscale, alpha, CMYK and 16-bit
images are fine (`data.decode_image` makes them 3-channel 8-bit) and
are only counted.

Encoded images held in memory (a `tfds:` source) get the same checks as
files: TFDS stores an image file's bytes as they were, broken or not.

Label checks (the only ones for decoded in-memory arrays): labels within the
class names, `num_classes` agreeing with the data, at least 2 classes, no
class left without images. Per-class counts are always reported;
`class_weights` gives inverse-frequency weights for imbalanced data.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import struct
import time

import numpy as np
import tensorflow as tf

from keras_ft import data, headers, limits, progress

POLICIES = ("skip", "fail")

# Kinds of bad file, in the order the summary lists them.
EMPTY = "empty"
NOT_IMAGE = "not an image"
UNSUPPORTED = "unsupported format"
TOO_LARGE = "too large"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
UNREADABLE = "unreadable"
NOT_REGULAR = "not a regular file"
LINK = "link"
TWO_LABELS = "duplicate"
BAD_KINDS = (EMPTY, TRUNCATED, CORRUPT, NOT_IMAGE, UNSUPPORTED, TOO_LARGE, UNREADABLE,
             NOT_REGULAR, LINK, TWO_LABELS)
PREFIX_BYTES = limits.PREFIX_BYTES

# Kinds of image that decode fine but are converted to 3-channel 8-bit.
CONVERTED_KINDS = ("grayscale", "alpha", "CMYK", "16-bit")


@dataclasses.dataclass
class Report:
    """What `scan` found.

    Attributes:
        num_scanned: files (or in-memory images) looked at.
        class_names: the class names, in label order.
        counts: usable images per class name (after skipping), in label order.
        bad_files: `(path, reason)` for every bad file, in input order.
        bad_by_kind: number of bad files per kind (`truncated`, ...).
        converted: images per kind (`grayscale`, `alpha`, `CMYK`, `16-bit`)
            that are usable but converted to 3-channel 8-bit when decoded; one
            image can count under two kinds (16-bit grayscale). Also JPEGs
            whose EXIF orientation is ignored (`headers.EXIF_ROTATED`).
        seconds: time the scan took.
        unscanned: why the images were not scanned ("" = they were).
    """

    num_scanned: int
    class_names: list[str]
    counts: dict[str, int]
    bad_files: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    bad_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    converted: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    unscanned: str = ""

    def lines(self, max_listed: int = 20) -> list[str]:
        """A readable summary, one string per line."""
        n_bad = len(self.bad_files)
        head = (
            f"Scanned {self.num_scanned:,} files in {len(self.class_names)} classes"
            if not self.unscanned else
            f"{self.num_scanned:,} images in {len(self.class_names)} classes, not scanned "
            f"({self.unscanned})"
        )
        if n_bad:
            kinds = ", ".join(
                f"{n} {k}" for k, n in _ordered(self.bad_by_kind, BAD_KINDS)
            )
            listed = ", ".join(
                f"{_short(p)} ({r})" for p, r in self.bad_files[:3]
            )
            more = ", ..." if n_bad > 3 else ""
            head += f": {n_bad:,} skipped ({kinds}): {listed}{more}"
        elif not self.unscanned:
            head += ": no bad files"
        lines = [head + "."]
        for path, reason in self.bad_files[:max_listed]:
            lines.append(f"  skipped {path}: {reason}")
        if n_bad > max_listed:
            lines.append(f"  ... and {n_bad - max_listed:,} more (see the JSON report).")
        per_class = ", ".join(f"{name} {n:,}" for name, n in self.counts.items())
        sizes = [n for n in self.counts.values() if n]
        imbalance = (
            f" (largest/smallest {max(sizes) / min(sizes):.1f}x)"
            if sizes and max(sizes) > min(sizes)
            else ""
        )
        lines.append(f"Images per class: {per_class}{imbalance}.")
        kinds = ", ".join(f"{n:,} {k}" for k, n in _ordered(self.converted, CONVERTED_KINDS))
        if kinds:
            lines.append(f"Converted to 3-channel 8-bit when decoded: {kinds}.")
        rotated = self.converted.get(headers.EXIF_ROTATED)
        if rotated:
            lines.append(
                f"{rotated:,} JPEG(s) have an EXIF orientation, ignored here as in evaluation "
                "and serving: they train as stored (rotate the files to change that)."
            )
        return lines

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["bad_files"] = [{"path": p, "reason": r} for p, r in self.bad_files]
        return json.dumps(d, indent=2)


def scan(
    images: data.ImageSet,
    policy: str = "skip",
    max_pixels: int = limits.MAX_PIXELS,
    num_classes: int | None = None,
    max_file_bytes: int = limits.MAX_FILE_BYTES,
) -> tuple[data.ImageSet, Report]:
    """Checks every image and label before training.

    Args:
        images: the data: file paths, encoded images, or decoded arrays.
        policy: `"skip"` drops bad files (each listed in the report) and
            returns the rest; `"fail"` raises on the first scan with any bad
            file, listing them.
        max_pixels: images whose headers claim more pixels (frames x width
            x height) are refused without being decoded.
        num_classes: the number of classes the model is built for, if known;
            it must match the data's class names.
        max_file_bytes: larger files are refused without being read.

    Returns:
        The usable images (the input itself when nothing was dropped) and a
        `Report`.

    Raises:
        ValueError: an unknown policy, bad files under `policy="fail"`, or
            labels/classes a classifier cannot train on (each message names
            the class or the numbers involved).
    """
    if policy not in POLICIES:
        raise ValueError(
            f"Unknown bad-file policy {policy!r}. Choose one of: {', '.join(POLICIES)}."
        )
    _check_labels(images, num_classes)
    start = time.monotonic()
    names = images.class_names
    if images.kind in (data.ARRAYS, data.RECORDS):
        # Arrays are decoded already; records were checked when packed (or
        # prepared by TFDS), and reading them all would defeat reading by
        # index: a record that fails to decode stops the run, named.
        counts = np.bincount(images.labels, minlength=len(names))
        report = Report(len(images), list(names), dict(zip(names, counts.tolist())),
                        unscanned=("" if images.kind == data.ARRAYS else
                                   f"{images.images.store.describe()}, checked when written"))
        _check_no_empty_class(report, images)
        report.seconds = time.monotonic() - start
        return images, report

    if images.kind == data.FILES:
        paths = list(images.images)
        results = _check_files(paths, max_pixels, images.root, max_file_bytes)
        _refuse_second_paths(images, results)
    else:  # encoded bytes, named for the report
        paths = images.names or [f"image #{i}" for i in range(len(images))]
        results = _check_files(list(images.images), max_pixels, None, max_file_bytes)
    bad_files, bad_by_kind = [], collections.Counter()
    converted = collections.Counter()
    keep = []
    for i, (path, (kind, reason, conversions)) in enumerate(zip(paths, results)):
        if kind is None:
            keep.append(i)
            converted.update(conversions)
        else:
            bad_files.append((path, reason))
            bad_by_kind[kind] += 1
    if bad_files and policy == "fail":
        listed = "; ".join(f"{p} ({r})" for p, r in bad_files[:3])
        more = f"; and {len(bad_files) - 3} more" if len(bad_files) > 3 else ""
        raise ValueError(
            f"{len(bad_files)} bad image file(s) of {len(paths)}: {listed}{more}. "
            "Fix or remove them, or pass --config.data.bad_files=skip to skip them."
        )
    kept = images if not bad_files else images.subset(np.asarray(keep, np.int64))
    counts = np.bincount(kept.labels, minlength=len(names))
    report = Report(
        num_scanned=len(paths),
        class_names=list(names),
        counts=dict(zip(names, counts.tolist())),
        bad_files=bad_files,
        bad_by_kind=dict(bad_by_kind),
        converted=dict(converted),
    )
    _check_no_empty_class(report, images)
    report.seconds = time.monotonic() - start
    return kept, report


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency class weights, for `model.fit(class_weight=...)`.

    Weight `c` is `N / (num_classes * n_c)`: proportional to `1 / n_c` and
    normalised so that the mean weight over the N training images is 1 (the
    loss keeps its scale, so the learning rate needs no change). On balanced
    data every weight is 1.

    Raises:
        ValueError: a class has no images (its weight would be infinite).
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(
            f"Labels go up to {labels.max()} but num_classes={num_classes}."
        )
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(
            f"Class {int(empty[0])} has no images; class weights need every class."
        )
    weights = len(labels) / (num_classes * counts)
    return {c: float(w) for c, w in enumerate(weights)}


# ------------------------------------------------------------------ labels


def _check_labels(images: data.ImageSet, num_classes: int | None) -> None:
    names = images.class_names
    if num_classes is not None and num_classes != len(names):
        raise ValueError(
            f"num_classes={num_classes} but the data has {len(names)} classes "
            f"({', '.join(names[:10])})."
        )
    labels = np.asarray(images.labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(
            f"Labels must be in [0, {len(names)}) for {len(names)} classes, "
            f"got labels from {labels.min()} to {labels.max()}."
        )
    if len(names) < 2:
        raise ValueError(
            f"The data has a single class ({', '.join(map(repr, names))}); "
            "a classifier needs at least 2."
        )


def _check_no_empty_class(report: Report, images: data.ImageSet) -> None:
    for label, (name, n) in enumerate(report.counts.items()):
        if n:
            continue
        total = int(np.sum(images.labels == label))
        why = (
            f"all {total} of its files are bad (see the scan report)"
            if total
            else "no images"
        )
        raise ValueError(f"Class {name!r} has no usable images: {why}.")


# ------------------------------------------------------------------- files


def _check_files(
    paths: list[str] | list[bytes], max_pixels: int, root: str | None, max_file_bytes: int
) -> list[tuple[str | None, str, tuple[str, ...]]]:
    """`(bad kind or None, reason, conversions)` per file path or encoded image."""
    results = [None] * len(paths)
    workers = min(16, os.cpu_count() or 1)
    shown = progress.Counter(len(paths), "Scanning images", "files")
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {
            pool.submit(_check_file, p, max_pixels, root, max_file_bytes): i
            for i, p in enumerate(paths)
        }
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[future]] = future.result()
            shown.update(done)
    shown.close()
    return results


def _refuse_second_paths(images: data.ImageSet, results: list) -> None:
    """Marks files reached by a second path (a link): under another class, every
    path to the file is bad (it would train as one and validate as the
    other); under the same class, every path but the first."""
    by_file = collections.defaultdict(list)
    for i, path in enumerate(images.images):
        if results[i][0] is None:
            by_file[os.path.realpath(path)].append(i)
    names = images.class_names
    for index in by_file.values():
        labels = sorted({int(images.labels[i]) for i in index})
        if len(labels) > 1:
            classes = ", ".join(names[label] for label in labels)
            reason = f"one file under {len(labels)} classes ({classes}), through links"
            for i in index:
                results[i] = (TWO_LABELS, reason, ())
        for i in index[1:] if len(labels) == 1 else ():
            first = images.images[index[0]]
            shown = os.path.relpath(first, images.root) if images.root else first
            results[i] = (TWO_LABELS, f"the same file as {shown}, through a link", ())


def _check_file(path: str | bytes, max_pixels: int, root: str | None, max_file_bytes: int):
    if isinstance(path, bytes):
        blob = path
    else:
        try:
            blob = limits.read_regular(
                path, root, max_file_bytes, whole=lambda prefix: headers.sniff(prefix) is not None
            )
        except limits.Refused as e:
            return e.kind, e.reason, ()
    if not blob:
        return EMPTY, "empty file (0 bytes)", ()
    fmt = headers.sniff(blob)
    if fmt is None:
        return NOT_IMAGE, f"not an image ({limits.file_type(blob)})", ()
    if fmt not in headers.HEADERS:
        return UNSUPPORTED, f"unsupported format {fmt} (use JPEG, PNG, BMP or GIF)", ()
    try:
        width, height, conversions = headers.HEADERS[fmt](blob)
    except (struct.error, ValueError, IndexError) as e:
        return TRUNCATED, f"truncated {fmt} (bad header: {e})", ()
    if width <= 0 or height <= 0:
        return CORRUPT, f"corrupt {fmt} (header says {width}x{height})", ()
    if width * height > max_pixels:
        return (
            TOO_LARGE,
            f"too large: {width}x{height} = {width * height:,} pixels "
            f"> max_pixels {max_pixels:,}",
            (),
        )
    if fmt == "GIF":  # the decoder holds every frame, each of its own size
        pixels = int(limits.count_pixels(tf.constant(blob)))
        if pixels > max_pixels:
            return (
                TOO_LARGE,
                f"too large: {width}x{height} GIF whose frames total {pixels:,} pixels "
                f"> max_pixels {max_pixels:,}",
                (),
            )
    if fmt == "PNG" and b"IEND" not in blob[-64:]:
        return TRUNCATED, "truncated PNG (no IEND chunk at the end)", ()
    if fmt == "JPEG" and b"\xff\xd9" not in blob[-64:]:
        return TRUNCATED, "truncated JPEG (no FFD9 end marker)", ()
    try:
        image = tf.io.decode_image(blob, channels=3, expand_animations=False)
    except tf.errors.OpError as e:
        first = e.message.splitlines()[0][:80]
        return CORRUPT, f"corrupt {fmt} (cannot be decoded: {first})", ()
    if image.shape[0] != height or image.shape[1] != width:
        return (
            CORRUPT,
            f"corrupt {fmt} (header says {width}x{height}, "
            f"decodes to {image.shape[1]}x{image.shape[0]})",
            (),
        )
    return None, "", conversions


# -------------------------------------------------------------------- misc


def _short(path: str) -> str:
    """`class/file.jpg`: enough to find a file in a one-folder-per-class tree."""
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def _ordered(counts: dict[str, int], order: tuple[str, ...]):
    return [(k, counts[k]) for k in order if counts.get(k)]

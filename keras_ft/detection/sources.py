"""Object-detection annotations (COCO, Pascal VOC, YOLO), read and checked.

`load_det_source` reads a source string into a `DetSet` and a `DetReport`;
`split_for_run` splits it by `keras_ft.data`'s rules. Every image is decoded
and every box checked once, up front: a misread format fails here, naming
the file and line, not later as a model that learns nothing.

    coco:IMAGES,ANN.json  COCO JSON: `images` (id, file_name, width, height),
                 `annotations` (image_id, category_id, bbox [x, y, w, h] in
                 pixels, optional iscrowd), `categories` (id, name); class i
                 is the i-th category by id. ANN.json's images and the image
                 files in IMAGES must be the same set.
                 `coco:TRAIN,TRAIN.json;VAL,VAL.json` is an own split.
    voc:FOLDER   FOLDER/Annotations/*.xml, images in FOLDER/JPEGImages/ (or
                 images/). VOC coordinates are 1-based pixel indices, xmin..xmax
                 inclusive: as pixel edges x1 = xmin - 1, x2 = xmax (y alike).
                 Classes: FOLDER/classes.txt (a name a line), else the sorted
                 names seen. Images that no XML names are not read.
    yolo:FOLDER  FOLDER/images/ and FOLDER/labels/, paired by stem: a line
                 `class cx cy w h` an object, normalised to 0..1 by the image's
                 width and height (an empty label file: no objects). Classes:
                 FOLDER/classes.txt, else the `names:` of FOLDER/data.yaml
                 (read only if pyyaml is installed).

A voc or yolo FOLDER with `train/` and `val/` (or `validation/`) folders,
each laid out as above, gives its own split (classes.txt stays in FOLDER).

Always a ValueError of one line (file, line, fix): a malformed file; a box
with x2 < x1 or y2 < y1 (the format was misread); an unknown class;
annotations and image files that do not match; a declared image size other
than the decoded one. `bad_files` decides ("skip", or "fail": the error) for
zero-area boxes and boxes wholly outside their image (dropped), boxes partly
outside (clipped, counted), a YOLO image without a label file and an image
that does not decode (skipped). COCO crowd boxes and VOC difficult objects
are left out under either policy. `DetReport.skipped` lists every drop.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time

import numpy as np
import tensorflow as tf

from keras_ft import data as data_lib, headers, limits, validate
from keras_ft.seg_data import _Positions
from keras_ft.detection import formats

IMAGE_EXTENSIONS = formats.IMAGE_EXTENSIONS
KINDS = ("coco", "voc", "yolo")
CLASSES_FILE = formats.CLASSES_FILE
_DECODED = ("PNG", "JPEG", "BMP", "GIF")  # what data.decode_image reads
_ROUNDING = 0.01  # pixels a coordinate may overshoot by rounding: clipped, not counted
_MAX_LISTED = 20


@dataclasses.dataclass
class DetSet:
    """Images with their boxes and classes, and the names of the classes.

    Split it with `split_for_run` (this module), whose one stratum is `labels`.
    """

    images: list[str]  # image file paths
    boxes: list[np.ndarray]  # per image float32 [n_i, 4] x1, y1, x2, y2 in 0..W, 0..H; n_i >= 0
    classes: list[np.ndarray]  # per image int32 [n_i], class indices 0..K-1
    sizes: np.ndarray  # int32 [N, 2]: (height, width) of each image as decoded
    class_names: list[str]  # K names, in label order
    val_mask: np.ndarray | None = None  # bool [N], the source's own split (True = validation)
    root: str | None = None  # links leaving this folder are not followed (limits.read_regular)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        """int32 zeros `[N]`: one stratum, as `seg_data.SegSet`'s."""
        return np.zeros(len(self), np.int32)

    def subset(self, index) -> "DetSet":
        index = np.asarray(index, np.int64)
        return DetSet(
            [self.images[i] for i in index], [self.boxes[i] for i in index],
            [self.classes[i] for i in index], self.sizes[index], self.class_names,
            None if self.val_mask is None else self.val_mask[index], self.root,
        )


@dataclasses.dataclass
class DetReport:
    """What `load_det_source` read and checked."""

    source: str
    images: int  # usable images
    objects: dict[str, int]  # objects per class name, in label order
    empty_images: int  # images with no objects (valid)
    # (where, reason) of each box or image left out: "file:line" (COCO:
    # "file:annotations[k]"), or the image file.
    skipped: list[tuple[str, str]]
    clipped: int  # boxes partly outside their image, clipped to it
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """A readable summary, one string per line."""
        lines = [
            f"Read {self.images:,} images with {sum(self.objects.values()):,} objects in "
            f"{len(self.objects)} classes from {self.source} ({self.seconds:.1f}s): "
            f"{self.empty_images:,} without objects, {len(self.skipped):,} boxes or images "
            f"left out, {self.clipped:,} boxes clipped to their image."
        ]
        lines += [f"  left out {where}: {reason}" for where, reason in self.skipped[:_MAX_LISTED]]
        if len(self.skipped) > _MAX_LISTED:
            more = len(self.skipped) - _MAX_LISTED
            lines.append(f"  ... and {more:,} more (see the JSON report).")
        per_class = ", ".join(f"{name} {n:,}" for name, n in self.objects.items())
        lines.append(f"Objects per class: {per_class}.")
        absent = [name for name, n in self.objects.items() if not n]
        if absent:
            lines.append(f"No object of class {', '.join(absent[:10])}.")
        return lines

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)



# ------------------------------------------------------------------ loading


def load_det_source(source: str, bad_files: str = "skip") -> tuple[DetSet, DetReport]:
    """Reads and checks a detection source such as `voc:/data/VOC2007`.

    Args:
        source: `KIND:ARGUMENT`, KIND one of `KINDS` (this module's docstring).
        bad_files: one of `validate.POLICIES`: "skip" leaves out (or clips) and
            reports what the module's docstring lists; "fail" raises the first.

    Returns:
        The images with their boxes, and a `DetReport` of what was read.

    Raises:
        ValueError: one line naming the file (and line) and the fix.
    """
    if bad_files not in validate.POLICIES:
        raise ValueError(f"Unknown bad-file policy {bad_files!r}. Choose one of: "
                         f"{', '.join(validate.POLICIES)}.")
    kind, sep, arg = source.partition(":")
    if not sep or kind not in KINDS or not arg:
        raise ValueError(f"Unknown detection data.source {source!r}. Use one of: "
                         "coco:IMAGES_DIR,ANNOTATIONS.json, voc:FOLDER, yolo:FOLDER.")
    start, log = time.monotonic(), formats.Log(bad_files)
    read = {"coco": formats.read_coco, "voc": formats.read_voc, "yolo": formats.read_yolo}[kind]
    images, names, root, own_split = read(arg, log)
    data = _check(images, names, root, log, source, own_split)
    counts = np.bincount(np.concatenate(data.classes), minlength=len(names))
    empty = sum(len(c) == 0 for c in data.classes)
    report = DetReport(source, len(data), dict(zip(names, counts.tolist())), empty,
                       log.skipped, log.clipped, time.monotonic() - start)
    return data, report


def _check(images: list[formats.Annotated], names: list[str], root, log: formats.Log, source: str,
           own_split: bool) -> DetSet:
    """Decodes every image and fits every box to it."""
    kept = []  # (image, (height, width), boxes, classes)
    for image in images:
        try:
            height, width = _image_size(image.path, root)
        except ValueError as e:
            log.bad(image.path, str(e), "skip the image")
            continue
        if image.declared and image.declared != (height, width):
            raise formats.error(image.where, f"image {image.path} is declared {image.declared[1]}x"
                         f"{image.declared[0]} (width x height) but decodes to {width}x{height}",
                         "fix the declared size, or the image file it names")
        scale = (width, height, width, height) if image.normalised else (1, 1, 1, 1)
        boxes, classes = [], []
        for where, box, label in image.boxes:
            fitted = _fit(where, [v * s for v, s in zip(box, scale)], height, width, log)
            if fitted is not None:
                boxes.append(fitted)
                classes.append(label)
        kept.append((image, (height, width), boxes, classes))
    log.raise_if_failing()
    if not any(boxes for _, _, boxes, _ in kept):
        raise ValueError(f"{source}: no usable {'object' if kept else 'image'} is left "
                         f"({len(log.skipped)} left out); annotate objects, or fix those.")
    return DetSet(
        [image.path for image, *_ in kept],
        [np.asarray(boxes, np.float32).reshape(-1, 4) for *_, boxes, _ in kept],
        [np.asarray(classes, np.int32) for *_, classes in kept],
        np.asarray([size for _, size, *_ in kept], np.int32),
        list(names),
        np.asarray([image.val for image, *_ in kept], bool) if own_split else None,
        root,
    )


def _fit(where: str, box, height: int, width: int, log: formats.Log):
    """`box` clipped to the image, or None (logged) if nothing of it is left."""
    x1, y1, x2, y2 = box
    if x2 == x1 or y2 == y1:
        log.bad(where, f"box {formats.fmt(box)} has zero area")
        return None
    fitted = [min(max(v, 0.0), side) for v, side in zip(box, (width, height, width, height))]
    if fitted[2] <= fitted[0] or fitted[3] <= fitted[1]:
        log.bad(where, f"box {formats.fmt(box)} is wholly outside its {width}x{height} image")
        return None
    if max(abs(a - b) for a, b in zip(box, fitted)) > _ROUNDING:
        log.bad(where, f"box {formats.fmt(box)} is partly outside its {width}x{height} image",
                "clip such boxes to the image", clip=True)
    return fitted


def _image_size(path: str, root) -> tuple[int, int]:
    """(height, width) of the image decoded as training decodes it (as
    `seg_data._decoded_image`: a corrupt file is found), or a short reason."""
    try:
        blob = limits.read_regular(path, root)
    except limits.Refused as e:
        raise ValueError(e.reason) from None
    kind = headers.sniff(blob)
    if kind not in _DECODED:
        raise ValueError(f"not an image TensorFlow decodes ({kind or limits.file_type(blob)})")
    try:
        shape = data_lib.decode_image(tf.constant(blob)).shape
    except tf.errors.OpError as e:
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", " ".join(e.message.split())).strip()
        raise ValueError(f"cannot be decoded ({reason[:200]})") from None
    return int(shape[0]), int(shape[1])


# ------------------------------------------------------------------ the split


def split_for_run(data: DetSet, data_spec, seed: int) -> tuple[DetSet, DetSet]:
    """`(train, val)`, as `seg_data.split_for_run`: `keras_ft.data.split_for_run`'s
    rules on positions (the source's own split, else a seeded one by
    `data_spec.val_fraction`; then `data_spec.train_per_class` images in all)."""
    positions = _Positions(np.arange(len(data)), data.val_mask)
    train, val = data_lib.split_for_run(positions, data_spec, seed)
    return (dataclasses.replace(data.subset(train.index), val_mask=None),
            dataclasses.replace(data.subset(val.index), val_mask=None))

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
import math
import os
import re
import time
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow as tf

from keras_ft import data as data_lib, headers, limits, validate
from keras_ft.seg_data import _Positions
from keras_ft.sources import own_split_folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
KINDS = ("coco", "voc", "yolo")
CLASSES_FILE = "classes.txt"
_DECODED = ("PNG", "JPEG", "BMP", "GIF")  # what data.decode_image reads
_MAX_JSON_BYTES = 2**30  # COCO's instances_train2017.json is 448 MB
_MAX_TEXT_BYTES = 16 * 2**20  # one XML or label file
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


@dataclasses.dataclass
class _Image:
    """One image as its annotations give it, before the checks."""

    path: str
    boxes: list  # (where, [x1, y1, x2, y2], class index; a VOC name until all are seen)
    declared: tuple | None = None  # (height, width) the annotations state...
    where: str = ""  # ...there
    normalised: bool = False  # boxes in 0..1 (YOLO): scaled by the decoded size
    val: bool = False


class _Log:
    """What is left out, and the problems `bad_files` decides on."""

    def __init__(self, policy: str):
        self.policy, self.skipped, self.problems, self.clipped = policy, [], [], 0

    def note(self, where: str, reason: str) -> None:
        """Left out as the source asks (crowd, difficult): under "fail" too."""
        self.skipped.append((where, reason))

    def bad(self, where: str, reason: str, action: str = "leave it out", clip=False) -> None:
        if clip:
            self.clipped += 1
        else:
            self.skipped.append((where, reason))
        self.problems.append((where, reason, action))

    def raise_if_failing(self) -> None:
        if self.policy == "fail" and self.problems:
            where, reason, action = self.problems[0]
            n = len(self.problems) - 1
            more = f" ({n} more such problem(s).)" if n else ""
            raise ValueError(
                f"{where}: {reason}; fix it, or set data.bad_files=skip to {action}.{more}"
            )


def _error(where: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{where}: {problem}; {fix}.")


def _fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


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
    start, log = time.monotonic(), _Log(bad_files)
    read = {"coco": _read_coco, "voc": _read_voc, "yolo": _read_yolo}[kind]
    images, names, root, own_split = read(arg, log)
    data = _check(images, names, root, log, source, own_split)
    counts = np.bincount(np.concatenate(data.classes), minlength=len(names))
    empty = sum(len(c) == 0 for c in data.classes)
    report = DetReport(source, len(data), dict(zip(names, counts.tolist())), empty,
                       log.skipped, log.clipped, time.monotonic() - start)
    return data, report


def _check(images: list[_Image], names: list[str], root, log: _Log, source: str,
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
            raise _error(image.where, f"image {image.path} is declared {image.declared[1]}x"
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


def _fit(where: str, box, height: int, width: int, log: _Log):
    """`box` clipped to the image, or None (logged) if nothing of it is left."""
    x1, y1, x2, y2 = box
    if x2 == x1 or y2 == y1:
        log.bad(where, f"box {_fmt(box)} has zero area")
        return None
    fitted = [min(max(v, 0.0), side) for v, side in zip(box, (width, height, width, height))]
    if fitted[2] <= fitted[0] or fitted[3] <= fitted[1]:
        log.bad(where, f"box {_fmt(box)} is wholly outside its {width}x{height} image")
        return None
    if max(abs(a - b) for a, b in zip(box, fitted)) > _ROUNDING:
        log.bad(where, f"box {_fmt(box)} is partly outside its {width}x{height} image",
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


# ------------------------------------------------------------------ files


def _text(path: str, root=None, max_bytes: int = _MAX_TEXT_BYTES) -> str:
    try:
        return limits.read_regular(path, root, max_bytes=max_bytes).decode("utf-8-sig")
    except limits.Refused as e:
        raise _error(path, e.reason, "make it a readable text file") from None
    except UnicodeDecodeError as e:
        raise _error(path, f"not UTF-8 text ({e.reason})", "save it as UTF-8") from None


def _files(folder: str, extensions: tuple) -> list[str]:
    """Sorted names in `folder` (not below it) ending in one of `extensions`;
    hidden ones left out (`.ipynb_checkpoints` holds copies)."""
    return sorted(name for name in os.listdir(folder)
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions
                  and not os.path.isdir(os.path.join(folder, name)))


def _folder(path: str, *names: str) -> str:
    """The first `path/NAME` that is a folder."""
    for name in names:
        if os.path.isdir(os.path.join(path, name)):
            return os.path.join(path, name)
    raise _error(path, f"no {' or '.join(n + '/' for n in names)} folder",
                 "lay it out as keras_ft.detection.sources describes")


def _parts(path: str) -> list[tuple[str, bool]]:
    """`(folder, is validation)` of a voc or yolo FOLDER: its own split, or itself."""
    if not os.path.isdir(path):
        raise _error(path, "not a folder", "point data.source at the data folder")
    split = own_split_folders(path)
    return [(path, False)] if split is None else [(split[0], False), (split[1], True)]


def _number(value, where: str, what: str) -> float:
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):  # None (a missing XML tag), a list, "abc"
        number = None
    if number is None or not math.isfinite(number):
        raise _error(where, f"{what} {value!r} is not a finite number", "fix the annotation")
    return number


def _class_names(path: str, root) -> list[str] | None:
    """The names of a classes.txt, line i naming class i-1; None if there is none."""
    if not os.path.lexists(path):
        return None
    names = [line.strip() for line in _text(path, root).splitlines()]
    while names and not names[-1]:
        names.pop()
    for line, name in enumerate(names or [""], 1):
        if not name or names.index(name) != line - 1:
            problem = f"repeats {name!r} of line {names.index(name) + 1}" if name else "is empty"
            raise _error(f"{path}:{line}", problem, "give each class a line of its own")
    return names


# ------------------------------------------------------------------ COCO


def _read_coco(arg: str, log: _Log):
    pairs, images, categories, dirs = arg.split(";"), [], None, []
    for k, pair in enumerate(pairs):
        image_dir, sep, path = (part.strip() for part in pair.rpartition(","))
        if not (sep and image_dir and path) or len(pairs) > 2:
            raise _error(f"coco:{arg}", f"{pair!r} is not IMAGES_DIR,ANNOTATIONS.json (or there "
                         "are over two pairs)", "give IMAGES,ANN.json or TRAIN,T.json;VAL,V.json")
        if not os.path.isdir(image_dir):
            raise _error(image_dir, "not a folder", "give the folder of the COCO images")
        try:
            doc = json.loads(limits.read_regular(path, max_bytes=_MAX_JSON_BYTES))
        except limits.Refused as e:
            raise _error(path, e.reason, "give a readable COCO JSON file") from None
        except json.JSONDecodeError as e:
            raise _error(f"{path}:{e.lineno}:{e.colno}", f"not valid JSON ({e.msg})",
                         "fix the JSON there") from None
        except UnicodeDecodeError as e:
            raise _error(path, f"not UTF-8 ({e.reason})", "save it as UTF-8") from None
        if not isinstance(doc, dict):
            raise _error(path, "not a JSON object", "give a COCO annotations file")
        found = _coco_categories(doc, path)
        if categories not in (None, found):
            raise _error(path, "its categories differ from the training JSON's",
                         "give both files the same categories (id and name)")
        categories = found
        index = {category: i for i, (category, _) in enumerate(found)}
        images += _coco_images(doc, path, image_dir, index, log, val=k == 1)
        dirs.append(os.path.abspath(image_dir))
    return images, [name for _, name in categories], os.path.commonpath(dirs), len(pairs) == 2


def _get(entry, key: str, kind, where: str):
    """`entry[key]` if `entry` is a dict and it is a `kind` (bool is no int)."""
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _error(where, f"{key!r} is {str(value)[:60]!r}, not a {kind.__name__}",
                     "give COCO's images (id, file_name, width, height), annotations "
                     "(image_id, category_id, bbox) and categories (id, name)")
    return value


def _coco_categories(doc: dict, path: str) -> list[tuple[int, str]]:
    """`(id, name)` of each category, sorted by id: class i is the i-th."""
    found = []
    for k, entry in enumerate(_get(doc, "categories", list, path)):
        where = f"{path}:categories[{k}]"
        found.append((_get(entry, "id", int, where), _get(entry, "name", str, where).strip()))
    found.sort()
    for values in ([c for c, _ in found], [n for _, n in found]):
        repeated = sorted(v for v in set(values) if values.count(v) > 1)
        if repeated:
            raise _error(path, f"two categories have {repeated[0]!r}",
                         "give each category its own id and name")
    if not found:
        raise _error(path, "has no categories", "list the classes in 'categories'")
    return found


def _coco_images(doc: dict, path: str, image_dir: str, index: dict, log: _Log, val: bool):
    by_id, by_name = {}, {}
    for k, entry in enumerate(_get(doc, "images", list, path)):
        where = f"{path}:images[{k}]"
        image_id, name = _get(entry, "id", int, where), _get(entry, "file_name", str, where)
        size = (_get(entry, "height", int, where), _get(entry, "width", int, where))
        if image_id in by_id or name in by_name:
            raise _error(where, f"image id {image_id} or {name!r} is listed twice", "list it once")
        by_id[image_id] = by_name[name] = _Image(os.path.join(image_dir, name), [], size, where,
                                                 val=val)
    files = set(_files(image_dir, IMAGE_EXTENSIONS))
    missing, extra = sorted(by_name.keys() - files), sorted(files - by_name.keys())
    if missing or extra:
        first = f"{missing[0]!r} is listed but not" if missing else f"{extra[0]!r} is unlisted but"
        raise _error(path, f"the annotations' image list does not match the folder {image_dir}: "
                     f"{first} in it ({len(by_name)} listed, {len(files)} image files; "
                     f"{len(missing)} absent, {len(extra)} unlisted)",
                     "give the folder exactly the images the JSON lists")
    for k, ann in enumerate(_get(doc, "annotations", list, path)):
        where = f"{path}:annotations[{k}]"
        image = by_id.get(_get(ann, "image_id", int, where))
        category = _get(ann, "category_id", int, where)
        if image is None or category not in index:
            what, listed = (("image_id", "images") if image is None
                            else ("category_id", "categories"))
            raise _error(where, f"unknown {what} {ann[what]}", f"use an id listed in '{listed}'")
        bbox = _get(ann, "bbox", list, where)
        x, y, w, h = [_number(v, where, "bbox value") for v in bbox] if len(bbox) == 4 else [-1] * 4
        if w < 0 or h < 0:  # not 4 numbers, or a misread format
            raise _error(where, f"bbox {str(bbox)[:80]} is not 4 numbers with w, h >= 0",
                         "COCO's bbox is [x, y, width, height] in pixels, not [x1, y1, x2, y2]")
        if ann.get("iscrowd"):
            log.note(where, "crowd box (iscrowd=1): a group, not one object")
            continue
        image.boxes.append((where, [x, y, x + w, y + h], index[category]))
    return sorted(by_name.values(), key=lambda image: image.path)


# ------------------------------------------------------------------ VOC


def _read_voc(path: str, log: _Log):
    parts = _parts(path)
    class_names = _class_names(os.path.join(path, CLASSES_FILE), path)
    images, seen = [], {}
    for folder, val in parts:
        ann_dir, image_dir = _folder(folder, "Annotations"), _folder(folder, "JPEGImages", "images")
        names = _files(ann_dir, (".xml",))
        if not names:
            raise _error(ann_dir, "has no .xml files", "add the VOC annotation files")
        for name in names:
            image = _voc_file(os.path.join(ann_dir, name), image_dir, class_names, log, path)
            if image.path in seen:
                raise _error(image.where, f"names the image {image.path}, as {seen[image.path]} "
                             "does", "give each image one annotation file")
            seen[image.path], image.val = image.where, val
            images.append(image)
    names = class_names or sorted({label for image in images for _, _, label in image.boxes})
    index = {name: i for i, name in enumerate(names)}
    for image in images:
        image.boxes = [(where, box, index[label]) for where, box, label in image.boxes]
    images.sort(key=lambda image: (image.val, image.path))
    return images, names, path, len(parts) == 2


def _voc_file(path: str, image_dir: str, class_names, log: _Log, root: str) -> _Image:
    text = _text(path, root)
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", text, re.IGNORECASE):  # no entity expansion
        raise _error(path, "has a <!DOCTYPE> or <!ENTITY> declaration, refused (entities can "
                     "expand without bound)", "remove the declaration")
    try:
        tree = ET.fromstring(text)
    except ET.ParseError as e:
        raise _error(f"{path}:{e.position[0]}", f"not well-formed XML ({e})", "fix it") from None
    filename = (tree.findtext("filename") or "").strip()
    image_path = os.path.join(image_dir, filename)
    if not filename or os.path.basename(filename) != filename or not os.path.lexists(image_path):
        raise _error(path, f"its image <filename> {filename!r} is not in {image_dir}",
                     "add the image (or fix <filename>), or remove the annotation file")
    declared = None
    if tree.find("size/width") is not None and tree.find("size/height") is not None:
        width, height = (_number(tree.findtext(f"size/{tag}"), path, f"<{tag}>")
                         for tag in ("width", "height"))
        declared = (int(height), int(width)) if width and height else None  # 0: not stated
    # ElementTree keeps no line numbers: the line of the k-th "<object" in the
    # text ("object k" instead if the counts differ, from one in a comment).
    lines = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"<object[\s>]", text)]
    objects, boxes = tree.findall("object"), []
    for k, obj in enumerate(objects):
        where = f"{path}:{lines[k]}" if len(lines) == len(objects) else f"{path} object {k + 1}"
        name, box = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        if not name or box is None or (class_names is not None and name not in class_names):
            problem = f"class {name!r} is not in {CLASSES_FILE}" if name and box is not None \
                else "an <object> without <name> or <bndbox>"
            raise _error(where, problem, f"fix the <object> (or {CLASSES_FILE})")
        xmin, ymin, xmax, ymax = (_number(box.findtext(t), where, f"<{t}>")
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        corners = [xmin - 1, ymin - 1, xmax, ymax]  # 1-based, inclusive -> pixel edges
        if corners[2] < corners[0] or corners[3] < corners[1]:
            raise _error(where, f"box xmin..xmax {xmin:g}..{xmax:g}, ymin..ymax {ymin:g}..{ymax:g} "
                         "is reversed",
                         "give xmin <= xmax and ymin <= ymax (1-based pixels)")
        if (obj.findtext("difficult") or "0").strip() not in ("0", ""):
            log.note(where, "marked difficult")
            continue
        boxes.append((where, corners, name))
    return _Image(image_path, boxes, declared, path)


# ------------------------------------------------------------------ YOLO


def _read_yolo(path: str, log: _Log):
    parts = _parts(path)
    names = _class_names(os.path.join(path, CLASSES_FILE), path)
    names = names or _yaml_names(os.path.join(path, "data.yaml"), path)
    images = []
    for folder, val in parts:
        image_dir, label_dir = _folder(folder, "images"), _folder(folder, "labels")
        stems = {}
        for name in _files(image_dir, IMAGE_EXTENSIONS):
            stem, full = os.path.splitext(name)[0], os.path.join(image_dir, name)
            if stem in stems:
                raise _error(full, f"shares its stem with {stems[stem]}", "rename or remove one")
            stems[stem] = full
        labels = {os.path.splitext(n)[0]: os.path.join(label_dir, n)
                  for n in _files(label_dir, (".txt",))}
        orphans = sorted(labels.keys() - stems.keys())
        if orphans:
            raise _error(labels[orphans[0]], f"has no image {orphans[0]}.* in {image_dir}",
                         "add the image, or remove the label file")
        for stem, image_path in sorted(stems.items(), key=lambda item: item[1]):
            if stem not in labels:
                log.bad(image_path, f"no label file {os.path.join(label_dir, stem + '.txt')} "
                        "(an empty one means no objects)", "skip such images")
            else:
                boxes = _yolo_boxes(labels[stem], len(names), path)
                images.append(_Image(image_path, boxes, normalised=True, val=val))
    return images, names, path, len(parts) == 2


def _yolo_boxes(path: str, k: int, root: str) -> list:
    boxes = []
    for line, text in enumerate(_text(path, root).splitlines(), 1):
        fields, where = text.split(), f"{path}:{line}"
        if not fields:
            continue
        if len(fields) != 5:
            raise _error(where, f"{len(fields)} values, not 5",
                         "give an object a line: class cx cy w h (0..1 of the image's size)")
        label, cx, cy, w, h = (_number(v, where, "value") for v in fields)
        if label != int(label) or not 0 <= label < k:
            raise _error(where, f"class {fields[0]} is not one of 0..{k - 1}",
                         f"use a class index of {CLASSES_FILE} (line i = class i-1)")
        if w < 0 or h < 0:
            raise _error(where, f"a negative width or height ({fields[3]}, {fields[4]})",
                         "give class cx cy w h: the box's centre and size")
        boxes.append((where, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], int(label)))
    return boxes


def _yaml_names(path: str, root: str) -> list[str]:
    """The `names:` of an Ultralytics data.yaml: a list, or {index: name}."""
    fix = f"add {os.path.join(os.path.dirname(path), CLASSES_FILE)}: one class name a line"
    if not os.path.lexists(path):
        raise _error(os.path.dirname(path), f"has no {CLASSES_FILE} naming the YOLO classes", fix)
    text = _text(path, root)
    try:
        import yaml  # optional: classes.txt needs nothing
        names = yaml.safe_load(text).get("names")
    except ImportError:
        raise _error(path, "reading it needs pyyaml, which is not installed", fix) from None
    except Exception as e:  # YAMLError, or no mapping: one line either way
        reason = " ".join(str(e).split())[:200]
        raise _error(path, f"not YAML with a names: list ({reason})", fix) from None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise _error(path, f"names: is {str(names)[:80]}, not a list of distinct names", fix)
    return [str(name) for name in names]


# ------------------------------------------------------------------ the split


def split_for_run(data: DetSet, data_spec, seed: int) -> tuple[DetSet, DetSet]:
    """`(train, val)`, as `seg_data.split_for_run`: `keras_ft.data.split_for_run`'s
    rules on positions (the source's own split, else a seeded one by
    `data_spec.val_fraction`; then `data_spec.train_per_class` images in all)."""
    positions = _Positions(np.arange(len(data)), data.val_mask)
    train, val = data_lib.split_for_run(positions, data_spec, seed)
    return (dataclasses.replace(data.subset(train.index), val_mask=None),
            dataclasses.replace(data.subset(val.index), val_mask=None))

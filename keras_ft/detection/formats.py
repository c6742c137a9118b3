"""The three annotation formats that `keras_ft.detection.sources` reads:
COCO JSON, Pascal VOC XML folders and YOLO txt folders, each read into
`Annotated` images (boxes not yet checked) with one-line errors naming the
file and line (the formats and their rules: `sources`' docstring).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import xml.etree.ElementTree as ET

from keras_ft import limits
from keras_ft.sources import own_split_folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
CLASSES_FILE = "classes.txt"
_MAX_JSON_BYTES = 2**30  # COCO's instances_train2017.json is 448 MB
_MAX_TEXT_BYTES = 16 * 2**20  # one XML or label file

@dataclasses.dataclass
class Annotated:
    """One image as its annotations give it, before the checks."""

    path: str
    boxes: list  # (where, [x1, y1, x2, y2], class index; a VOC name until all are seen)
    declared: tuple | None = None  # (height, width) the annotations state...
    where: str = ""  # ...there
    normalised: bool = False  # boxes in 0..1 (YOLO): scaled by the decoded size
    val: bool = False


class Log:
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


def error(where: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{where}: {problem}; {fix}.")


def fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


# ------------------------------------------------------------------ files


def _text(path: str, root=None, max_bytes: int = _MAX_TEXT_BYTES) -> str:
    try:
        return limits.read_regular(path, root, max_bytes=max_bytes).decode("utf-8-sig")
    except limits.Refused as e:
        raise error(path, e.reason, "make it a readable text file") from None
    except UnicodeDecodeError as e:
        raise error(path, f"not UTF-8 text ({e.reason})", "save it as UTF-8") from None


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
    raise error(path, f"no {' or '.join(n + '/' for n in names)} folder",
                 "lay it out as keras_ft.detection.sources describes")


def _parts(path: str) -> list[tuple[str, bool]]:
    """`(folder, is validation)` of a voc or yolo FOLDER: its own split, or itself."""
    if not os.path.isdir(path):
        raise error(path, "not a folder", "point data.source at the data folder")
    split = own_split_folders(path)
    return [(path, False)] if split is None else [(split[0], False), (split[1], True)]


def _number(value, where: str, what: str) -> float:
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):  # None (a missing XML tag), a list, "abc"
        number = None
    if number is None or not math.isfinite(number):
        raise error(where, f"{what} {value!r} is not a finite number", "fix the annotation")
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
            raise error(f"{path}:{line}", problem, "give each class a line of its own")
    return names


# ------------------------------------------------------------------ COCO


def read_coco(arg: str, log: Log):
    pairs, images, categories, dirs = arg.split(";"), [], None, []
    for k, pair in enumerate(pairs):
        image_dir, sep, path = (part.strip() for part in pair.rpartition(","))
        if not (sep and image_dir and path) or len(pairs) > 2:
            raise error(f"coco:{arg}", f"{pair!r} is not IMAGES_DIR,ANNOTATIONS.json (or there "
                         "are over two pairs)", "give IMAGES,ANN.json or TRAIN,T.json;VAL,V.json")
        if not os.path.isdir(image_dir):
            raise error(image_dir, "not a folder", "give the folder of the COCO images")
        try:
            doc = json.loads(limits.read_regular(path, max_bytes=_MAX_JSON_BYTES))
        except limits.Refused as e:
            raise error(path, e.reason, "give a readable COCO JSON file") from None
        except json.JSONDecodeError as e:
            raise error(f"{path}:{e.lineno}:{e.colno}", f"not valid JSON ({e.msg})",
                         "fix the JSON there") from None
        except UnicodeDecodeError as e:
            raise error(path, f"not UTF-8 ({e.reason})", "save it as UTF-8") from None
        if not isinstance(doc, dict):
            raise error(path, "not a JSON object", "give a COCO annotations file")
        found = _coco_categories(doc, path)
        if categories not in (None, found):
            raise error(path, "its categories differ from the training JSON's",
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
        raise error(where, f"{key!r} is {str(value)[:60]!r}, not a {kind.__name__}",
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
            raise error(path, f"two categories have {repeated[0]!r}",
                         "give each category its own id and name")
    if not found:
        raise error(path, "has no categories", "list the classes in 'categories'")
    return found


def _coco_images(doc: dict, path: str, image_dir: str, index: dict, log: Log, val: bool):
    by_id, by_name = {}, {}
    for k, entry in enumerate(_get(doc, "images", list, path)):
        where = f"{path}:images[{k}]"
        image_id, name = _get(entry, "id", int, where), _get(entry, "file_name", str, where)
        size = (_get(entry, "height", int, where), _get(entry, "width", int, where))
        if image_id in by_id or name in by_name:
            raise error(where, f"image id {image_id} or {name!r} is listed twice", "list it once")
        by_id[image_id] = by_name[name] = Annotated(os.path.join(image_dir, name), [], size, where,
                                                 val=val)
    files = set(_files(image_dir, IMAGE_EXTENSIONS))
    missing, extra = sorted(by_name.keys() - files), sorted(files - by_name.keys())
    if missing or extra:
        first = f"{missing[0]!r} is listed but not" if missing else f"{extra[0]!r} is unlisted but"
        raise error(path, f"the annotations' image list does not match the folder {image_dir}: "
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
            raise error(where, f"unknown {what} {ann[what]}", f"use an id listed in '{listed}'")
        bbox = _get(ann, "bbox", list, where)
        x, y, w, h = [_number(v, where, "bbox value") for v in bbox] if len(bbox) == 4 else [-1] * 4
        if w < 0 or h < 0:  # not 4 numbers, or a misread format
            raise error(where, f"bbox {str(bbox)[:80]} is not 4 numbers with w, h >= 0",
                         "COCO's bbox is [x, y, width, height] in pixels, not [x1, y1, x2, y2]")
        if ann.get("iscrowd"):
            log.note(where, "crowd box (iscrowd=1): a group, not one object")
            continue
        image.boxes.append((where, [x, y, x + w, y + h], index[category]))
    return sorted(by_name.values(), key=lambda image: image.path)


# ------------------------------------------------------------------ VOC


def read_voc(path: str, log: Log):
    parts = _parts(path)
    class_names = _class_names(os.path.join(path, CLASSES_FILE), path)
    images, seen = [], {}
    for folder, val in parts:
        ann_dir, image_dir = _folder(folder, "Annotations"), _folder(folder, "JPEGImages", "images")
        names = _files(ann_dir, (".xml",))
        if not names:
            raise error(ann_dir, "has no .xml files", "add the VOC annotation files")
        for name in names:
            image = _voc_file(os.path.join(ann_dir, name), image_dir, class_names, log, path)
            if image.path in seen:
                raise error(image.where, f"names the image {image.path}, as {seen[image.path]} "
                             "does", "give each image one annotation file")
            seen[image.path], image.val = image.where, val
            images.append(image)
    names = class_names or sorted({label for image in images for _, _, label in image.boxes})
    index = {name: i for i, name in enumerate(names)}
    for image in images:
        image.boxes = [(where, box, index[label]) for where, box, label in image.boxes]
    images.sort(key=lambda image: (image.val, image.path))
    return images, names, path, len(parts) == 2


def _voc_file(path: str, image_dir: str, class_names, log: Log, root: str) -> Annotated:
    text = _text(path, root)
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", text, re.IGNORECASE):  # no entity expansion
        raise error(path, "has a <!DOCTYPE> or <!ENTITY> declaration, refused (entities can "
                     "expand without bound)", "remove the declaration")
    try:
        tree = ET.fromstring(text)
    except ET.ParseError as e:
        raise error(f"{path}:{e.position[0]}", f"not well-formed XML ({e})", "fix it") from None
    filename = (tree.findtext("filename") or "").strip()
    image_path = os.path.join(image_dir, filename)
    if not filename or os.path.basename(filename) != filename or not os.path.lexists(image_path):
        raise error(path, f"its image <filename> {filename!r} is not in {image_dir}",
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
            raise error(where, problem, f"fix the <object> (or {CLASSES_FILE})")
        xmin, ymin, xmax, ymax = (_number(box.findtext(t), where, f"<{t}>")
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        corners = [xmin - 1, ymin - 1, xmax, ymax]  # 1-based, inclusive -> pixel edges
        if corners[2] < corners[0] or corners[3] < corners[1]:
            raise error(where, f"box xmin..xmax {xmin:g}..{xmax:g}, ymin..ymax {ymin:g}..{ymax:g} "
                         "is reversed",
                         "give xmin <= xmax and ymin <= ymax (1-based pixels)")
        if (obj.findtext("difficult") or "0").strip() not in ("0", ""):
            log.note(where, "marked difficult")
            continue
        boxes.append((where, corners, name))
    return Annotated(image_path, boxes, declared, path)


# ------------------------------------------------------------------ YOLO


def read_yolo(path: str, log: Log):
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
                raise error(full, f"shares its stem with {stems[stem]}", "rename or remove one")
            stems[stem] = full
        labels = {os.path.splitext(n)[0]: os.path.join(label_dir, n)
                  for n in _files(label_dir, (".txt",))}
        orphans = sorted(labels.keys() - stems.keys())
        if orphans:
            raise error(labels[orphans[0]], f"has no image {orphans[0]}.* in {image_dir}",
                         "add the image, or remove the label file")
        for stem, image_path in sorted(stems.items(), key=lambda item: item[1]):
            if stem not in labels:
                log.bad(image_path, f"no label file {os.path.join(label_dir, stem + '.txt')} "
                        "(an empty one means no objects)", "skip such images")
            else:
                boxes = _yolo_boxes(labels[stem], len(names), path)
                images.append(Annotated(image_path, boxes, normalised=True, val=val))
    return images, names, path, len(parts) == 2


def _yolo_boxes(path: str, k: int, root: str) -> list:
    boxes = []
    for line, text in enumerate(_text(path, root).splitlines(), 1):
        fields, where = text.split(), f"{path}:{line}"
        if not fields:
            continue
        if len(fields) != 5:
            raise error(where, f"{len(fields)} values, not 5",
                         "give an object a line: class cx cy w h (0..1 of the image's size)")
        label, cx, cy, w, h = (_number(v, where, "value") for v in fields)
        if label != int(label) or not 0 <= label < k:
            raise error(where, f"class {fields[0]} is not one of 0..{k - 1}",
                         f"use a class index of {CLASSES_FILE} (line i = class i-1)")
        if w < 0 or h < 0:
            raise error(where, f"a negative width or height ({fields[3]}, {fields[4]})",
                         "give class cx cy w h: the box's centre and size")
        boxes.append((where, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], int(label)))
    return boxes


def _yaml_names(path: str, root: str) -> list[str]:
    """The `names:` of an Ultralytics data.yaml: a list, or {index: name}."""
    fix = f"add {os.path.join(os.path.dirname(path), CLASSES_FILE)}: one class name a line"
    if not os.path.lexists(path):
        raise error(os.path.dirname(path), f"has no {CLASSES_FILE} naming the YOLO classes", fix)
    text = _text(path, root)
    try:
        import yaml  # optional: classes.txt needs nothing
        names = yaml.safe_load(text).get("names")
    except ImportError:
        raise error(path, "reading it needs pyyaml, which is not installed", fix) from None
    except Exception as e:  # YAMLError, or no mapping: one line either way
        reason = " ".join(str(e).split())[:200]
        raise error(path, f"not YAML with a names: list ({reason})", fix) from None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise error(path, f"names: is {str(names)[:80]}, not a list of distinct names", fix)
    return [str(name) for name in names]

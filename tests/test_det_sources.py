"""Detection annotations: COCO, VOC and YOLO read alike, and the strict checks."""

import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from keras_ft.detection import sources
from keras_ft.detection.sources import DetSet

CLASSES = ["cat", "dog"]
# image stem -> ((height, width), [(class, [x1, y1, x2, y2] pixel edges)]); "c" has no objects.
OBJECTS = {
    "a": ((24, 32), [(0, [2, 3, 10, 12]), (1, [5, 1, 32, 20])]),
    "b": ((20, 16), [(1, [0, 0, 16, 20])]),
    "c": ((18, 18), []),
}
COCO_IDS = {0: 10, 1: 42}  # arbitrary category ids: class i is the i-th by id


def _image(path, size, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _coco(root, objects=OBJECTS, name="ann.json"):
    images, annotations = [], []
    for k, (stem, (size, boxes)) in enumerate(sorted(objects.items())):
        _image(os.path.join(root, "images", stem + ".png"), size, k)
        images.append({"id": 100 + k, "file_name": stem + ".png", "height": size[0], "width": size[1]})
        for label, (x1, y1, x2, y2) in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + k, "iscrowd": 0,
                                "category_id": COCO_IDS[label], "bbox": [x1, y1, x2 - x1, y2 - y1]})
    categories = [{"id": COCO_IDS[1], "name": "dog"}, {"id": COCO_IDS[0], "name": "cat"}]  # unsorted
    doc = {"images": images, "annotations": annotations, "categories": categories}
    ann = _write(os.path.join(root, name), json.dumps(doc, indent=1))
    return f"coco:{os.path.join(root, 'images')},{ann}"


def _voc_xml(stem, size, boxes, extra=""):
    objects = "".join(
        f"  <object>\n    <name>{CLASSES[label]}</name>\n    <difficult>0</difficult>\n"
        f"    <bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax>"
        f"<ymax>{y2}</ymax></bndbox>\n  </object>\n"
        for label, (x1, y1, x2, y2) in boxes
    )
    return (f"<annotation>\n  <filename>{stem}.png</filename>\n  <size><width>{size[1]}</width>"
            f"<height>{size[0]}</height><depth>3</depth></size>\n{extra}{objects}</annotation>\n")


def _voc(root, objects=OBJECTS, classes=True):
    for k, (stem, (size, boxes)) in enumerate(sorted(objects.items())):
        _image(os.path.join(root, "JPEGImages", stem + ".png"), size, k)
        _write(os.path.join(root, "Annotations", stem + ".xml"), _voc_xml(stem, size, boxes))
    if classes:
        _write(os.path.join(root, "classes.txt"), "\n".join(CLASSES) + "\n")
    return f"voc:{root}"


def _yolo(root, objects=OBJECTS, classes=True):
    for k, (stem, (size, boxes)) in enumerate(sorted(objects.items())):
        _image(os.path.join(root, "images", stem + ".png"), size, k)
        height, width = size
        lines = [f"{label} {(x1 + x2) / 2 / width!r} {(y1 + y2) / 2 / height!r} "
                 f"{(x2 - x1) / width!r} {(y2 - y1) / height!r}\n"
                 for label, (x1, y1, x2, y2) in boxes]
        _write(os.path.join(root, "labels", stem + ".txt"), "".join(lines))
    if classes:
        _write(os.path.join(root, "classes.txt"), "\n".join(CLASSES) + "\n")
    return f"yolo:{root}"


WRITERS = {"coco": _coco, "voc": _voc, "yolo": _yolo}


def _stems(data):
    return [os.path.splitext(os.path.basename(p))[0] for p in data.images]


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("kind", sources.KINDS)
def test_each_format_reads_the_same_objects(tmp_path, kind):
    data, report = sources.load_det_source(WRITERS[kind](str(tmp_path)))
    assert isinstance(data, DetSet) and len(data) == 3 and data.val_mask is None
    assert _stems(data) == ["a", "b", "c"] and data.class_names == CLASSES
    assert data.sizes.dtype == np.int32 and data.sizes.tolist() == [[24, 32], [20, 16], [18, 18]]
    for i, (_, boxes) in enumerate(OBJECTS.values()):
        assert data.boxes[i].dtype == np.float32 and data.boxes[i].shape == (len(boxes), 4)
        np.testing.assert_allclose(data.boxes[i], np.reshape([b for _, b in boxes], (-1, 4)),
                                   atol=1e-6)
        assert data.classes[i].dtype == np.int32
        assert data.classes[i].tolist() == [label for label, _ in boxes]
    assert data.labels.tolist() == [0, 0, 0]
    assert report.objects == {"cat": 1, "dog": 2} and report.empty_images == 1  # "c" kept
    assert report.images == 3 and report.skipped == [] and report.clipped == 0
    assert any("Objects per class: cat 1, dog 2" in line for line in report.lines())
    assert json.loads(report.to_json())["empty_images"] == 1


def test_voc_coordinates_are_one_based(tmp_path):
    _image(tmp_path / "JPEGImages" / "x.png", (10, 10))
    xml = _voc_xml("x", (10, 10), []).replace(
        "</annotation>", "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>10</xmax><ymax>4</ymax></bndbox></object></annotation>")
    _write(tmp_path / "Annotations" / "x.xml", xml)
    data, _ = sources.load_det_source(f"voc:{tmp_path}")
    assert data.boxes[0].tolist() == [[0, 0, 10, 4]]  # pixels 1..10 inclusive = edges 0..10
    assert data.class_names == ["cat"]  # no classes.txt: the names seen


def test_yolo_is_normalised_by_the_image_size(tmp_path):
    _image(tmp_path / "images" / "x.png", (24, 32))
    _write(tmp_path / "labels" / "x.txt", "1 0.5 0.5 0.5 0.25\n\n")  # a blank line is fine
    _write(tmp_path / "data.yaml", "path: .\nnames:\n  0: cat\n  1: dog\n")  # no classes.txt
    data, _ = sources.load_det_source(f"yolo:{tmp_path}")
    assert data.boxes[0].tolist() == [[8, 9, 24, 15]] and data.classes[0].tolist() == [1]
    assert data.class_names == CLASSES


def test_coco_category_ids_are_remapped_and_crowds_left_out(tmp_path):
    source = _coco(str(tmp_path))
    path = source.split(",")[1]
    doc = json.load(open(path))
    doc["annotations"].append({"image_id": 101, "category_id": 42, "bbox": [1, 1, 5, 5], "iscrowd": 1})
    _write(path, json.dumps(doc))
    data, report = sources.load_det_source(source, "fail")  # crowds are no failure
    assert data.class_names == ["cat", "dog"] and data.classes[1].tolist() == [1]  # id 42 -> 1
    assert report.skipped == [(f"{path}:annotations[3]", report.skipped[0][1])]
    assert "crowd" in report.skipped[0][1]


# ------------------------------------------------------------------ always errors


def _edit(path, old, new):
    text = open(path).read()
    assert old in text
    _write(path, text.replace(old, new, 1))


ALWAYS = {  # name -> (kind, break the written set, what the message names)
    "bad json": ("coco", lambda r: _edit(f"{r}/ann.json", '"images": [', '"images": [,'),
                 "ann.json:2:"),
    "bad xml": ("voc", lambda r: _edit(f"{r}/Annotations/b.xml", "</size>", "</sise>"),
                "b.xml:3"),
    "yolo 4 numbers": ("yolo", lambda r: _write(f"{r}/labels/c.txt", "\n0 0.5 0.5 0.1\n"),
                       "c.txt:2"),
    "coco negative w": ("coco", lambda r: _edit(f"{r}/ann.json", "16,", "-16,"),
                        "ann.json:annotations[2]"),
    "voc reversed": ("voc", lambda r: _edit(f"{r}/Annotations/a.xml", "<xmax>10<", "<xmax>1<"),
                     "a.xml:4"),
    "yolo class": ("yolo", lambda r: _write(f"{r}/labels/c.txt", "2 0.5 0.5 0.1 0.1\n"),
                   "c.txt:1"),
    "coco category": ("coco", lambda r: _edit(f"{r}/ann.json", '"category_id": 42', '"category_id": 7'),
                      "ann.json:annotations[1]"),
    "voc class": ("voc", lambda r: _edit(f"{r}/Annotations/b.xml", ">dog<", ">cow<"), "b.xml:4"),
    "coco extra image": ("coco", lambda r: _image(f"{r}/images/d.png", (8, 8)), "'d.png'"),
    "coco missing image": ("coco", lambda r: os.remove(f"{r}/images/b.png"), "'b.png'"),
    "coco size": ("coco", lambda r: _edit(f"{r}/ann.json", '"height": 20', '"height": 21'),
                  "ann.json:images[1]"),
    "voc missing image": ("voc", lambda r: os.remove(f"{r}/JPEGImages/a.png"), "a.xml"),
    "yolo label without image": ("yolo", lambda r: os.remove(f"{r}/images/a.png"), "a.txt"),
    "yolo no classes": ("yolo", lambda r: os.remove(f"{r}/classes.txt"), "classes.txt"),
    "doctype": ("voc", lambda r: _edit(f"{r}/Annotations/c.xml", "<annotation>",
                                       '<!DOCTYPE a [<!ENTITY x "y">]><annotation>'), "c.xml"),
}


@pytest.mark.parametrize("case", sorted(ALWAYS))
def test_always_an_error_naming_the_file(tmp_path, case):
    kind, breaks, named = ALWAYS[case]
    source = WRITERS[kind](str(tmp_path))
    breaks(str(tmp_path))
    for policy in ("skip", "fail"):
        with pytest.raises(ValueError) as e:
            sources.load_det_source(source, policy)
        message = str(e.value)
        assert named in message and "\n" not in message, message
    if case == "doctype":
        assert "DOCTYPE" in message
    if case == "coco extra image":
        assert "3 listed, 4 image files" in message


# ------------------------------------------------------------------ skip or fail


def _zero_area(r):
    _write(f"{r}/labels/c.txt", "0 0.5 0.5 0 0.2\n")
    return f"{r}/labels/c.txt:1", 3


def _outside(r):
    _write(f"{r}/labels/c.txt", "0 1.5 0.5 0.2 0.2\n")  # x 1.4..1.6 of the width
    return f"{r}/labels/c.txt:1", 3


def _unreadable(r):
    with open(f"{r}/images/b.png", "r+b") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then garbage
    return f"{r}/images/b.png", 2


def _no_label(r):
    os.remove(f"{r}/labels/c.txt")
    return f"{r}/images/c.png", 2


@pytest.mark.parametrize("breaks", [_zero_area, _outside, _unreadable, _no_label],
                         ids=lambda f: f.__name__)
def test_skip_lists_fail_raises(tmp_path, breaks):
    source = _yolo(str(tmp_path))
    where, left = breaks(str(tmp_path))
    data, report = sources.load_det_source(source, "skip")
    assert len(data) == left and [w for w, _ in report.skipped] == [where]
    assert any(where in line for line in report.lines())
    with pytest.raises(ValueError, match="bad_files=skip") as e:
        sources.load_det_source(source, "fail")
    assert str(e.value).startswith(where + ": ")


def test_partly_outside_is_clipped_and_counted(tmp_path):
    source = _yolo(str(tmp_path))
    _write(f"{tmp_path}/labels/c.txt", "1 0.9 0.5 0.4 0.2\n")  # x 0.7..1.1 of 18 px
    data, report = sources.load_det_source(source)
    np.testing.assert_allclose(data.boxes[2], [[12.6, 7.2, 18, 10.8]], atol=1e-5)
    assert report.clipped == 1 and report.skipped == []
    with pytest.raises(ValueError, match=r"c\.txt:1: box .* partly outside its 18x18 image"):
        sources.load_det_source(source, "fail")


def test_nothing_usable_is_an_error(tmp_path):
    source = _yolo(str(tmp_path), {"c": ((8, 8), [])})
    with pytest.raises(ValueError, match="no usable object"):
        sources.load_det_source(source)


# ------------------------------------------------------------------ splits


def test_split_for_run_is_seeded(tmp_path):
    objects = {f"i{k}": ((8, 8 + k), [(k % 2, [0, 0, 4, 4])]) for k in range(10)}
    data, _ = sources.load_det_source(_yolo(str(tmp_path), objects))
    spec = types.SimpleNamespace(val_fraction=0.3, train_per_class=0)
    train, val = sources.split_for_run(data, spec, seed=3)
    assert len(train) == 7 and len(val) == 3 and train.val_mask is None
    assert sorted(train.images + val.images) == sorted(data.images)
    again = sources.split_for_run(data, spec, seed=3)[1]
    assert again.images == val.images and again.sizes.tolist() == val.sizes.tolist()
    i = data.images.index(val.images[0])  # boxes, classes and sizes travel with their image
    assert val.sizes[0].tolist() == data.sizes[i].tolist()
    assert val.classes[0].tolist() == data.classes[i].tolist()


@pytest.mark.parametrize("kind", ["voc", "yolo", "coco"])
def test_own_split(tmp_path, kind):
    train_objects = {k: OBJECTS[k] for k in ("a", "c")}
    if kind == "coco":
        train = _coco(str(tmp_path / "train"), train_objects)[5:]
        val = _coco(str(tmp_path / "val"), {"b": OBJECTS["b"]})[5:]
        source = f"coco:{train};{val}"
    else:
        WRITERS[kind](str(tmp_path / "train"), train_objects, classes=False)
        WRITERS[kind](str(tmp_path / "val"), {"b": OBJECTS["b"]}, classes=False)
        _write(tmp_path / "classes.txt", "cat\ndog\n")
        source = f"{kind}:{tmp_path}"
    data, _ = sources.load_det_source(source)
    assert _stems(data) == ["a", "c", "b"] and data.val_mask.tolist() == [False, False, True]
    train, val = sources.split_for_run(data, types.SimpleNamespace(val_fraction=0.5,
                                                                   train_per_class=0), seed=0)
    assert _stems(train) == ["a", "c"] and _stems(val) == ["b"] and val.val_mask is None

"""Where training images come from: the `data.source` config key.

Each reader returns a `keras_ft.data.ImageSet` and fails with one line that
names the file, folder or dataset at fault and what to do about it.

    folder:PATH   one sub-folder per class (class names: the sorted folder
                  names); images at any depth inside a class folder, taken in
                  sorted order. If PATH has `train/` and `val/` (or
                  `validation/`) folders with the same class sub-folders,
                  they are the train/validation split.
    csv:PATH      a CSV file with a header and the columns `path` (relative
                  to the CSV's folder, or absolute) and `label`: class names
                  (classes sorted by name) or integers 0..K-1 (class names
                  "0".."K-1", K = `num_classes` or the largest label + 1).
    tfds:NAME     a prepared TensorFlow Datasets dataset, NAME as `tfds.load`
                  takes it (`tf_flowers`, `cifar10:3.0.2`, `imagenette/160px`);
                  class names from its ClassLabel feature. Prepared as
                  ArrayRecord, its images are read by index; as TFRecord,
                  into memory, still encoded (keras_ft.tfds_source).
    sample:NAME   a small real image set built from files that ship in a
                  package (see `keras_ft.samples`), read as a folder.
    records:PATH  a folder `launch.pack` wrote: the images of a folder or CSV
                  in ArrayRecord files, read by index (keras_ft.records).

Files and TFDS images are scanned by `keras_ft.validate` before training;
missing or broken ones are bad files under its skip/fail policy.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Sequence

from absl import logging
import numpy as np

from keras_ft import limits
from keras_ft.data import ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
KINDS = ("folder", "csv", "tfds", "sample", "records")
VAL_FOLDERS = ("val", "validation")


def load_source(
    source: str,
    *,
    num_classes: int = 0,
    tfds_split: str = "train",
    tfds_val_split: str = "",
    tfds_data_dir: str = "",
    tfds_download: bool = False,
    tfds_image_key: str = "image",
    tfds_label_key: str = "label",
) -> ImageSet:
    """Resolves a `data.source` string such as `folder:/data/flowers`.

    Args:
        source: `KIND:ARGUMENT`, KIND one of `KINDS` (this module's docstring).
        num_classes: the classes the data must have; 0 = whatever it has. For
            a CSV with integer labels it is the label range.
        tfds_split, ...: the `data.tfds.*` config keys, for `tfds:` sources
            (see `from_tfds`).
    """
    kind, sep, arg = source.partition(":")
    if not sep or kind not in KINDS or not arg:
        raise ValueError(
            f"Unknown data.source {source!r}. Use one of: "
            + ", ".join(f"{k}:..." for k in KINDS)
            + " (e.g. folder:/path/to/images)."
        )
    if kind == "csv":
        return from_csv(arg, num_classes)
    if kind == "tfds":
        from keras_ft.tfds_source import from_tfds  # TFDS is slow to import

        return from_tfds(
            arg, tfds_split, tfds_val_split, tfds_data_dir, tfds_download,
            tfds_image_key, tfds_label_key,
        )
    if kind == "records":
        from keras_ft import records

        return records.open_records(arg)
    if kind == "sample":
        from keras_ft import samples  # only the quickstart needs its packages

        return from_folder(samples.materialize(arg))
    return from_folder(arg)


# ------------------------------------------------------------------ folders


def from_folder(path: str) -> ImageSet:
    """Reads a folder with one sub-folder of images per class.

    Class names are the sub-folder names in sorted order. Images may sit at
    any depth inside a class folder; they are taken in sorted order of their
    paths, so the same folder always gives the same labels. Hidden files and
    folders (names starting with ".") are skipped: `.ipynb_checkpoints`
    holds copies. If `path` has a `train/` folder, it must also have `val/`
    or `validation/`, each with the same class sub-folders: that is then the
    train/validation split (`ImageSet.val_mask`).
    """
    if not os.path.isdir(path):
        raise ValueError(f"Data folder {path!r} does not exist or is not a folder.")
    split = own_split_folders(path)
    if split is None:
        files, labels, class_names = _read_classes(path)
        return ImageSet(files, np.asarray(labels, np.int32), class_names, root=path)
    train_dir, val_dir = split
    train_files, train_labels, class_names = _read_classes(train_dir)
    val_files, val_labels, _ = _read_classes(val_dir)
    return ImageSet(
        train_files + val_files,
        np.asarray(train_labels + val_labels, np.int32),
        class_names,
        val_mask=np.arange(len(train_files) + len(val_files)) >= len(train_files),
        root=path,
    )


def own_split_folders(path: str) -> tuple[str, str] | None:
    """The train/validation split a data folder gives itself, if it has one.

    A folder of class sub-folders has one when it has a `train/` folder:
    then it must also have exactly one of `VAL_FOLDERS`, with the same class
    sub-folders. Its other sub-folders are ignored (and logged). Image and
    text folders (`keras_ft.text_sources`) follow this one rule.

    Args:
        path: an existing folder.

    Returns:
        `(train_dir, val_dir)`, or None when `path` has no `train/` folder
        (its sub-folders are then the classes).

    Raises:
        ValueError: there is no validation folder or both, or the two
            folders' class sub-folders differ; the message names the folder.
    """
    folders = sub_folders(path)
    if "train" not in folders:
        return None
    val_names = [name for name in VAL_FOLDERS if name in folders]
    if len(val_names) != 1:
        problem = "no val/ or validation/ folder" if not val_names else "both val/ and validation/"
        raise ValueError(
            f"Data folder {path!r} has a train/ folder and {problem}: give it one "
            "validation folder with the same class sub-folders, or point "
            f"data.source at {os.path.join(path, 'train')} to split that by seed "
            "(or, if 'train' is a class, rename its folder)."
        )
    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, val_names[0])
    train_classes, val_classes = sub_folders(train_dir), sub_folders(val_dir)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        where, other, names = (
            (train_dir, val_dir, only_train) if only_train
            else (val_dir, train_dir, sorted(set(val_classes) - set(train_classes)))
        )
        raise ValueError(
            f"Class folder {names[0]!r} is in {where} but not in {other}: the "
            "training and validation folders need the same class sub-folders."
        )
    ignored = sorted(set(folders) - {"train", val_names[0]})
    if ignored:
        logging.info(
            "Data folder %s: train/ and %s/ are the split; ignoring %s.",
            path, val_names[0], ", ".join(f"{name}/" for name in ignored),
        )
    return train_dir, val_dir


def sub_folders(path: str) -> list[str]:
    """The sorted names of `path`'s sub-folders, hidden ones left out."""
    return sorted(
        name for name in os.listdir(path)
        if not name.startswith(".") and os.path.isdir(os.path.join(path, name))
    )


def _read_classes(path: str) -> tuple[list[str], list[int], list[str]]:
    """`(files, labels, class_names)` of a folder of class sub-folders."""
    class_names = sub_folders(path)
    if len(class_names) < 2:
        raise ValueError(
            f"Data folder {path!r} has {len(class_names)} class sub-folder(s); "
            "put the images of each class (at least 2) in a sub-folder of their own."
        )
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(path, name)
        found = _image_files(class_dir)
        if not found:
            raise ValueError(
                f"Class folder {class_dir!r} has no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove it."
            )
        files += found
        labels += [label] * len(found)
    return files, labels, class_names


def _image_files(class_dir: str) -> list[str]:
    """Image files at any depth under `class_dir`, sorted, each once.

    A link to a folder is followed only if it stays inside `class_dir` and
    leads to a folder not yet read: one that leaves it (`cat/up -> ..`)
    would give the images it reaches a second label, one already read (a
    loop) would list them twice. Such links are returned as files, which
    the scan lists as bad ("not a regular file (folder, through a link)").
    """
    found, visited = [], set()
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        visited.add(os.path.realpath(root))
        follow = []
        # Real folders first, so that a link to one of them is the second path.
        for d in sorted(dirs, key=lambda d: (os.path.islink(os.path.join(root, d)), d)):
            full = os.path.join(root, d)
            if d.startswith("."):
                continue
            if os.path.islink(full) and (
                os.path.realpath(full) in visited or not limits.inside(full, class_dir)
            ):
                found.append(full)
                continue
            follow.append(d)
            visited.add(os.path.realpath(full))
        dirs[:] = follow
        found += [
            os.path.join(root, f) for f in files
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


# ---------------------------------------------------------------------- CSV

_INTEGER = re.compile(r"[+-]?\d+")


def from_csv(path: str, num_classes: int = 0) -> ImageSet:
    """Reads a CSV file of `path,label` rows (see this module's docstring).

    The first line is the header; other columns are allowed and ignored;
    blank lines are skipped; fields are stripped of surrounding spaces.
    Labels are integers if every one is an integer, class names if none is;
    a mix is an error. Files that are missing or broken are left to
    `keras_ft.validate` (skipped and listed, or a stop, as for folders);
    errors in the CSV itself name its line.

    Args:
        path: the CSV file.
        num_classes: for integer labels, the number of classes (labels must
            be below it); 0 = the largest label + 1. For class names, the
            number of distinct names it must match; 0 = any.
    """
    if not os.path.isfile(path):
        raise ValueError(f"CSV file {path!r} does not exist or is not a file.")
    header, rows = _read_rows(path)
    base = os.path.dirname(os.path.abspath(path))
    files, first_line = [], {}
    for line, file, _ in rows:
        full = os.path.normpath(os.path.join(base, file))  # `file` if absolute
        if full in first_line:
            raise ValueError(
                f"{path} lines {first_line[full]} and {line} both list {file!r}: "
                "list each image once (a copy could land in both the training "
                "and the validation split)."
            )
        first_line[full] = line
        files.append(full)
    if not any(os.path.exists(f) for f in files):
        line, file, _ = rows[0]
        raise ValueError(
            f"{path}: none of its {len(files)} image paths exists (line {line}: "
            f"{file!r} -> {files[0]}); relative paths are read from the CSV's "
            f"folder {base}."
        )

    labels, class_names = labels_from_column(
        [label for _, _, label in rows], [line for line, _, _ in rows], path, num_classes
    )
    return ImageSet(files, labels, class_names)


def _read_rows(path: str) -> tuple[list[str], list[tuple[int, str, str]]]:
    """The header and `(line number, path, label)` of every row."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
        reader = csv.reader(f, strict=True)  # a stray quote is an error, not a field
        try:
            header = [c.strip() for c in next(reader, [])]
            if not header:
                raise ValueError(
                    f"{path} line 1: no header; the first line must name the "
                    "columns, e.g. `path,label`."
                )
            missing = [c for c in ("path", "label") if c not in header]
            repeated = sorted({c for c in ("path", "label") if header.count(c) > 1})
            if missing or repeated:
                what = "no" if missing else "more than one"
                raise ValueError(
                    f"{path} line 1: {what} {' or '.join(missing or repeated)!r} "
                    f"column in the header {','.join(header)!r}; the first line "
                    "must name the columns once each, e.g. `path,label`."
                )
            path_at, label_at = header.index("path"), header.index("label")
            for fields in reader:
                line = reader.line_num
                if not any(field.strip() for field in fields):
                    continue
                if len(fields) != len(header):
                    raise ValueError(
                        f"{path} line {line}: {len(fields)} field(s) but the header "
                        f"has {len(header)}; quote fields that contain commas."
                    )
                file, label = fields[path_at].strip(), fields[label_at].strip()
                if not file:
                    raise ValueError(f"{path} line {line}: empty path; give the image file.")
                if not label:
                    raise ValueError(
                        f"{path} line {line}: empty label for {file!r}; give every "
                        "image its class."
                    )
                rows.append((line, file, label))
        except csv.Error as e:
            raise ValueError(f"{path} line {reader.line_num}: {e}; check its quotes.") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8.") from None
    if not rows:
        raise ValueError(f"{path} has a header but no rows: add one `path,label` line per image.")
    return header, rows


def labels_from_column(
    values: Sequence[str], lines: Sequence[int], path: str, num_classes: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Labels and class names from the `label` column of a CSV-like file.

    The values are integers 0..K-1 if every one is an integer (class names
    "0".."K-1", K = `num_classes` or the largest label + 1, each class used
    at least once), class names if none is (classes sorted by name); a mix
    is an error, and so is a single class. Image CSVs (`from_csv`) and text
    CSVs/TSVs (`keras_ft.text_sources`) share these rules.

    Args:
        values: the label of each row, stripped and not empty.
        lines: the line number each row starts on, for messages.
        path: the file, for messages.
        num_classes: for integer labels, the number of classes (labels must
            be below it); 0 = the largest label + 1. For class names, the
            number of distinct names it must match; 0 = any.

    Returns:
        int32 labels `[N]` (indices into the class names), and the class
        names in label order.

    Raises:
        ValueError: labels a classifier cannot train on; the message names
            the file, the line where there is one, and the fix.
    """
    is_integer = [_INTEGER.fullmatch(v) is not None for v in values]
    if all(is_integer):
        labels, class_names = _integer_labels([int(v) for v in values], lines, path, num_classes)
    elif any(is_integer):
        i, j = is_integer.index(True), is_integer.index(False)
        raise ValueError(
            f"{path}: line {lines[i]} has the integer label {values[i]!r} but "
            f"line {lines[j]} the class name {values[j]!r}; use class names "
            "throughout or integers 0..K-1 throughout."
        )
    else:
        class_names = sorted(set(values))
        if num_classes and num_classes != len(class_names):
            raise ValueError(
                f"{path}: data.num_classes={num_classes} but its labels name "
                f"{len(class_names)} classes ({', '.join(class_names[:10])}); fix "
                "the labels, or data.num_classes (0 = as many as the labels name)."
            )
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[v] for v in values]
    if len(class_names) < 2:
        raise ValueError(
            f"{path}: every row has the label {values[0]!r}; a classifier needs "
            "at least 2 classes."
        )
    return np.asarray(labels, np.int32), class_names


def _integer_labels(
    labels: list[int], lines: Sequence[int], path: str, num_classes: int
) -> tuple[list[int], list[str]]:
    count = num_classes or max(labels) + 1
    for line, label in zip(lines, labels):
        if not 0 <= label < count:
            allowed = (
                f"data.num_classes={num_classes} allows 0..{num_classes - 1}"
                if num_classes else "integer labels start at 0"
            )
            raise ValueError(
                f"{path} line {line}: label {label} is out of range ({allowed}); "
                "fix the label" + (" or data.num_classes." if num_classes else ".")
            )
    unused = sorted(set(range(count)) - set(labels))
    if unused and count > 1:
        source = f"data.num_classes={num_classes}" if num_classes else "the largest label"
        raise ValueError(
            f"{path}: no row has label {unused[0]}, but {source} makes the classes "
            f"0..{count - 1}; every class needs examples: number the classes 0..K-1 "
            + ("or fix data.num_classes." if num_classes else "without gaps.")
        )
    return labels, [str(i) for i in range(count)]

"""Where text-classification examples come from: a text task's `data.source`.

`load_text_source` reads every example into memory as a `TextSet` and returns
it with a `TextReport`. User files are checked as they are read: each
problem is a ValueError of one line that names the file (and the line of a
CSV) and what to do about it.

    folder:PATH          one sub-folder per class (class names: the sorted
                         folder names); each `.txt` file at any depth inside
                         a class folder is one example, its whole content
                         stripped. Other files are ignored (and counted). If
                         PATH has `train/` and `val/` (or `validation/`)
                         folders with the same class sub-folders, they are
                         the train/validation split (`TextSet.val_mask`).
    csv:PATH, tsv:PATH   a comma- (tab-) separated file whose header names
                         the columns `text` and `label` (others are ignored);
                         labels are class names (classes sorted by name) or
                         integers 0..K-1 (K = `num_classes` or the largest
                         label + 1), as for image CSVs (`keras_ft.sources`).
    fortunes:TOPIC,...   topics of Debian's `fortunes` package (files in
                         `FORTUNES_DIR`), one class each (sorted by name);
                         each `%`-separated record is one example. A small
                         real text set for demos and tests.

Texts must be UTF-8 (a byte-order mark is dropped) with no NUL byte. The
package's fortune files are not user files: a record that is not UTF-8 is
read as latin-1 and counted in the report.

A `TextSet` has the attributes and `subset` that `keras_ft.data.split`,
`split_as_given` and `per_class` use, so it is split as an `ImageSet` is.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time

import numpy as np

from keras_ft import limits, sources

KINDS = ("folder", "csv", "tsv", "fortunes")
TEXT_EXTENSION = ".txt"
FORTUNES_DIR = "/usr/share/games/fortunes"
_FORTUNE_INDEXES = (".dat", ".u8")  # strfile's index, and a link to the topic itself


@dataclasses.dataclass
class TextSet:
    """Texts with integer labels and the names of their classes.

    Attributes:
        texts: the examples, stripped.
        labels: int32 `[N]`, indices into `class_names`.
        class_names: the classes, in label order.
        origins: where each text came from, for messages: its file, or
            `file.csv:line 7`, `.../fortunes/food:line 12`.
        val_mask: bool `[N]`: the source's own train/validation split (True
            = validation), as `train/` and `val/` folders give it; None when
            `keras_ft.data.split` draws one by seed.
    """

    texts: list[str]
    labels: np.ndarray
    class_names: list[str]
    origins: list[str]
    val_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "TextSet":
        index = np.asarray(index, np.int64)
        return TextSet(
            [self.texts[i] for i in index],
            self.labels[index],
            self.class_names,
            [self.origins[i] for i in index],
            None if self.val_mask is None else self.val_mask[index],
        )


@dataclasses.dataclass
class TextReport:
    """What `load_text_source` read.

    Attributes:
        source: the `data.source` string.
        class_names: the classes, in label order.
        counts: examples per class name, in label order.
        num_examples: all examples.
        files_scanned: files looked at: for a folder every non-hidden file in
            its class folders, for a CSV 1, for fortunes the topic files.
        ignored_files: of those, the ones not read (not `.txt`, or links to
            folders, which are not followed).
        latin1_records: fortune records that were not UTF-8, read as latin-1.
        seconds: time the reading took.
    """

    source: str
    class_names: list[str]
    counts: dict[str, int]
    num_examples: int
    files_scanned: int
    ignored_files: int = 0
    latin1_records: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """A readable summary, one string per line."""
        ignored = (
            f", {self.ignored_files:,} ignored (not {TEXT_EXTENSION})" if self.ignored_files else ""
        )
        lines = [
            f"Read {self.num_examples:,} texts in {len(self.class_names)} classes from "
            f"{self.source} ({self.files_scanned:,} files scanned{ignored}; {self.seconds:.1f}s)."
        ]
        sizes = [n for n in self.counts.values() if n]
        imbalance = (
            f" (largest/smallest {max(sizes) / min(sizes):.1f}x)"
            if sizes and max(sizes) > min(sizes) else ""
        )
        per_class = ", ".join(f"{name} {n:,}" for name, n in self.counts.items())
        lines.append(f"Texts per class: {per_class}{imbalance}.")
        if self.latin1_records:
            lines.append(
                f"{self.latin1_records:,} fortune record(s) are not UTF-8 and were read as latin-1."
            )
        return lines

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def load_text_source(source: str, num_classes: int = 0) -> tuple[TextSet, TextReport]:
    """Resolves a text `data.source` string such as `csv:/data/reviews.csv`.

    Args:
        source: `KIND:ARGUMENT`, KIND one of `KINDS` (this module's docstring).
        num_classes: the classes the data must have; 0 = whatever it has. For
            a CSV with integer labels it is the label range.

    Returns:
        The examples, and a `TextReport` of what was read.

    Raises:
        ValueError: an unknown source, or data a classifier cannot train on;
            the message names the file (and line) and the fix.
    """
    kind, sep, arg = source.partition(":")
    if not sep or kind not in KINDS or not arg:
        raise ValueError(
            f"Unknown text data.source {source!r}. Use one of: "
            + ", ".join(f"{k}:..." for k in KINDS)
            + " (e.g. csv:/path/to/texts.csv)."
        )
    start = time.monotonic()
    ignored = latin1 = 0
    if kind == "folder":
        texts, files_scanned, ignored = _read_folder(arg)
    elif kind == "fortunes":
        texts, latin1 = _read_fortunes(arg)
        files_scanned = len(texts.class_names)
    else:
        texts = _read_csv(arg, num_classes, delimiter="," if kind == "csv" else "\t")
        files_scanned = 1
    names = texts.class_names
    if num_classes and num_classes != len(names):  # a CSV's labels were checked already
        raise ValueError(
            f"{source}: data.num_classes={num_classes} but it has {len(names)} classes "
            f"({', '.join(names[:10])}); fix data.num_classes (0 = as many as the data has)."
        )
    counts = np.bincount(texts.labels, minlength=len(names))
    report = TextReport(
        source, list(names), dict(zip(names, counts.tolist())), len(texts), files_scanned,
        ignored, latin1, time.monotonic() - start,
    )
    return texts, report


def _decode(blob: bytes, where: str, lines: bool = False) -> str:
    """`blob` as UTF-8 text (a byte-order mark dropped), or a ValueError naming
    `where` (and the line, if `lines`) and the offending byte."""

    def at(offset: int) -> str:
        line = blob.count(b"\n", 0, offset) + 1
        return f"{where} line {line}" if lines else where

    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{at(e.start)} is not UTF-8 (byte 0x{blob[e.start]:02x} at offset {e.start}); "
            "re-save it as UTF-8."
        ) from None
    if "\0" in text:
        offset = blob.index(b"\0")
        raise ValueError(
            f"{at(offset)} has a NUL byte (at offset {offset}): a binary file, not text; "
            "remove it, or re-save it as plain UTF-8 text."
        )
    return text.removeprefix("\ufeff")  # the byte-order mark some editors write


# ------------------------------------------------------------------ folders


def _read_folder(path: str) -> tuple[TextSet, int, int]:
    """Reads a folder with one sub-folder of `.txt` files per class.

    The same layout as an image folder (`keras_ft.sources.from_folder`):
    class names are the sorted sub-folder names, files are taken in sorted
    order of their paths, hidden files and folders are skipped, and
    `train/` with `val/` (or `validation/`) is the source's own split.
    Links to folders are not followed; a link to a file is read only if it
    stays inside `path`.

    Returns:
        The texts, the number of files scanned and of those ignored.
    """
    if not os.path.isdir(path):
        raise ValueError(f"Data folder {path!r} does not exist or is not a folder.")
    split = sources.own_split_folders(path)
    if split is None:
        return _read_classes(path, path)
    train_dir, val_dir = split
    train, train_scanned, train_ignored = _read_classes(train_dir, path)
    val, val_scanned, val_ignored = _read_classes(val_dir, path)
    texts = TextSet(
        train.texts + val.texts,
        np.concatenate([train.labels, val.labels]),
        train.class_names,
        train.origins + val.origins,
        val_mask=np.arange(len(train) + len(val)) >= len(train),
    )
    return texts, train_scanned + val_scanned, train_ignored + val_ignored


def _read_classes(path: str, root: str) -> tuple[TextSet, int, int]:
    """The texts of a folder of class sub-folders, and the number of files
    scanned and of those ignored; links must stay inside `root`."""
    class_names = sources.sub_folders(path)
    if len(class_names) < 2:
        raise ValueError(
            f"Data folder {path!r} has {len(class_names)} class sub-folder(s); put the "
            f"{TEXT_EXTENSION} files of each class (at least 2) in a sub-folder of their own."
        )
    texts, labels, origins, scanned, ignored = [], [], [], 0, 0
    for label, name in enumerate(class_names):
        class_dir = os.path.join(path, name)
        files, others = _text_files(class_dir)
        scanned += len(files) + others
        ignored += others
        if not files:
            raise ValueError(
                f"Class folder {class_dir!r} has no {TEXT_EXTENSION} files ({others} other "
                f"file(s) ignored); add {TEXT_EXTENSION} files or remove the folder."
            )
        for file in files:
            texts.append(_read_text_file(file, root))
            labels.append(label)
            origins.append(file)
    return TextSet(texts, np.asarray(labels, np.int32), class_names, origins), scanned, ignored


def _text_files(class_dir: str) -> tuple[list[str], int]:
    """The `.txt` files at any depth under `class_dir`, sorted, and the number
    of other entries (files, links to folders) not read."""
    found, others = [], 0
    for root, dirs, files in os.walk(class_dir):  # links to folders are not followed
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        others += sum(os.path.islink(os.path.join(root, d)) for d in dirs)
        for f in files:
            if f.startswith("."):
                continue
            if f.lower().endswith(TEXT_EXTENSION):
                found.append(os.path.join(root, f))
            else:
                others += 1
    return sorted(found), others


def _read_text_file(file: str, root: str) -> str:
    try:
        blob = limits.read_regular(file, root)
    except limits.Refused as e:
        raise ValueError(
            f"{file}: {e.reason}; replace it with a regular text file or remove it."
        ) from None
    text = _decode(blob, file).strip()
    if not text:
        raise ValueError(
            f"{file} is empty{' (only white space)' if blob else ''}; write its text or remove it."
        )
    return text


# ---------------------------------------------------------------------- CSV


def _read_csv(path: str, num_classes: int = 0, delimiter: str = ",") -> TextSet:
    """Reads a CSV (or, with `delimiter="\\t"`, TSV) file of `text,label` rows.

    The first line is the header; other columns are allowed and ignored;
    blank lines are skipped; a quoted field may hold newlines. Texts and
    labels are stripped of surrounding white space. Labels follow the rules
    of image CSVs (`keras_ft.sources.labels_from_column`).

    Args:
        path: the file.
        num_classes: for integer labels, the number of classes (labels must
            be below it); 0 = the largest label + 1. For class names, the
            number of distinct names it must match; 0 = any.
        delimiter: the field separator.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Text file {path!r} does not exist or is not a file.")
    with open(path, "rb") as f:
        text = _decode(f.read(), path, lines=True)
    rows = _read_rows(path, text, delimiter)
    labels, class_names = sources.labels_from_column(
        [label for _, _, label in rows], [line for line, _, _ in rows], path, num_classes
    )
    return TextSet(
        [t for _, t, _ in rows],
        labels,
        class_names,
        [f"{path}:line {line}" for line, _, _ in rows],
    )


def _read_rows(path: str, text: str, delimiter: str) -> list[tuple[int, str, str]]:
    """`(line number, text, label)` of every row."""
    example = "`text,label`" if delimiter == "," else "`text<tab>label`"
    separators = "commas" if delimiter == "," else "tabs"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows = []
    try:
        header = [c.strip() for c in next(reader, [])]
        if not header:
            raise ValueError(
                f"{path} line 1: no header; the first line must name the columns, e.g. {example}."
            )
        missing = [c for c in ("text", "label") if c not in header]
        repeated = sorted({c for c in ("text", "label") if header.count(c) > 1})
        if missing or repeated:
            what = "no" if missing else "more than one"
            raise ValueError(
                f"{path} line 1: {what} {' or '.join(map(repr, missing or repeated))} column; the "
                f"header has {', '.join(map(repr, header))}. The first line must name the "
                f"columns once each, e.g. {example}."
            )
        text_at, label_at = header.index("text"), header.index("label")
        line = reader.line_num + 1  # where the next row starts: a field may span lines
        for fields in reader:
            first, line = line, reader.line_num + 1
            if not any(field.strip() for field in fields):
                continue
            if len(fields) != len(header):
                raise ValueError(
                    f"{path} line {first}: {len(fields)} field(s) but the header has "
                    f"{len(header)}; quote fields that contain {separators}."
                )
            text, label = fields[text_at].strip(), fields[label_at].strip()
            if not text:
                raise ValueError(
                    f"{path} line {first}: empty text; give every row its text or remove the row."
                )
            if not label:
                raise ValueError(f"{path} line {first}: empty label; give every text its class.")
            rows.append((first, text, label))
    except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: {e}; check its quotes.") from None
    if not rows:
        raise ValueError(f"{path} has a header but no rows: add one {example} line per text.")
    return rows


# ----------------------------------------------------------------- fortunes


def fortune_topics() -> list[str]:
    """The topics in `FORTUNES_DIR`, sorted (a ValueError if it is missing)."""
    if not os.path.isdir(FORTUNES_DIR):
        raise ValueError(
            f"A fortunes: source needs Debian's fortunes package: apt-get install fortunes "
            f"(there is no folder {FORTUNES_DIR})."
        )
    return sorted(
        name for name in os.listdir(FORTUNES_DIR)
        if not name.startswith(".") and not name.endswith(_FORTUNE_INDEXES)
        and os.path.isfile(os.path.join(FORTUNES_DIR, name))
    )


def _read_fortunes(topics: str) -> tuple[TextSet, int]:
    """Reads topics of Debian's fortunes package, one class each.

    Args:
        topics: comma-separated topic names (files in `FORTUNES_DIR`), e.g.
            `computers,food`; the classes are their sorted names.

    Returns:
        The texts, and the number of records read as latin-1.
    """
    available = fortune_topics()
    names = [t.strip() for t in topics.split(",")]
    for name in names:
        if name not in available:
            raise ValueError(
                f"Unknown fortunes topic {name!r}. Choose from: {', '.join(available)}."
            )
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"fortunes:{topics} names {twice!r} twice; name each topic once.")
    if len(names) < 2:
        raise ValueError(
            f"fortunes:{topics} names 1 topic; a classifier needs at least 2 "
            "(e.g. fortunes:computers,food)."
        )
    texts, labels, origins, latin1 = [], [], [], 0
    class_names = sorted(names)
    for label, name in enumerate(class_names):
        file = os.path.join(FORTUNES_DIR, name)
        with open(file, "rb") as f:
            blob = f.read()
        before = len(texts)
        for line, record in _fortune_records(blob):
            try:
                text = record.decode("utf-8")
            except UnicodeDecodeError:
                text = record.decode("latin-1")
                latin1 += 1
            text = text.strip()
            if text:
                texts.append(text)
                labels.append(label)
                origins.append(f"{file}:line {line}")
        if len(texts) == before:
            raise ValueError(f"Fortunes topic file {file} has no records; choose another topic.")
    return TextSet(texts, np.asarray(labels, np.int32), class_names, origins), latin1


def _fortune_records(blob: bytes) -> list[tuple[int, bytes]]:
    """`(first line number, bytes)` of each record: a line holding only `%`
    ends one."""
    records, lines, first = [], [], 1
    for number, line in enumerate(blob.split(b"\n"), 1):
        if line.rstrip(b"\r") == b"%":
            records.append((first, b"\n".join(lines)))
            lines, first = [], number + 1
        else:
            lines.append(line)
    records.append((first, b"\n".join(lines)))
    return records

"""Images packed once into ArrayRecord shards, read by index: `records:DIR`.

A folder or CSV of a million files is slow to list, scan and open again at
every run, and a TFDS dataset prepared as TFRecords can only be read in
order. `pack` writes a source's images once, checked, into ArrayRecord
files (random access; `array_record` comes with tensorflow-datasets); a
run with `data.source="records:DIR"` then reads each image by its index
when the input pipeline needs it (`keras_ft.data.RecordImages`), so memory
holds the labels and indices only, whatever the data's size.

    DIR/keras_ft_records.json        what is in DIR (below); written last
    DIR/images-00000-of-00004.array_record ...   the encoded image files'
                                     bytes, unchanged, one record each, in
                                     the source's order
    DIR/labels.npy                   int32 [N]
    DIR/val_mask.npy                 bool [N], if the source has its own
                                     train/validation split

`keras_ft_records.json`: format, the number of records, the class names,
each shard's file, record count and size, the SHA-256 of `labels.npy`, and
the source packed. Opening checks every one of them. Records are written
one per group (`group_size:1`), uncompressed (images are compressed
already), so a read touches one record.

TFDS datasets prepared in the ArrayRecord format (`tfds build
--file_format=array_record`) are read the same way, by index
(`TfdsStore`), instead of into memory (`keras_ft.tfds_source`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time

import numpy as np
from absl import logging

from keras_ft import limits
from keras_ft.data import FILES, ImageSet, RecordImages

FORMAT = "keras_ft.records/1"
META = "keras_ft_records.json"
LABELS, VAL_MASK = "labels.npy", "val_mask.npy"
SHARD_PATTERN = "images-{:05d}-of-{:05d}.array_record"
WRITER_OPTIONS = "group_size:1,uncompressed"
DEFAULT_SHARD_MB = 512  # a shard's size when --shards is not given


class ArrayRecordStore:
    """The image records of a packed folder, read by index (thread-safe)."""

    def __init__(self, root: str, paths: list[str]):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.root = root
        self._source = ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def read(self, i: int) -> bytes:
        return self._source[i]

    def name(self, i: int) -> str:
        return f"{self.root} record #{i}"

    def describe(self) -> str:
        return f"ArrayRecord files in {self.root}"


def open_records(path: str) -> ImageSet:
    """Opens a folder `pack` wrote, as an `ImageSet` of `RecordImages`.

    Raises:
        ValueError: the folder is not a packed one, or a shard or the labels
            differ from what `keras_ft_records.json` says (named).
    """
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        hint = (" (an unfinished pack: pack again)" if os.path.isdir(path) and any(
            n.endswith(".array_record") for n in os.listdir(path)) else "")
        raise ValueError(
            f"data.source records:{path}: no {META} in {path!r}{hint}; write one with "
            f"`python -m launch.pack --source=folder:IMAGES --output_dir={path}`."
        )
    meta = _read_meta(meta_path)
    shard_paths = []
    for shard in meta["shards"]:
        file = os.path.join(path, os.path.basename(shard["file"]))
        if not os.path.isfile(file) or os.path.getsize(file) != shard["bytes"]:
            size = os.path.getsize(file) if os.path.isfile(file) else "missing"
            raise ValueError(
                f"{file}: expected {shard['bytes']} bytes ({META}), found {size}: the "
                "packed data is incomplete or was changed; pack it again."
            )
        shard_paths.append(file)
    labels = _load_checked(path, LABELS, meta["labels_sha256"], np.int32, meta["num_records"])
    val_mask = None
    if meta.get("val_mask_sha256"):
        val_mask = _load_checked(path, VAL_MASK, meta["val_mask_sha256"], np.bool_,
                                 meta["num_records"])
    store = ArrayRecordStore(path, shard_paths)
    if len(store) != meta["num_records"]:
        raise ValueError(
            f"{path}: the shards hold {len(store)} records, {META} says "
            f"{meta['num_records']}; pack it again."
        )
    num_classes = len(meta["class_names"])
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"{os.path.join(path, LABELS)}: labels outside [0, {num_classes}).")
    logging.info("Records %s: %d images in %d ArrayRecord file(s), packed from %s; read by "
                 "index.", path, len(store), len(shard_paths), meta.get("source", "?"))
    return ImageSet(
        RecordImages(store, np.arange(len(store))), labels, list(meta["class_names"]),
        val_mask=val_mask,
    )


def _read_meta(meta_path: str) -> dict:
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: not readable JSON ({e}); pack again.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: format {found!r}, this keras_ft reads {FORMAT!r}.")
    for key, kind in (("num_records", int), ("class_names", list), ("shards", list),
                      ("labels_sha256", str)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{meta_path}: key {key!r} missing or not a {kind.__name__}.")
    return meta


def _load_checked(root: str, name: str, sha256: str, dtype, count: int) -> np.ndarray:
    path = os.path.join(root, name)
    with open(path, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise ValueError(f"{path}: SHA-256 differs from {META}: the file was changed; pack again.")
    array = np.load(path, allow_pickle=False)
    if array.dtype != dtype or array.shape != (count,):
        raise ValueError(f"{path}: {array.dtype} {array.shape}, expected {np.dtype(dtype)} ({count},).")
    return array


# -------------------------------------------------------------------- writing


@dataclasses.dataclass
class Packed:
    """What `pack` wrote."""

    path: str
    num_records: int
    shards: int
    bytes: int
    seconds: float


def pack(data: ImageSet, out: str, source: str, shards: int = 0, progress=None) -> Packed:
    """Writes the images of `data` (files, checked already) into `out`.

    Every file's bytes go in unchanged, in `data`'s order, so a run on
    `records:OUT` reads the same images, labels and split as a run on the
    source (`write`).

    Args:
        data: an `ImageSet` of files (`keras_ft.sources`, after
            `keras_ft.validate.scan`).
        out: the folder to write; it must not exist.
        source: the `data.source` string packed, recorded in the metadata.
        shards: the number of ArrayRecord files; 0 = one per
            `DEFAULT_SHARD_MB` of images.
        progress: called as `progress(done, total)` every 1,000 images.
    """
    if data.kind != FILES:
        raise ValueError(
            f"pack: {source} holds {data.kind} images; launch.pack packs folders and CSVs "
            "(a TFDS dataset is read by index once prepared with "
            "`tfds build --file_format=array_record`)."
        )
    total = sum(os.path.getsize(p) for p in data.images)
    if shards <= 0:
        shards = max(1, -(-total // (DEFAULT_SHARD_MB * 2**20)))
    blobs = (limits.read_regular(path, data.root) for path in data.images)
    return write(out, blobs, data.labels, data.class_names, source, shards,
                 val_mask=data.val_mask, progress=progress)


def write(out: str, blobs, labels, class_names: list[str], source: str, shards: int = 1,
          val_mask=None, progress=None) -> Packed:
    """Writes encoded images into `out` as `open_records` reads them.

    The folder appears complete or not at all: it is written as
    `OUT.partial` and renamed when done (a leftover `.partial` from a killed
    write is removed first).

    Args:
        out: the folder to write; it must not exist.
        blobs: an iterable of the encoded images (bytes), `len(labels)` of
            them, consumed once in order (a generator: nothing held).
        labels: int `[N]`, indices into `class_names`.
        class_names: the classes, in label order.
        source: where the images came from, recorded in the metadata.
        shards: the number of ArrayRecord files, of consecutive records.
        val_mask: bool `[N]`, the source's own validation split, or None.
        progress: called as `progress(done, total)` every 1,000 images.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"--output_dir={out} exists; remove it or choose another folder.")
    start = time.perf_counter()
    labels = np.asarray(labels, np.int32)
    n = len(labels)
    shards = max(1, min(shards, n))
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    blobs = iter(blobs)
    shard_meta, image_bytes = [], 0
    for s in range(shards):
        name = SHARD_PATTERN.format(s, shards)
        writer = ArrayRecordWriter(os.path.join(partial, name), WRITER_OPTIONS)
        try:
            for i in range(bounds[s], bounds[s + 1]):
                blob = next(blobs, None)
                if blob is None:
                    raise ValueError(f"write: {i} images for {n} labels.")
                writer.write(blob)
                image_bytes += len(blob)
                if progress and (i + 1) % 1000 == 0:
                    progress(i + 1, n)
        finally:
            writer.close()
        shard_meta.append({"file": name, "records": int(bounds[s + 1] - bounds[s]),
                           "bytes": os.path.getsize(os.path.join(partial, name))})
    meta = {
        "format": FORMAT,
        "num_records": n,
        "class_names": list(class_names),
        "shards": shard_meta,
        "labels_sha256": _save(partial, LABELS, labels),
        "val_mask_sha256": (None if val_mask is None
                            else _save(partial, VAL_MASK, np.asarray(val_mask, bool))),
        "source": source,
        "image_bytes": image_bytes,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(partial, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    os.replace(partial, out)
    return Packed(out, n, shards, sum(s["bytes"] for s in shard_meta),
                  time.perf_counter() - start)


def _save(root: str, name: str, array: np.ndarray) -> str:
    path = os.path.join(root, name)
    np.save(path, array, allow_pickle=False)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------- TFDS in ArrayRecord


class TfdsStore:
    """The encoded images of TFDS splits prepared as ArrayRecord, read by
    index through `builder.as_data_source` (nothing decoded but the label).

    Args:
        builder: a prepared `tfds` builder.
        splits: the split specs, read one after the other as one index range.
        image_key: the image feature.
    """

    def __init__(self, builder, splits: list[str], image_key: str, label_key: str):
        import tensorflow_datasets as tfds

        self.builder, self.splits, self.image_key = builder, splits, image_key
        decoders = {image_key: tfds.decode.SkipDecoding()}
        self._sources = [builder.as_data_source(split=s, decoders=decoders) for s in splits]
        self._label_key = label_key
        self._starts = np.cumsum([0] + [len(s) for s in self._sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def split_sizes(self) -> list[int]:
        return [len(s) for s in self._sources]

    def _locate(self, i: int) -> tuple[int, int]:
        part = int(np.searchsorted(self._starts, i, side="right") - 1)
        return part, i - int(self._starts[part])

    def read(self, i: int) -> bytes:
        part, j = self._locate(i)
        return self._sources[part][j][self.image_key]

    def labels(self, progress=None) -> np.ndarray:
        """Every example's label: one pass over the records (images not decoded)."""
        labels = np.empty(len(self), np.int32)
        done = 0
        for source in self._sources:
            for start in range(0, len(source), 1024):
                chunk = source.__getitems__(range(start, min(start + 1024, len(source))))
                labels[done:done + len(chunk)] = [ex[self._label_key] for ex in chunk]
                done += len(chunk)
                if progress:
                    progress(done, len(self))
        return labels

    def name(self, i: int) -> str:
        part, j = self._locate(i)
        return f"{self.builder.name} {self.splits[part]} #{j}"

    def describe(self) -> str:
        return f"TFDS {self.builder.name} (ArrayRecord) in {self.builder.data_dir}"

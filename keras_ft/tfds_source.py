"""`tfds:NAME` sources: a prepared TensorFlow Datasets dataset as an `ImageSet`.

`keras_ft.sources.load_source` calls `from_tfds` for `data.source="tfds:NAME"`,
with the `data.tfds.*` config keys. A dataset prepared in the ArrayRecord
format (`tfds build --file_format=array_record`) is read by index when the
pipeline needs each image, nothing held but the labels; one prepared as
TFRecords (TFDS's default) is read into memory, encoded as TFDS stores it,
and scanned by `keras_ft.validate` like files. A
dataset that is not prepared fails at once, offline, in one line that says
what to prepare where (an offline download would retry for minutes).
"""

from __future__ import annotations

import difflib
import os
import re

import numpy as np
from absl import logging

from keras_ft.data import ImageSet

def from_tfds(
    name: str,
    split: str = "train",
    val_split: str = "",
    data_dir: str = "",
    download: bool = False,
    image_key: str = "image",
    label_key: str = "label",
) -> ImageSet:
    """Reads a TensorFlow Datasets dataset into memory, images still encoded.

    Offline, a dataset that is not prepared fails at once, with the command
    that prepares it, instead of after TFDS's minutes of download retries:
    with `download=False` nothing is fetched, and with `download=True` a
    dataset that only a manual download can prepare fails before trying.

    Args:
        name: the dataset as `tfds.builder` takes it: `NAME[/CONFIG][:VERSION]`.
        split: the TFDS split (spec) to train on, e.g. `train`, `train[:90%]`.
        val_split: the TFDS split to validate on, e.g. `validation` or `test`
            (`ImageSet.val_mask` marks it); "" = none: `data.split` draws one
            from `split` by seed.
        data_dir: where prepared datasets live; "" = TFDS's default
            (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
        download: download and prepare the dataset if it is not prepared.
        image_key, label_key: the features holding the image (an `Image`) and
            the label (a `ClassLabel`, whose `names` are the class names).
    """
    if val_split == split:
        raise ValueError(
            f"TFDS dataset {name!r}: data.tfds.val_split is data.tfds.split "
            f"({split!r}); validate on another split (e.g. validation, test) or "
            "on a seeded share of this one (data.tfds.val_split='')."
        )
    import tensorflow_datasets as tfds  # slow to import: only for tfds: sources

    try:
        builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir) or None)
    except tfds.core.registered.DatasetNotFoundError:  # its message lists all datasets
        known = sorted(set(tfds.list_builders()))
        close = difflib.get_close_matches(re.split("[/:]", name)[0], known, 3)
        hint = f"did you mean {', '.join(close)}?" if close else "tfds.list_builders() lists them."
        raise ValueError(f"Unknown TFDS dataset {name!r}: {hint}") from None
    except (ValueError, AssertionError) as e:  # an unknown config or version
        raise ValueError(f"TFDS dataset {name!r}: {_one_line(e)}") from None
    features = builder.info.features
    _check_feature(name, features, image_key, tfds.features.Image, "data.tfds.image_key")
    _check_feature(name, features, label_key, tfds.features.ClassLabel, "data.tfds.label_key")
    if features[image_key].np_dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"TFDS dataset {name!r}: feature {image_key!r} holds "
            f"{features[image_key].np_dtype} images; keras_ft reads 8- or 16-bit ones."
        )
    _prepare(builder, name, download)
    if _is_array_record(builder):
        return _by_index(builder, name, split, val_split, image_key, label_key)
    logging.info(
        "TFDS %s is stored as %s, read in order only: its images are read into memory. "
        "Prepare it with `tfds build %s --file_format=array_record` to read them by index.",
        name, builder.info.file_format.value if builder.info.file_format else "tfrecord",
        builder.name,
    )

    images, labels, names = _read_split(builder, name, split, "data.tfds.split", image_key, label_key)
    num_train = len(images)
    if val_split:
        more = _read_split(builder, name, val_split, "data.tfds.val_split", image_key, label_key)
        images, labels, names = images + more[0], labels + more[1], names + more[2]
    encoded = np.empty(len(images), object)  # an object array: no padding to the longest
    encoded[:] = images
    logging.info(
        "TFDS %s: %d images (%.1f MB encoded) read into memory from %s.",
        name, len(images), sum(map(len, images)) / 1e6, builder.data_dir,
    )
    return ImageSet(
        encoded,
        np.asarray(labels, np.int32),
        list(features[label_key].names),
        val_mask=np.arange(len(images)) >= num_train if val_split else None,
        names=names,
    )


def _is_array_record(builder) -> bool:
    import tensorflow_datasets as tfds

    return builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def _by_index(builder, name, split, val_split, image_key, label_key) -> ImageSet:
    """The splits as `RecordImages`: read by index when the pipeline needs
    them; only the labels are read now (one pass, images not decoded)."""
    from keras_ft.data import RecordImages
    from keras_ft.records import TfdsStore

    splits = [split] + ([val_split] if val_split else [])
    try:
        store = TfdsStore(builder, splits, image_key, label_key)
    except ValueError as e:  # an unknown split or a bad slice
        raise ValueError(f"TFDS dataset {name!r}, split {splits}: {_one_line(e)}") from None
    sizes = store.split_sizes()
    for spec, size in zip(splits, sizes):
        if not size:
            raise ValueError(f"TFDS dataset {name!r}, split {spec!r}: the split has no examples.")
    labels = store.labels()
    logging.info("TFDS %s: %d images in ArrayRecord files in %s, read by index.",
                 name, len(store), builder.data_dir)
    return ImageSet(
        RecordImages(store, np.arange(len(store))), labels,
        list(builder.info.features[label_key].names),
        val_mask=np.arange(len(store)) >= sizes[0] if val_split else None,
    )


def _read_split(builder, name: str, spec: str, key: str, image_key: str, label_key: str):
    """`(encoded images, labels, names)` of one TFDS split, in its stored order."""
    import tensorflow_datasets as tfds

    read = tfds.decode.PartialDecoding(  # only the two features, the image undecoded
        {image_key: True, label_key: True},
        decoders={image_key: tfds.decode.SkipDecoding()},
    )
    try:
        ds = builder.as_dataset(split=spec, decoders=read, shuffle_files=False)
    except ValueError as e:  # an unknown split or a bad slice
        raise ValueError(f"TFDS dataset {name!r}, {key}={spec!r}: {_one_line(e)}") from None
    images, labels = [], []
    for blobs, batch_labels in tfds.as_numpy(
        ds.map(lambda ex: (ex[image_key], ex[label_key])).batch(1024)
    ):
        images += list(blobs)
        labels += batch_labels.tolist()
    if not images:
        raise ValueError(f"TFDS dataset {name!r}, {key}={spec!r}: the split has no examples.")
    return images, labels, [f"{builder.name} {spec} #{i}" for i in range(len(images))]


def _check_feature(name: str, features, key: str, kind, config_key: str) -> None:
    if key in features and isinstance(features[key], kind):
        return
    choices = sorted(k for k in features.keys() if isinstance(features[k], kind))
    raise ValueError(
        f"TFDS dataset {name!r} has no {kind.__name__} feature {key!r}; its "
        f"{kind.__name__} features: {', '.join(choices) or 'none'}. "
        + (f"Set --config.{config_key}=NAME." if choices else "keras_ft cannot train on it.")
    )


def _prepare(builder, name: str, download: bool) -> None:
    """Makes sure the dataset is prepared, failing fast where it cannot be."""
    if builder.is_prepared():
        return
    root = os.fspath(builder.data_dir_root)
    build = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
    prepare = (
        f"run `tfds build {build} --data_dir={root}` on a machine with network "
        f"and copy {builder.data_dir} to the same path here"
    )
    if not download:
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in {root} (no "
            f"{builder.data_dir}) and data.tfds.download is False: {prepare}, or "
            "set --config.data.tfds.data_dir to the folder that has it, or "
            "--config.data.tfds.download=True to download it here."
        )
    manual_dir = os.path.join(root, "downloads", "manual")
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (
        os.path.isdir(manual_dir) and os.listdir(manual_dir)
    ):
        instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in {root} and only a manual "
            f"download can prepare it: put its files in {manual_dir} "
            f"({instructions[:300]}), or {prepare}."
        )
    logging.info("Downloading and preparing TFDS dataset %s in %s.", name, root)
    try:
        builder.download_and_prepare()
    except Exception as e:  # network, checksum, disk: TFDS raises many kinds
        raise ValueError(
            f"Downloading TFDS dataset {name!r} into {root} failed ({_one_line(e)}); "
            f"{prepare}."
        ) from e


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__

"""Packs a folder or CSV of images into ArrayRecord files: `python -m launch.pack`.

    python -m launch.pack --source=folder:/data/inat --output_dir=/data/inat_records
    python -m launch.train --config=configs/base.py \\
        --config.data.source=records:/data/inat_records --workdir=/tmp/inat

Every image is checked first, as `launch.train` checks a folder
(`keras_ft.validate`; `--bad_files=skip` leaves bad files out and lists
them, `fail` stops). Then the files' bytes are written unchanged, in the
source's order, with the labels, class names and the source's own
train/validation split if it has one (`keras_ft.records`). A run on
`records:OUT` reads the same images as a run on the source, with the same
labels and split, and so trains to the same weights; it lists and scans
nothing at start-up, and reads each image by index when the input pipeline
needs it. `--output_dir` appears complete or not at all (written as
`OUT.partial`, then renamed).

Exit codes:
    0  success
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input (one line, nothing written): an unknown or unreadable
       source, bad files under --bad_files=fail, --out exists
"""

import time

from absl import app, flags, logging

from launch import cli

_SOURCE = flags.DEFINE_string(
    "source", None, "The images to pack: folder:PATH, csv:PATH or sample:NAME (as data.source).")
_OUT = flags.DEFINE_string("output_dir", None, "The folder to write; must not exist.")
_SHARDS = flags.DEFINE_integer(
    "shards", 0, "ArrayRecord files to write; 0 = one per 512 MB of images.", lower_bound=0)
_BAD_FILES = flags.DEFINE_enum(
    "bad_files", "skip", ["skip", "fail"], "Bad images: skip (listed) or fail (as data.bad_files).")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", 0, "The label range of a CSV with integer labels (as data.num_classes).",
    lower_bound=0)
flags.mark_flags_as_required(["source", "output_dir"])


def run(source: str, out: str, shards: int = 0, bad_files: str = "skip",
        num_classes: int = 0):
    """Checks and packs `source` into `out`; returns `keras_ft.records.Packed`."""
    import os

    if os.path.exists(out):  # before listing a million files
        raise ValueError(f"--output_dir={out} exists; remove it or choose another folder.")
    cli.import_tensorflow()
    from keras_ft import records, sources, validate

    start = time.perf_counter()
    images = sources.load_source(source, num_classes=num_classes)
    images, report = validate.scan(images, policy=bad_files, num_classes=num_classes or None)
    for line in report.lines():
        logging.info("%s", line)
    logging.info("Listed and checked %d images in %.1fs; packing into %s.",
                 len(images), time.perf_counter() - start, out)
    last = [time.monotonic()]

    def progress(done, total):
        if time.monotonic() - last[0] > 10 or done == total:
            last[0] = time.monotonic()
            logging.info("Packed %d of %d images (%.0f%%).", done, total, 100 * done / total)

    packed = records.pack(images, out, source, shards, progress)
    logging.info(
        "Wrote %s: %d images, %d ArrayRecord file(s), %.1f MB, in %.1fs. Train on it with "
        "--config.data.source=records:%s", packed.path, packed.num_records, packed.shards,
        packed.bytes / 1e6, packed.seconds, packed.path,
    )
    return packed


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        run(_SOURCE.value, _OUT.value, _SHARDS.value, _BAD_FILES.value, _NUM_CLASSES.value)
    except cli.INPUT_ERRORS as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=cli.parse_flags)

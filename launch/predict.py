"""Classifies image files with an exported SavedModel: `python -m launch.predict`.

    python -m launch.predict --export=/tmp/qs/export a.jpg b.png [--top_k=5]
    python -m launch.predict --export=/tmp/qs/export photos/ 'more/**/*.jpg' \\
        --output=preds.csv [--batch_size=32] [--format=csv|json|text]

Arguments are files, folders (every .jpg .jpeg .png .bmp .gif file at any
depth, any case) and glob patterns (`*`, `**`, expanded here when the shell
did not); each folder and glob is expanded in sorted order, and a file named
twice is classified once. Files stream through the model `--batch_size` at a
time (fewer when a batch would hold more than BATCH_BYTES): a batch is read,
classified and written before the next is read.

Output, top-k classes per image (`--top_k`, at most all classes):
    text  the default without --output: a block per image on stdout
    csv   `path,top1,top1_prob,top2,top2_prob,...`, one row per classified file
    json  `{"predictions": [{"path", "top": [{"class", "probability"}]}],
          "skipped": [{"path", "reason"}], "images_per_sec"}`
The format follows the extension of `--output` (.csv, .json, .txt) unless
`--format` names it; without --output the rows go to stdout. The output file
is written under a temporary name in its folder, fsynced and renamed over
`--output` at the end, so an interrupted run leaves no partial file; whether
it can be written is checked before the model is loaded.

A file that cannot be classified is skipped and listed, one
`error: skipped PATH: reason.` line on stderr (and in the JSON's "skipped"),
and the others are still classified and written. Only regular files of at
most MAX_FILE_BYTES are read (a FIFO or a link to /dev/zero is skipped
unread), and the export refuses images of more than 50 million decoded
pixels (frames x width x height) before decoding them. On a terminal stderr
shows a progress bar (`--progress=bar`); elsewhere (`--progress=log`) a log
line every LOG_EVERY_S seconds, none for a short run. The last log line is
the summary: `Classified N of M files in T s (R images/s); K skipped.`,
where R counts the model-and-decode loop, not the SavedModel's load.

An object-detection export writes each image's boxes, classes and scores
as rows, and with `--boxes=DIR` each image with its boxes drawn
(`launch/predict_boxes.py`).

A segmentation export (`loaded.task[0]` is "semantic_segmentation") writes
masks instead, into `--masks=DIR`: `DIR/STEM.png`, the class index of each
pixel at the image's own size (8-bit PNG), and `DIR/STEM_overlay.png`, the
image with each class in its PASCAL VOC palette colour at half opacity
(background left as it is); the summary line counts the images written.

It needs TensorFlow only (`tf.saved_model.load`), not keras_ft: what it
does, any client of the export can do.

Exit codes:
    0  every file was classified
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input, one `error:` line and nothing written: bad flags, no
       SavedModel at --export, a folder or glob without image files, an
       --output that cannot be written. Also 2 when some files were
       skipped; the output then holds the others.
"""

import contextlib
import csv
import glob
import json
import os
import stat
import sys
import time

from absl import app, flags, logging

from launch import cli

MAX_FILE_BYTES = 256 * 2**20  # keras_ft.limits.MAX_FILE_BYTES
BATCH_BYTES = 256 * 2**20  # a batch is sent early once its files hold this many bytes
LOG_EVERY_S = 30  # progress log lines when stderr is not a terminal
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what folders and globs yield
FORMATS = {".csv": "csv", ".json": "json", ".txt": "text"}  # --output extension -> format
_KINDS = {stat.S_ISDIR: "folder", stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device",
          stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket"}
# The first bytes of each format the export decodes: a file that starts with
# one but fails to decode is a broken image, not some other kind of file.
_SIGNATURES = {b"\xff\xd8": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"BM": "BMP"}

_EXPORT = flags.DEFINE_string("export", None, "SavedModel folder (a run's WORKDIR/export).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes listed per image (at most all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Files sent to the model in one call.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "File to write (.csv, .json or .txt); default: rows on stdout.")
_FORMAT = flags.DEFINE_string(
    "format", None, "csv, json or text; default: from --output's extension, else text.")
_MASKS = flags.DEFINE_string(
    "masks", None, "Segmentation exports: the folder to write mask and overlay PNGs to.")
_BOXES = flags.DEFINE_string(
    "boxes", None, "Detection exports: the folder to write each image with its boxes drawn to.")
_MIN_SCORE = flags.DEFINE_float(
    "min_score", 0.3, "Detection exports: objects scoring below this are left out.")
_PROGRESS = flags.DEFINE_string(
    "progress", "auto", "bar, log, or auto: a bar when stderr is a terminal, else log lines.")
flags.mark_flags_as_required(["export"])


def main(argv):
    try:
        if _OUTPUT.value:
            check_output(_OUTPUT.value)
        fmt = output_format(_OUTPUT.value, _FORMAT.value)
        for flag in (_TOP_K, _BATCH_SIZE):
            if flag.value < 1:
                raise ValueError(f"--{flag.name}={flag.value}: give 1 or more.")
        if _PROGRESS.value not in ("auto", "bar", "log"):
            raise ValueError(f"unknown --progress={_PROGRESS.value}; choose one of: auto, bar, log.")
        files = expand_inputs(argv[1:])
    except ValueError as e:
        return cli.fail(e)
    export_dir = _EXPORT.value
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        return cli.fail(f"no SavedModel at {export_dir} (no saved_model.pb); "
                        "run launch.train or launch.export first.")
    try:
        output = AtomicOutput(_OUTPUT.value) if _OUTPUT.value else None
    except ValueError as e:
        return cli.fail(e)
    mode = _PROGRESS.value
    if mode == "auto":  # rows printed on the terminal are progress enough
        on_terminal = output is None and sys.stdout.isatty()
        mode = "bar" if sys.stderr.isatty() and not on_terminal else "log"
    try:
        classified, skipped, seconds = predict(
            files, export_dir, output.file if output else sys.stdout, fmt,
            top_k=_TOP_K.value, batch_size=_BATCH_SIZE.value, progress_mode=mode,
            masks_dir=_MASKS.value, boxes_dir=_BOXES.value, min_score=_MIN_SCORE.value)
        if output:
            output.commit()
    except ValueError as e:  # a segmentation export without --masks
        return cli.fail(e)
    finally:
        if output:
            output.discard()  # nothing left behind unless committed
    wrote = f" Wrote {_OUTPUT.value}." if output else ""
    logging.info("Classified %d of %d files in %.1f s (%.1f images/s); %d skipped.%s",
                 classified, len(files), seconds, classified / max(seconds, 1e-9),
                 len(skipped), wrote)
    return cli.EXIT_BAD_INPUT if skipped else 0


def predict(files, export_dir: str, stream, fmt: str, top_k: int, batch_size: int,
            progress_mode: str, masks_dir: str | None = None, boxes_dir: str | None = None,
            min_score: float = 0.3):
    """Classifies `files` batch by batch, writing `fmt` rows of their `top_k`
    classes to `stream`.

    Returns:
        `(files classified, [{"path", "reason"}] of those skipped, seconds)`,
        the seconds counted from after the SavedModel's load.
    """
    tf = cli.import_tensorflow()

    served = tf.saved_model.load(export_dir)
    if hasattr(served, "task") and served.task[0].numpy() == b"semantic_segmentation":
        return segment(files, served, masks_dir, Progress(progress_mode, len(files)))
    if hasattr(served, "task") and served.task[0].numpy() == b"object_detection":
        from launch import predict_boxes

        return predict_boxes.detect(files, served, stream, fmt, boxes_dir, min_score, batch_size,
                                    Progress(progress_mode, len(files)), read_batches)
    classify = served.signatures["serving_default"]
    num_classes = classify.structured_outputs["probabilities"].shape[-1]
    # Exports from before the class names were stored name only the top class.
    names = None
    if hasattr(served, "class_names"):
        names = [name.decode() for name in served.class_names[0].numpy()]
    top_k = min(top_k, num_classes)
    rows = {"csv": CsvRows, "json": JsonRows, "text": TextRows}[fmt](stream, top_k)

    progress = Progress(progress_mode, len(files))
    skipped = []
    for done, chunk, unreadable in read_batches(files, batch_size):
        results = classify_chunk(classify, chunk)
        for path, reason in unreadable + [(p, r) for p, _, _, r in results if r]:
            progress.clear()
            cli.fail(f"skipped {path}: {reason}.")
            skipped.append({"path": path, "reason": reason})
        for path, probabilities, top1, reason in results:
            if reason is None:
                rows.write(path, top_classes(probabilities, top1, names, top_k))
        progress.update(done, rows.count)
    seconds = progress.elapsed()
    rows.finish(skipped, rows.count / max(seconds, 1e-9))
    return rows.count, skipped, seconds


def voc_palette(num_classes: int):
    """The PASCAL VOC colour of each class index (0 black, 1 dark red, ...)."""
    import numpy as np

    palette = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                palette[index, channel] |= ((value >> channel) & 1) << shift
            value, shift = value >> 3, shift - 1
    return palette


def segment(files, served, masks_dir: str | None, progress):
    """Writes each file's mask and overlay PNGs into `masks_dir` (see the
    module docstring); returns `(files written, skipped, seconds)`."""
    import numpy as np

    tf = cli.import_tensorflow()
    if not masks_dir:
        raise ValueError("this is a segmentation export: give --masks=DIR, the folder to write "
                         "the mask and overlay PNGs to.")
    os.makedirs(masks_dir, exist_ok=True)
    palette = voc_palette(int(served.class_names[0].shape[0]))
    segment_one = served.signatures["serving_default"]
    skipped, written = [], 0

    def skip(path, reason):
        progress.clear()
        cli.fail(f"skipped {path}: {reason}.")
        skipped.append({"path": path, "reason": reason})

    for done, chunk, unreadable in read_batches(files, 1):
        for path, reason in unreadable:
            skip(path, reason)
        for path, blob in chunk:
            try:
                out = segment_one(image=tf.constant(blob))
                image = tf.io.decode_image(blob, channels=3, expand_animations=False).numpy()
            except tf.errors.InvalidArgumentError as e:
                skip(path, f"not a decodable image ({e.message.splitlines()[0]})")
                continue
            classes = out["classes"].numpy()
            stem = os.path.join(masks_dir, os.path.splitext(os.path.basename(path))[0])
            shown = classes[..., None] > 0
            blend = np.where(shown, 0.5 * image + 0.5 * palette[classes], image).astype(np.uint8)
            for name, picture in ((f"{stem}.png", classes[..., None]), (f"{stem}_overlay.png", blend)):
                tmp = name + ".tmp"
                tf.io.write_file(tmp, tf.io.encode_png(picture))
                os.replace(tmp, name)
            written += 1
        progress.update(done, written)
    return written, skipped, progress.elapsed()


# ------------------------------------------------------------------ inputs


def expand_inputs(args) -> list:
    """The files named by `args` (files, folders, glob patterns), each once.

    Raises:
        ValueError: no arguments, or a folder or glob without image files.
    """
    if not args:
        raise ValueError("give one or more image files, folders or glob patterns after the flags.")
    looked_for = f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
    files = {}  # a dict keeps the first occurrence's order
    for arg in args:
        if os.path.isdir(arg):
            found = image_files_under(arg)
            if not found:
                raise ValueError(f"no image files in {arg} {looked_for}.")
        elif glob.has_magic(arg) and not os.path.lexists(arg):
            found = []
            for match in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(match):
                    found += image_files_under(match)
                elif match.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(match)
            if not found:
                raise ValueError(f"no image files match {arg} {looked_for}.")
        else:  # a file, taken whatever its name; one that cannot be read is skipped
            found = [arg]
        files.update(dict.fromkeys(found))
    return list(files)


def image_files_under(folder: str) -> list:
    """Every file with an image extension under `folder`, any depth, sorted."""
    return sorted(
        os.path.join(parent, name)
        for parent, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def read_image_file(path: str) -> bytes:
    """The bytes of `path` if it is a regular file (links followed) of 1 to
    MAX_FILE_BYTES bytes; opened non-blocking, so a FIFO cannot hang the client.

    Raises:
        ValueError: not a regular file, empty, or too large (the reason).
        OSError: it cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS.items() if test(st.st_mode)), "special file")
            link = ", through a link" if os.path.islink(path) else ""
            raise ValueError(f"not a regular file ({kind}{link})")
        if st.st_size == 0:
            raise ValueError("empty file (0 bytes)")
        if st.st_size > MAX_FILE_BYTES:
            raise ValueError(f"too large: {st.st_size:,} bytes > {MAX_FILE_BYTES:,}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)


def read_batches(files, batch_size):
    """Yields `(files done, [(path, bytes)], [(path, reason)])` per batch:
    up to `batch_size` readable files, fewer once they hold BATCH_BYTES."""
    chunk, unreadable, size = [], [], 0
    for done, path in enumerate(files, 1):
        try:
            blob = read_image_file(path)
            chunk.append((path, blob))
            size += len(blob)
        except ValueError as e:
            unreadable.append((path, str(e)))
        except OSError as e:
            unreadable.append((path, f"cannot read ({e.strerror or e})"))
        if len(chunk) == batch_size or size >= BATCH_BYTES or done == len(files):
            yield done, chunk, unreadable
            chunk, unreadable, size = [], [], 0


# ------------------------------------------------------------------- model


def classify_chunk(classify, chunk):
    """`[(path, probabilities, top-1 name, None)]` for `chunk`, in order;
    `(path, None, None, reason)` for a file the export refused."""
    tf = cli.import_tensorflow()

    def run(blobs):
        out = classify(images=tf.constant(blobs))
        return out["probabilities"].numpy(), [c.decode() for c in out["classes"].numpy()]

    if not chunk:
        return []
    try:
        probabilities, top1 = run([blob for _, blob in chunk])
        return [(path, probabilities[i], top1[i], None) for i, (path, _) in enumerate(chunk)]
    except tf.errors.InvalidArgumentError:  # some file in the chunk: find which
        results = []
        for path, blob in chunk:
            try:
                (probabilities,), (top1,) = run([blob])
                results.append((path, probabilities, top1, None))
            except tf.errors.InvalidArgumentError as e:
                results.append((path, None, None, refusal(blob, e.message)))
        return results


def refusal(blob: bytes, message: str) -> str:
    """Why the export refused `blob`, from its error `message` and first bytes."""
    if "max_pixels" in message:
        return "too large (more than max_pixels 50,000,000 decoded pixels)"
    kind = next((k for magic, k in _SIGNATURES.items() if blob.startswith(magic)), None)
    if kind:
        return f"cannot decode: a corrupt or truncated {kind}"
    return "cannot decode: not a JPEG, PNG, BMP or GIF image"


def top_classes(probabilities, top1: str, names, top_k: int) -> list:
    """`[(class name, probability)]`, most probable first."""
    import numpy as np

    order = np.argsort(-probabilities, kind="stable")[:top_k]
    return [(names[c] if names else (top1 if rank == 0 else f"class {c}"), probabilities[c])
            for rank, c in enumerate(order)]


# ------------------------------------------------------------------ output


def output_format(output, fmt) -> str:
    """csv, json or text: `fmt` if given, else from `output`'s extension."""
    if fmt is not None:
        if fmt not in FORMATS.values():
            raise ValueError(f"unknown --format={fmt}; choose one of: csv, json, text.")
        return fmt
    if output is None:
        return "text"
    ext = os.path.splitext(output)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot tell the format of --output={output} from its extension; "
                         "name it .csv, .json or .txt, or give --format=csv|json|text.")
    return FORMATS[ext]


def check_output(path: str):
    """Raises ValueError, with the fix, if `path` is a folder or in none."""
    if os.path.isdir(path):
        raise ValueError(f"--output={path} is a folder; give a file path such as "
                         f"{os.path.join(path, 'predictions.csv')}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write --output={path}: folder {folder} does not exist; "
                         "create it or choose another path.")


class AtomicOutput:
    """A file written under a temporary name in the folder of `path`:
    `commit()` fsyncs it and renames it over `path`, `discard()` removes it.
    (keras_ft.workdir.write_atomic writes whole contents; this one streams
    rows, and keeps predict free of keras_ft.)

    Raises:
        ValueError: `path` cannot be written (a folder, a missing folder, no
            permission), with the fix.
    """

    def __init__(self, path: str):
        check_output(path)
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        self.tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except OSError as e:
            raise ValueError(f"cannot write --output={path}: {e.strerror or e} in {folder}; "
                             "choose a folder you can write to.") from e
        self.file = open(fd, "w", newline="", encoding="utf-8")

    def commit(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self):
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class CsvRows:
    """`path,top1,top1_prob,...`; probabilities to 9 digits (float32 exactly)."""

    def __init__(self, stream, top_k: int):
        self.count = 0
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow(["path"] + [f"top{r}{s}" for r in range(1, top_k + 1)
                                         for s in ("", "_prob")])

    def write(self, path, top):
        self.writer.writerow([path] + [v for name, p in top for v in (name, f"{p:.9g}")])
        self.count += 1

    def finish(self, skipped, images_per_sec):
        pass  # the skipped files are on stderr, not in the CSV


class JsonRows:
    """`{"predictions": [...], "skipped": [...], "images_per_sec": R}`, one
    prediction a line, streamed."""

    def __init__(self, stream, top_k: int):
        self.count, self.stream = 0, stream
        stream.write('{"predictions": [')

    def write(self, path, top):
        row = {"path": path, "top": [{"class": name, "probability": float(f"{p:.9g}")}
                                     for name, p in top]}
        self.stream.write(("," if self.count else "") + "\n  " + json.dumps(row))
        self.count += 1

    def finish(self, skipped, images_per_sec):
        self.stream.write(
            f'\n ],\n "skipped": {json.dumps(skipped)},\n'
            f' "images_per_sec": {round(images_per_sec, 1)}}}\n'
        )


class TextRows:
    """Per image, its path and then `  1. class  0.9876` lines."""

    def __init__(self, stream, top_k: int):
        self.count, self.stream = 0, stream

    def write(self, path, top):
        width = max(len(name) for name, _ in top)
        lines = [path] + [f"  {r}. {name:<{width}}  {p:.4f}" for r, (name, p) in enumerate(top, 1)]
        self.stream.write("\n".join(lines) + "\n")
        self.count += 1

    def finish(self, skipped, images_per_sec):
        pass


class Progress:
    """A Keras progress bar over the files on stderr (`mode` "bar"), or a
    log line every LOG_EVERY_S seconds ("log"): none for a short run."""

    def __init__(self, mode: str, total: int):
        self.start = self.logged = time.perf_counter()
        self.total, self.bar = total, None
        if mode == "bar":  # Keras only here: tf.keras is Keras 3, loaded on first use
            tf = cli.import_tensorflow()

            with contextlib.redirect_stdout(sys.stderr):  # Progbar writes to stdout
                self.bar = tf.keras.utils.Progbar(total, unit_name="file",
                                                  stateful_metrics=["images/s"])

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, done: int, classified: int):
        now = time.perf_counter()
        rate = classified / max(now - self.start, 1e-9)
        if self.bar:
            with contextlib.redirect_stdout(sys.stderr):
                self.bar.update(done, [("images/s", rate)])
        elif now - self.logged >= LOG_EVERY_S and done < self.total:
            self.logged = now
            logging.info("%d of %d files (%.0f%%), %.1f images/s, about %.0f s left.",
                         done, self.total, 100 * done / self.total, rate,
                         (self.total - done) * (now - self.start) / done)

    def clear(self):
        """Clears the bar's line, for a message on stderr (the bar redraws)."""
        if self.bar:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=cli.parse_flags)

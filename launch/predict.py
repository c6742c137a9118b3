"""Classifies image files with an exported SavedModel: `python -m launch.predict`.

    python -m launch.predict --export=/tmp/qs/export a.jpg b.png [--top_k=5]

Prints, for each file, its top-k classes with their probabilities. It needs
TensorFlow only (`tf.saved_model.load`), not keras_ft: what it does, any
client of the export can do. A file that cannot be read or decoded is one
`error: ...` line on stderr; the other files are still classified. Only
regular files of at most MAX_FILE_BYTES are read (a FIFO or a link to
/dev/zero is skipped unread), and the export refuses images of more than
50 million decoded pixels (frames x width x height) before decoding them.

Exit codes:
    0  every file was classified
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input: no export at --export, or a file that is not a readable
       JPEG/PNG/BMP/GIF image (the others are still printed)
"""

import os
import stat

from absl import app, flags

from launch import cli

BATCH = 32  # files sent to the model in one call
MAX_FILE_BYTES = 256 * 2**20  # keras_ft.limits.MAX_FILE_BYTES
_KINDS = {stat.S_ISDIR: "folder", stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device",
          stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket"}

_EXPORT = flags.DEFINE_string("export", None, "SavedModel folder (a run's WORKDIR/export).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes printed per image (at most all).", lower_bound=1)
flags.mark_flags_as_required(["export"])


def main(argv):
    files = argv[1:]
    if not files:
        raise app.UsageError("Give one or more image files after the flags.")
    export_dir = _EXPORT.value
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        cli.fail(f"no SavedModel at {export_dir} (no saved_model.pb); "
               "run launch.train or launch.export first.")
        return cli.EXIT_BAD_INPUT
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
    import numpy as np
    import tensorflow as tf

    served = tf.saved_model.load(export_dir)
    classify = served.signatures["serving_default"]
    # Exports from before the class names were stored name only the top class.
    names = None
    if hasattr(served, "class_names"):
        names = [name.decode() for name in served.class_names[0].numpy()]

    def run(blobs):
        out = classify(images=tf.constant(blobs))
        return out["probabilities"].numpy(), [c.decode() for c in out["classes"].numpy()]

    status = 0
    readable = []
    for path in files:
        try:
            readable.append((path, read_image_file(path)))
        except ValueError as e:
            cli.fail(f"skipped {path}: {e}.")
            status = cli.EXIT_BAD_INPUT
        except OSError as e:
            cli.fail(f"cannot read {path}: {e.strerror or e}")
            status = cli.EXIT_BAD_INPUT
    results = {}
    for start in range(0, len(readable), BATCH):
        chunk = readable[start:start + BATCH]
        try:
            outputs = [run([blob for _, blob in chunk])]
            paths = [[p for p, _ in chunk]]
        except tf.errors.InvalidArgumentError:  # some file in the chunk: find which
            outputs, paths = [], []
            for path, blob in chunk:
                try:
                    outputs.append(run([blob]))
                    paths.append([path])
                except tf.errors.InvalidArgumentError as e:
                    results[path] = "max_pixels" in e.message  # too large, or undecodable
        for (probabilities, top1), chunk_paths in zip(outputs, paths):
            for i, path in enumerate(chunk_paths):
                results[path] = (probabilities[i], top1[i])

    for path, _ in readable:
        if results[path] is True:
            cli.fail(f"skipped {path}: too large (more than max_pixels 50,000,000 decoded pixels).")
            status = cli.EXIT_BAD_INPUT
            continue
        if results[path] is False:
            cli.fail(f"cannot decode {path}: not a JPEG, PNG, BMP or GIF image.")
            status = cli.EXIT_BAD_INPUT
            continue
        probabilities, top1 = results[path]
        order = np.argsort(-probabilities, kind="stable")[: _TOP_K.value]
        labels = [names[c] if names else (top1 if rank == 0 else f"class {c}")
                  for rank, c in enumerate(order)]
        width = max(len(label) for label in labels)
        print(path)
        for rank, (c, label) in enumerate(zip(order, labels), 1):
            print(f"  {rank}. {label:<{width}}  {probabilities[c]:.4f}")
    return status


def read_image_file(path: str) -> bytes:
    """The bytes of `path` if it is a regular file (links followed) of at most
    MAX_FILE_BYTES; opened non-blocking, so a FIFO cannot hang the client.

    Raises:
        ValueError: not a regular file, or too large (the reason).
        OSError: it cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS.items() if test(st.st_mode)), "special file")
            link = ", through a link" if os.path.islink(path) else ""
            raise ValueError(f"not a regular file ({kind}{link})")
        if st.st_size > MAX_FILE_BYTES:
            raise ValueError(f"too large: {st.st_size:,} bytes > {MAX_FILE_BYTES:,}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)


if __name__ == "__main__":
    app.run(main)

"""Classifies image files with an exported SavedModel: `python -m launch.predict`.

    python -m launch.predict --export=/tmp/qs/export a.jpg b.png [--top_k=5]

Prints, for each file, its top-k classes with their probabilities. It needs
TensorFlow only (`tf.saved_model.load`), not keras_ft: what it does, any
client of the export can do. A file that cannot be read or decoded is one
`error: ...` line on stderr; the other files are still classified.

Exit codes:
    0  every file was classified
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input: no export at --export, or a file that is not a readable
       JPEG/PNG/BMP/GIF image (the others are still printed)
"""

import os

from absl import app, flags

from launch import cli

BATCH = 32  # files sent to the model in one call

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
            with open(path, "rb") as f:
                readable.append((path, f.read()))
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
                except tf.errors.InvalidArgumentError:
                    results[path] = None
        for (probabilities, top1), chunk_paths in zip(outputs, paths):
            for i, path in enumerate(chunk_paths):
                results[path] = (probabilities[i], top1[i])

    for path, _ in readable:
        if results[path] is None:
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


if __name__ == "__main__":
    app.run(main)

"""Re-exports a run's newest checkpoint: `python -m launch.export`.

    python -m launch.export --workdir=/tmp/qs [--tflite]

Writes `WORKDIR/export/` (SavedModel, both serving signatures, sizing images
with the run's `data.resize` policy) from the newest checkpoint. With
`--tflite` it also writes `export/model.tflite` (float32, uint8 input
[N, S, S, 3] already sized by that policy to the model's side S)
and `export/labels.txt`, then runs both on the same images and prints the
largest probability difference; above the tolerance the .tflite is removed.

Exit codes:
    0  success
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input: no such workdir, no checkpoint (one line on stderr)
    3  the TFLite model disagrees with the SavedModel beyond the tolerance
"""

import os

from absl import app, flags, logging

from launch import cli

EXIT_TFLITE_PARITY = 3
PARITY_IMAGES = 16

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a keras_ft training run.")
_TFLITE = flags.DEFINE_bool("tflite", False, "Also write export/model.tflite and check it.")
flags.mark_flags_as_required(["workdir"])


def parity_images(spec, image_size: int):
    """Images for the TFLite parity check: `(served, tflite, kind)`.

    `served`: up to PARITY_IMAGES uint8 squares of side
    `data.resize_side(S, policy)` for the SavedModel, whose `data.resize`
    policy brings them exactly to `tflite`, uint8 [N, S, S, 3] (by a center
    crop for "resize_then_crop", as they are for the others). The run's own
    validation images when its data source still loads, else seeded noise
    (the parity check is about arithmetic, not accuracy).
    """
    import numpy as np
    tf = cli.import_tensorflow()

    from keras_ft import data
    from keras_ft.tasks import image_classification

    policy = spec.data.resize
    side = data.resize_side(image_size, policy)
    try:
        _, _, val, _ = image_classification.load_splits(spec.data, spec.seed)
        batch = next(iter(data.make_dataset(val, side, PARITY_IMAGES, training=False)))[0]
        served, kind = tf.cast(tf.round(batch), tf.uint8).numpy(), "validation images"
    except (ValueError, OSError, tf.errors.OpError) as e:
        logging.warning("Data source unavailable (%s); checking on noise images.", e)
        rng = np.random.default_rng(0)
        served, kind = rng.integers(0, 256, (PARITY_IMAGES, side, side, 3), np.uint8), "noise images"
    tflite = tf.cast(tf.round(data.resize_image(served, image_size, policy)), tf.uint8).numpy()
    return served, tflite, kind


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    workdir = _WORKDIR.value
    loaded = cli.load_workdir(workdir)
    if loaded is None:
        return cli.EXIT_BAD_INPUT
    model, state, spec = loaded
    from keras_ft import export, tasks

    class_names = state["class_names"]
    path = tasks.get(spec.task).export(model, os.path.join(workdir, "export"), class_names, spec)
    print(f"SavedModel of {state['path']} (epoch {state['epoch']}, step {state['step']}): {path}")
    if not _TFLITE.value:
        return 0
    if not hasattr(model, "image_size"):
        return cli.fail(f"--tflite exports image models; {workdir} is a {spec.task} run "
                        "(its SavedModel is written).")

    tflite_path = export.export_tflite(
        model, os.path.join(path, export.TFLITE_FILE), class_names, model.image_size
    )
    served, images, kind = parity_images(spec, model.image_size)
    difference = export.tflite_parity(tflite_path, path, images, served_images=served)
    tolerance = export.TFLITE_TOLERANCE
    line = (
        f"TFLite parity: max |probability difference| {difference:.2e} "
        f"on {len(images)} {kind} (tolerance {tolerance:.0e})"
    )
    if not difference <= tolerance:  # NaN fails too
        os.remove(tflite_path)
        cli.fail(f"{line}; {tflite_path} removed.")
        return EXIT_TFLITE_PARITY
    print(f"TFLite model: {tflite_path}")
    print(line)
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)

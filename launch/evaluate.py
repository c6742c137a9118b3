"""Evaluates a run on its validation split: `python -m launch.evaluate`.

    python -m launch.evaluate --workdir=/tmp/qs

Rebuilds the validation split exactly as the trainer did
(`keras_ft.tasks.image_classification.load_splits`: same source, and the
source's own split or the same `data.val_fraction` and seed; images sized
by the same `data.resize` policy), classifies it with the newest readable checkpoint
(`WORKDIR/checkpoints/ckpt-SSSSSSSSS`, named by the global training step it
was taken after, not by epoch) and writes `WORKDIR/report/`:

    report.md              accuracy, top-5, loss, ECE, per-class table, recipe
    report.json            the same numbers, plus the confusion matrix and bins
    confusion_matrix.png   counts, class names on both axes
    reliability.png        reliability diagram (15 confidence bins)
    training_curves.png    loss and accuracy per epoch, from history.csv

Exit codes:
    0  success
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input: no such workdir, no checkpoint, data source gone (one line)
"""

import csv
import json
import os
import sys

from absl import app, flags, logging

from launch import cli


_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a keras_ft training run.")
flags.mark_flags_as_required(["workdir"])


def recipe(spec, metrics: dict, own_split: bool = False) -> dict:
    """The settings a reader needs to reproduce the run, as display strings.

    `spec` is the run's `keras_ft.spec.RunSpec` (its saved config over
    today's defaults). `own_split`: the validation images are the source's
    own (train/ and val/ folders, a TFDS split), not a seeded share.
    """
    m, o, f, d = spec.model, spec.optimizer, spec.freeze, spec.data
    stage_text = "; ".join(
        (f"{s.epochs} epoch(s)" if s.epochs else f"{s.steps} step(s)") + f": {s.describe()}"
        for s in f.stages
    )
    momentum = f"momentum {o.momentum}" + (" (Nesterov)" if o.nesterov else "")
    return {
        "backbone": m.backbone,
        "weights": m.weights or "none",
        "image size": f"{m.image_size} px ({d.resize})",
        "augmentation": d.augment.describe(),
        "stages": stage_text,
        "BatchNorm": f.batchnorm,
        "trained parameters": f.method,
        "learning rate": f"{o.learning_rate} ({spec.schedule.name} schedule)",
        "optimizer": f"SGD, {momentum}, weight decay {o.weight_decay}"
        + (f", L2-SP {o.l2sp}" if o.l2sp else ""),
        "batch size (global)": spec.train.global_batch_size,
        "epochs": spec.train.epochs,
        "data source": d.source,
        "train / validation images": f"{metrics.get('train_images', '?')} / "
        f"{metrics.get('val_images', '?')} ("
        + ("the source's own split" if own_split
           else f"val_fraction {d.val_fraction}, seed {spec.seed}")
        + ")",
        "trainer's val_accuracy (metrics.json)": metrics.get("val_accuracy", "?"),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    workdir = _WORKDIR.value
    loaded = cli.load_workdir(workdir)
    if loaded is None:
        return cli.EXIT_BAD_INPUT
    model, state, spec = loaded
    import numpy as np
    import tensorflow as tf

    from keras_ft import data, report, workdir as workdir_lib
    from keras_ft.tasks import image_classification

    try:
        images, _, val, _ = image_classification.load_splits(spec.data, spec.seed)
    except cli.INPUT_ERRORS as e:
        return cli.fail(e)
    if images.class_names != state["class_names"]:
        return cli.fail(
            f"the data source's classes {images.class_names} differ from the "
            f"model's {state['class_names']}; the data changed since training."
        )
    metrics_path = os.path.join(workdir, "metrics.json")
    metrics = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)

    val_ds = data.make_dataset(
        val, model.image_size, spec.train.global_batch_size, training=False,
        resize=spec.data.resize,
    )
    probabilities = np.concatenate(
        [tf.nn.softmax(model(x, training=False), axis=-1).numpy() for x, _ in val_ds]
    )
    result = {
        "workdir": os.path.abspath(workdir),
        "split": "validation",
        "checkpoint": f"{os.path.relpath(state['path'], workdir)} ({state['epoch']} "
        f"epoch(s) and {state['step']} step(s) done)",
        **report.evaluate(val.labels, probabilities, state["class_names"]),
        "recipe": recipe(spec, metrics, own_split=images.val_mask is not None),
        "figures": {},
        "notes": [],
    }

    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    figures = result["figures"]
    figures["confusion_matrix"] = "confusion_matrix.png"
    report.plot_confusion_matrix(
        result["confusion_matrix"], state["class_names"],
        os.path.join(out_dir, "confusion_matrix.png"),
    )
    figures["reliability"] = "reliability.png"
    report.plot_reliability(result["calibration"], os.path.join(out_dir, "reliability.png"))
    history_path = os.path.join(workdir, "history.csv")
    if os.path.exists(history_path):
        with open(history_path) as f:
            rows = list(csv.DictReader(f))
        figures["training_curves"] = "training_curves.png"
        report.plot_history(rows, os.path.join(out_dir, "training_curves.png"))
    else:
        result["notes"].append("No history.csv in the workdir: no training curves.")
    trained = metrics.get("val_accuracy")
    if trained is not None and abs(trained - result["accuracy"]) > 1e-6:
        # Same checkpoint, same split: only a changed model or data gets here.
        warning = (
            f"Accuracy {result['accuracy']:.4f} differs from the trainer's val_accuracy "
            f"{trained:.4f} (metrics.json) on the same split: the model restored from "
            "the checkpoint or the data is not what was trained and evaluated."
        )
        result["notes"].insert(0, f"**Warning**: {warning}")
        print(f"warning: {warning}", file=sys.stderr)
    if len(val) < 100:
        result["notes"].append(
            f"Only {len(val)} validation images: each one moves accuracy by "
            f"{1 / len(val):.3f}, and most calibration bins are empty."
        )

    workdir_lib.write_atomic(os.path.join(out_dir, "report.json"), json.dumps(result, indent=2) + "\n")
    workdir_lib.write_atomic(os.path.join(out_dir, "report.md"), report.render_markdown(result))
    print(
        f"Validation ({len(val)} images): accuracy {result['accuracy']:.4f}, "
        f"ECE {result['calibration']['ece']:.4g}. Report: {os.path.join(out_dir, 'report.md')}"
    )
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)

"""Evaluates a trained run: `python -m launch.evaluate`.

    python -m launch.evaluate --workdir=/tmp/qs                # its validation split
    python -m launch.evaluate --workdir=/tmp/qs --data=folder:/data/test --tta=flip

Without `--data`, rebuilds the validation split exactly as the trainer did
(`keras_ft.tasks.image_classification.load_splits`: same source, and the
source's own split or the same `data.val_fraction` and seed; images sized
by the same `data.resize` policy) and warns if the accuracy differs from
the trainer's `val_accuracy` in metrics.json.

`--data=folder:PATH|csv:PATH|tfds:NAME|records:PATH` (the strings `data.source` takes)
evaluates a held-out set instead: ALL its images, no split, checked by
`keras_ft.validate.scan` under the run's `data.bad_files` policy (a TFDS
dataset with the run's `data.tfds.*` settings, split `--data_split`).
Its classes are matched to the model's BY NAME: labels are remapped from the
data's sorted class names to the model's label order; a class the model was
not trained on is an error, a model class absent from the data gets
support 0 (and a note). Integer labels in a CSV are the model's label
indices 0..K-1.

`--tta=flip` also classifies each image's left-right mirror and reports,
beside the plain figures (which stay the headline), those of the mean of the
two softmax probabilities. The model is the newest readable checkpoint
(`WORKDIR/checkpoints/ckpt-SSSSSSSSS`, named by the global training step it
was taken after). When stderr is a terminal, a progress bar counts the
batches. The report goes to `--out` (default `WORKDIR/report`, or
`WORKDIR/report_NAME` for `--data`: NAME the folder's, the CSV file's or the
TFDS dataset's and split's name, e.g. `report_test`, `report_tf_flowers_test`):

    report.md              accuracy, top-5, loss, ECE, plain vs TTA, per-class
                           table, most-confused pairs, top-loss images, recipe
    report.json            the same numbers, plus the confusion matrix and bins
    confusion_matrix.png   counts, class names on both axes
    reliability.png        reliability diagram (15 confidence bins)
    training_curves.png    loss and accuracy per epoch, from history.csv

The interpretation follows fastai's `ClassificationInterpretation`: the 10
most-confused (true, predicted) pairs and the 10 images of highest
cross-entropy, on the plain probabilities (`keras_ft.report`).

An object-detection run (`task="object_detection"`) is evaluated with
pycocotools instead: `--data` is then a COCO, VOC or YOLO source with the
run's classes, and the report holds mAP@[.5:.95], AP50, AP75, AP by size,
per-class AP, the PR curves at IoU 0.5 and validation images with their
boxes drawn (`keras_ft.detection.report`); `--tta` is refused.

Exit codes:
    0  success
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input (one line, nothing written): no such workdir, no checkpoint,
       data source gone, a class the model does not know, integer labels out
       of range, an unwritable --out, an unknown --tta
"""

import csv
import dataclasses
import json
import os
import re
import sys

from absl import app, flags, logging
import numpy as np

from launch import cli

TTA_CHOICES = ("none", "flip")
TOP_K = 10  # most-confused pairs and top-loss images listed
LISTED_CLASSES = 20  # in an error message, before "..."

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a keras_ft training run.")
_DATA = flags.DEFINE_string(
    "data", "", "Held-out data to evaluate instead of the validation split: folder:PATH, "
    "csv:PATH or tfds:NAME (as data.source); every image is evaluated."
)
_DATA_SPLIT = flags.DEFINE_string("data_split", "test", "The TFDS split of a tfds: --data.")
_TTA = flags.DEFINE_string(
    "tta", "none", "Test-time augmentation also reported: none, or flip (the mean of the "
    "probabilities of each image and its left-right mirror)."
)
_OUT = flags.DEFINE_string(
    "out", "", "Report folder; default WORKDIR/report, or WORKDIR/report_NAME for --data."
)
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


# ------------------------------------------------------------ the output


def default_out(workdir: str, source: str = "", data_split: str = "test") -> str:
    """`WORKDIR/report`, or `WORKDIR/report_NAME` for held-out data `source`:
    NAME the folder's or CSV file's name, or the TFDS dataset's and split's,
    each character but letters, digits, ".", "_" and "-" replaced by "_"."""
    if not source:
        return os.path.join(workdir, "report")
    kind, _, arg = source.partition(":")
    if kind == "tfds":
        name = f"{arg}_{data_split}"
    else:
        name = os.path.basename(os.path.normpath(arg))
        if kind == "csv":
            name = os.path.splitext(name)[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or kind
    return os.path.join(workdir, f"report_{name}")


def unwritable(out: str) -> str | None:
    """Why the report cannot be written to folder `out` (which may not exist
    yet: then its nearest existing parent is checked); None if it can."""
    path = os.path.abspath(out)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is" if existing == path else f"is under {existing}, which is"
        return f"--out {out} {what} a file, not a folder; give a folder for the report."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} is not writable; give a folder you can write to."
    return None


# ------------------------------------------------------------- the data


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_CLASSES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > LISTED_CLASSES else "")


def match_classes(images, model_classes: list[str], where: str, integer_labels: bool = False):
    """`images` relabelled in the model's class order, and the model's classes it lacks.

    A source numbers its classes in sorted order of their names; the model
    in the order it was trained with. Labels are mapped by name, or, for
    `integer_labels` (a CSV of integers), taken as the model's indices.

    Args:
        images: a `keras_ft.data.ImageSet`.
        model_classes: the model's class names, in label order.
        where: how error messages name the data (its path or dataset).
        integer_labels: the labels are integers 0..K-1 (class names "0", "1", ...).

    Returns:
        `(images, missing)`: the `ImageSet` with the model's labels and class
        names, and the names of the model's classes that have no image.

    Raises:
        ValueError: a class the model does not know, or an integer label
            of K or more.
    """
    names, count = list(images.class_names), len(model_classes)
    if integer_labels:
        if len(names) > count:
            raise ValueError(
                f"the data at {where} has the integer label {len(names) - 1}, but the model "
                f"has {count} classes (labels 0..{count - 1}: {_listed(model_classes)}); "
                "fix the label, or label by class name."
            )
        index = np.arange(len(names))
    else:
        unknown = [name for name in names if name not in model_classes]
        if unknown:
            which = (f"class {unknown[0]!r}" if len(unknown) == 1
                     else f"classes {', '.join(map(repr, unknown[:LISTED_CLASSES]))}")
            raise ValueError(
                f"the data at {where} has {which}, which the model was not trained on "
                f"(its classes: {_listed(model_classes)})"
            )
        index = np.array([model_classes.index(name) for name in names], np.int32)
    labels = index[images.labels].astype(np.int32)
    support = np.bincount(labels, minlength=count)
    missing = [name for name, n in zip(model_classes, support) if not n]
    relabelled = dataclasses.replace(
        images, labels=labels, class_names=list(model_classes), val_mask=None
    )
    return relabelled, missing


def load_images(source: str, data_split: str, spec, model_classes: list[str]):
    """The images to evaluate, labelled in the model's class order.

    Without `source`, the run's validation split; with it, every image of
    `source`, scanned and relabelled by `match_classes`.

    Returns:
        `(images, missing classes, scan report or None, own split)`:
        `own split` tells whether the validation split is the source's own.
    """
    cli.import_tensorflow()
    from keras_ft import sources, validate
    from keras_ft.tasks import image_classification

    if not source:
        dataset, _, images, _ = image_classification.load_splits(spec.data, spec.seed)
        if dataset.class_names != model_classes:
            raise ValueError(
                f"the data source's classes {dataset.class_names} differ from the "
                f"model's {model_classes}; the data changed since training."
            )
        return images, [], None, dataset.val_mask is not None
    t = spec.data.tfds
    images = sources.load_source(
        source,
        tfds_split=data_split,
        tfds_val_split="",  # evaluate all of --data_split
        tfds_data_dir=t.data_dir,
        tfds_download=t.download,
        tfds_image_key=t.image_key,
        tfds_label_key=t.label_key,
    )
    images, scan_report = validate.scan(images, policy=spec.data.bad_files)
    for line in scan_report.lines():
        logging.info("%s", line)
    kind, _, where = source.partition(":")
    names = images.class_names
    integer_labels = kind == "csv" and names == [str(i) for i in range(len(names))]
    images, missing = match_classes(images, model_classes, where, integer_labels)
    return images, missing, scan_report, False


def image_names(images) -> list[str]:
    """How the report names each image: its path, or its TFDS name."""
    from keras_ft import data

    if images.kind == data.FILES:
        return list(images.images)
    if images.kind == data.RECORDS:
        return [images.images.store.name(i) for i in images.images.index]
    return list(images.names or [f"image #{i}" for i in range(len(images))])


# ------------------------------------------------------------ classifying


def classify(model, images, batch_size: int, resize: str, tta: str = "none"):
    """Softmax probabilities `[N, C]` of every image of `images`, in order.

    Returns:
        `(plain, augmented)`: `augmented` is None for `tta="none"`; for
        "flip", the mean of the probabilities of each image and of its
        left-right mirror (probabilities, not logits: a very confident view
        does not outvote the other without bound).
    """
    tf = cli.import_tensorflow()

    from keras_ft import data, progress

    def probabilities(x):
        return tf.nn.softmax(tf.cast(model(x, training=False), tf.float32), axis=-1).numpy()

    stream = data.make_dataset(images, model.image_size, batch_size, training=False, resize=resize)
    shown = progress.Counter(-(-len(images) // batch_size), "Classifying", "batches")
    plain, augmented = [], []
    for done, (x, _) in enumerate(stream, 1):
        plain.append(probabilities(x))
        if tta == "flip":
            augmented.append((plain[-1] + probabilities(tf.image.flip_left_right(x))) / 2)
        shown.update(done)
    shown.close(len(plain))
    num_classes = len(images.class_names)
    plain = np.concatenate(plain) if plain else np.zeros((0, num_classes), np.float32)
    return plain, (np.concatenate(augmented) if tta == "flip" else None)


# -------------------------------------------------------------- the report


def _notes(images, missing, scan_report, held_out: bool) -> list[str]:
    notes = []
    for name in missing:
        notes.append(
            f"The model's class {name!r} has no image in this data (support 0): its recall "
            "and F1 are 0, and so it lowers the macro averages."
        )
    if scan_report is not None and scan_report.bad_files:
        path, reason = scan_report.bad_files[0]
        notes.append(
            f"{len(scan_report.bad_files)} bad file(s) skipped (data.bad_files=skip), "
            f"e.g. {path}: {reason}."
        )
    if len(images) < 100:
        what = "images" if held_out else "validation images"
        notes.append(
            f"Only {len(images)} {what}: each one moves accuracy by "
            f"{1 / max(len(images), 1):.3f}, and most calibration bins are empty."
        )
    return notes


def _warn_if_not_as_trained(result: dict, metrics: dict) -> None:
    """On the run's own validation split, the accuracy must be the trainer's."""
    trained = metrics.get("val_accuracy")
    if trained is None or abs(trained - result["accuracy"]) <= 1e-6:
        return
    # Same checkpoint, same split: only a changed model or data gets here.
    warning = (
        f"Accuracy {result['accuracy']:.4f} differs from the trainer's val_accuracy "
        f"{trained:.4f} (metrics.json) on the same split: the model restored from "
        "the checkpoint or the data is not what was trained and evaluated."
    )
    result["notes"].insert(0, f"**Warning**: {warning}")
    print(f"warning: {warning}", file=sys.stderr)


def write_report(result: dict, out_dir: str, workdir: str, class_names: list[str]) -> None:
    """Figures, report.json and report.md into `out_dir` (the last two atomically)."""
    from keras_ft import report, workdir as workdir_lib

    os.makedirs(out_dir, exist_ok=True)
    figures = result["figures"]
    figures["confusion_matrix"] = "confusion_matrix.png"
    report.plot_confusion_matrix(
        result["confusion_matrix"], class_names, os.path.join(out_dir, "confusion_matrix.png")
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
    workdir_lib.write_atomic(os.path.join(out_dir, "report.json"), json.dumps(result, indent=2) + "\n")
    workdir_lib.write_atomic(os.path.join(out_dir, "report.md"), report.render_markdown(result))


def evaluate(workdir: str, source: str = "", data_split: str = "test", tta: str = "none",
             out: str = "") -> int:
    """What `python -m launch.evaluate` does with its flags (see the module
    docstring); returns the exit code."""
    if tta not in TTA_CHOICES:
        return cli.fail(f"unknown --tta {tta!r}. Choose one of: {', '.join(TTA_CHOICES)}.")
    if not os.path.isdir(workdir):
        return cli.fail(f"workdir {workdir} does not exist.")
    out_dir = out or default_out(workdir, source, data_split)
    problem = unwritable(out_dir)
    if problem:
        return cli.fail(problem)
    from keras_ft import report, sources  # TensorFlow from here on

    if source and source.partition(":")[0] not in sources.KINDS + ("coco", "voc", "yolo"):
        return cli.fail(
            f"unknown --data {source!r}. Use one of: "
            + ", ".join(f"{kind}:..." for kind in sources.KINDS) + " (e.g. folder:/data/test)."
        )
    loaded = cli.load_workdir(workdir)
    if loaded is None:
        return cli.EXIT_BAD_INPUT
    model, state, spec = loaded
    if spec.task == "object_detection":
        if tta != "none":
            return cli.fail(f"--tta={tta} classifies mirrored images; {workdir} is an "
                            "object_detection run: leave --tta out.")
        return evaluate_detection(model, spec, state, source, out_dir)
    if spec.task != "image_classification":
        return cli.fail(f"launch.evaluate reports on image classification runs; {workdir} is a "
                        f"{spec.task} run (its validation figures are in metrics.json).")
    from keras_ft import progress

    progress.quiet_framework_logs()
    progress.set_mode(progress.choose(spec.train.progress))  # a bar on a terminal
    class_names = state["class_names"]
    try:
        images, missing, scan_report, own_split = load_images(
            source, data_split, spec, class_names
        )
    except cli.INPUT_ERRORS as e:
        return cli.fail(e)
    metrics_path = os.path.join(workdir, "metrics.json")
    metrics = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)

    plain, augmented = classify(model, images, spec.train.global_batch_size, spec.data.resize, tta)
    evaluated = report.evaluate(images.labels, plain, class_names)
    result = {
        "workdir": os.path.abspath(workdir),
        "split": "held-out" if source else "validation",
        "data": (f"{source} (split {data_split})" if source.startswith("tfds:") else source) or None,
        "checkpoint": f"{os.path.relpath(state['path'], workdir)} ({state['epoch']} "
        f"epoch(s) and {state['step']} step(s) done)",
        **evaluated,
        "tta": None,
        "most_confused": report.most_confused(evaluated["confusion_matrix"], class_names, TOP_K),
        "top_losses": report.top_losses(
            images.labels, plain, image_names(images), class_names, TOP_K
        ),
        "recipe": recipe(spec, metrics, own_split=own_split),
        "figures": {},
        "notes": _notes(images, missing, scan_report, held_out=bool(source)),
    }
    if augmented is not None:
        result["tta"] = {
            "method": tta,
            "description": "TTA flip: each image's probabilities are the mean of the softmax "
            "of the image and of its left-right mirror. The headline figures are without TTA.",
            **report.headline(report.evaluate(images.labels, augmented, class_names)),
        }
    if not source:  # metrics.json describes the validation split only
        _warn_if_not_as_trained(result, metrics)

    write_report(result, out_dir, workdir, class_names)
    tta_text = (f"; TTA {tta}: accuracy {result['tta']['accuracy']:.4f}, "
                f"ECE {result['tta']['ece']:.4g}" if result["tta"] else "")
    print(
        f"{f'Held-out {source}' if source else 'Validation'} ({len(images)} images): "
        f"accuracy {result['accuracy']:.4f}, ECE {result['calibration']['ece']:.4g}{tta_text}. "
        f"Report: {os.path.join(out_dir, 'report.md')}"
    )
    return 0


def evaluate_detection(model, spec, state, source: str, out_dir: str) -> int:
    """`evaluate` for an object-detection run: pycocotools' mAP, AP50, AP75
    and per-class AP, the PR curves and drawn examples
    (`keras_ft.detection.report`), on the validation split rebuilt as the
    trainer made it, or on every image of `source` (a COCO, VOC or YOLO
    source: the classes must be the run's, in the same order)."""
    from keras_ft import tasks
    from keras_ft.detection import report, sources

    task = tasks.get(spec.task)
    try:
        if source:
            images, _ = sources.load_det_source(source, spec.data.bad_files)
            if list(images.class_names) != list(state["class_names"]):
                raise ValueError(f"--data {source} has classes {images.class_names}; the model "
                                 f"was trained on {state['class_names']} (same names, same order).")
        else:
            images = task.load_data(spec).val_set
    except cli.INPUT_ERRORS as e:
        return cli.fail(e)
    result = task.coco_on(model, images, spec.task_options, spec.train.global_batch_size)
    report.write_report(out_dir, result, images, list(state["class_names"]))
    print(f"{f'Held-out {source}' if source else 'Validation'} ({len(images)} images): "
          f"mAP {result['map']:.4f}, AP50 {result['ap50']:.4f}, AP75 {result['ap75']:.4f}. "
          f"Report: {os.path.join(out_dir, 'report.md')}")
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    return evaluate(_WORKDIR.value, _DATA.value, _DATA_SPLIT.value, _TTA.value, _OUT.value)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)

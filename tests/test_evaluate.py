"""`launch.evaluate --data=... --tta=flip`: held-out data matched by class name,
test-time augmentation, the interpretation tables, and its errors.

One tiny run on three classes (dark, grey, light) is trained per module: with
two, any set of at least two known classes is the model's own, in its order,
and a wrong label mapping could not show. `launch.evaluate` is not imported
here: its `--workdir` flag would clash with `launch.train`'s, which other
test modules import. All evaluations run in one subprocess (`EVALUATIONS`),
through `launch.evaluate.main` and absl's flags, and the expected numbers are
computed here, from the checkpoint (`keras_ft.job.load_trained`) and the
image files.
"""

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, run_train, write_image_folder

CLASSES = ("dark", "grey", "light")  # the model's label order (sorted names)

# Evaluates each argument list of argv[1] (a JSON file) with launch.evaluate
# in this one process: TensorFlow is imported once. Writes, per case, the exit
# code, stdout, stderr and whether TensorFlow had been imported by then (the
# cheap checks come first); then the probabilities `classify` gives on the
# held-out folder, with and without TTA (argv[2], an .npz).
EVALUATIONS = r"""
import contextlib, io, json, sys, traceback
from absl import flags
from launch import evaluate

class Terminal(io.StringIO):
    def isatty(self):
        return True

cases = json.load(open(sys.argv[1]))
results = {}
for name, argv, tty in cases:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evaluate", *argv])
    out, err = Terminal() if tty else io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = evaluate.main(["evaluate"])
        except Exception:
            code, _ = 1, traceback.print_exc()
    results[name] = dict(code=code, stdout=out.getvalue(), stderr=err.getvalue(),
                         tensorflow="tensorflow" in sys.modules)

import numpy as np
from keras_ft import job
workdir, folder = sys.argv[3], sys.argv[4]
model, state, spec = job.load_trained(workdir)
images, *_ = evaluate.load_images(f"folder:{folder}", "test", spec, state["class_names"])
plain, flipped = evaluate.classify(model, images, 4, spec.data.resize, tta="flip")
np.savez(sys.argv[2], plain=plain, flip=flipped, labels=images.labels,
         paths=np.array(evaluate.image_names(images)))
json.dump(results, open(sys.argv[1] + ".out", "w"))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run on 10 images per class (its validation split: 3 per class)."""
    root = tmp_path_factory.mktemp("evaluate")
    images = write_image_folder(root / "images", {name: 10 for name in CLASSES})
    workdir = root / "run"
    trained = run_train(
        workdir, f"--config.data.source=folder:{images}", "--config.optimizer.learning_rate=0.001",
        "--config.export.enabled=False",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    return str(workdir)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Held-out sets: the same classes drawn with another seed, and variants."""
    root = tmp_path_factory.mktemp("held_out")
    held_out = write_image_folder(root / "held_out", {name: 6 for name in CLASSES}, seed=1)
    # Without grey: the data's labels are dark 0, light 1; the model's 0 and 2.
    two = shutil.copytree(held_out, root / "two", ignore=shutil.ignore_patterns("grey"))
    zebra = shutil.copytree(held_out, root / "zebra")
    os.makedirs(zebra / "zebra")
    shutil.copy(os.path.join(held_out, "dark", "000.png"), zebra / "zebra" / "000.png")
    # Integer labels are the model's indices; rows in shuffled order.
    rows = [(path, CLASSES.index(os.path.basename(os.path.dirname(path))))
            for path in files_of(held_out)]
    random.Random(0).shuffle(rows)
    integers = root / "integers.csv"
    integers.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    beyond = root / "beyond.csv"  # label 3 for a 3-class model
    beyond.write_text("path,label\n" + "".join(
        f"{p},{label + (i == 0) * (3 - label)}\n" for i, (p, label) in enumerate(rows)))
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    return dict(held_out=held_out, two=str(two), zebra=str(zebra), integers=str(integers),
                beyond=str(beyond), a_file=str(a_file), root=str(root))


def files_of(folder):
    return sorted(
        os.path.join(folder, c, f) for c in sorted(os.listdir(folder))
        for f in os.listdir(os.path.join(folder, c))
    )


@pytest.fixture(scope="module")
def evaluations(run, data):
    """Every case's exit code, stdout and stderr; the probabilities of `classify`."""
    w = f"--workdir={run}"
    cases = [  # those that fail before any model work first: TensorFlow not yet imported
        ("unknown_tta", [w, "--tta=mirror"], False),
        ("unwritable", [w, f"--data=folder:{data['held_out']}",
                        f"--out={data['a_file']}/report"], False),
        ("held_out", [w, f"--data=folder:{data['held_out']}", "--tta=flip"], False),
        ("two", [w, f"--data=folder:{data['two']}"], False),
        ("integers", [w, f"--data=csv:{data['integers']}", f"--out={data['root']}/integers"],
         False),
        ("unknown_class", [w, f"--data=folder:{data['zebra']}"], False),
        ("beyond", [w, f"--data=csv:{data['beyond']}"], False),
        ("no_data", [w, "--data=folder:/no/such/folder"], False),
        ("validation", [w], True),  # stdout a terminal: a progress bar
    ]
    cases_path = os.path.join(data["root"], "cases.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    npz = os.path.join(data["root"], "probabilities.npz")
    done = subprocess.run(
        [sys.executable, "-c", EVALUATIONS, cases_path, npz, run, data["held_out"]],
        cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
        text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(cases_path + ".out") as f:
        results = json.load(f)
    return results, dict(np.load(npz))


@pytest.fixture(scope="module")
def expected(run, data):
    """Probabilities computed here: the checkpoint's model on each held-out
    file, decoded and resized one by one, and on its mirror image."""
    from keras_ft import data as data_lib, job

    model, state, spec = job.load_trained(run)
    assert state["class_names"] == list(CLASSES)
    files = files_of(data["held_out"])
    x = tf.concat([
        data_lib.resize_image(tf.io.decode_image(tf.io.read_file(f), channels=3)[None],
                              spec.model.image_size, spec.data.resize)
        for f in files
    ], axis=0)
    plain = tf.nn.softmax(model(x, training=False)).numpy().astype(np.float64)
    mirror = tf.nn.softmax(model(tf.image.flip_left_right(x), training=False)).numpy()
    labels = np.array([CLASSES.index(os.path.basename(os.path.dirname(f))) for f in files])
    return dict(files=files, labels=labels, plain=plain, flip=(plain + mirror) / 2)


def report_of(directory):
    with open(os.path.join(directory, "report.json")) as f:
        return json.load(f)


def error_of(result):
    lines = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert result["code"] == 2 and len(lines) == 1, result["stderr"][-3000:]
    return lines[0]


def cross_entropy(labels, probabilities):
    return float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels])))


def confusion_of(labels, probabilities, num_classes=3):
    confusion = np.zeros((num_classes, num_classes), int)
    np.add.at(confusion, (labels, probabilities.argmax(1)), 1)
    return confusion


def test_held_out_folder_every_image_with_tta(run, evaluations, expected):
    results, _ = evaluations
    assert results["held_out"]["code"] == 0, results["held_out"]["stderr"][-3000:]
    result = report_of(os.path.join(run, "report_held_out"))  # the default --out
    labels, plain, flip = expected["labels"], expected["plain"], expected["flip"]
    assert result["split"] == "held-out" and result["num_images"] == len(expected["files"]) == 18
    confusion = np.array(result["confusion_matrix"])
    np.testing.assert_array_equal(confusion, confusion_of(labels, plain))
    assert confusion.sum() == 18 and confusion.sum(axis=1).tolist() == [6, 6, 6]
    assert result["accuracy"] == pytest.approx(np.mean(plain.argmax(1) == labels))
    assert result["loss"] == pytest.approx(cross_entropy(labels, plain), abs=1e-5)
    # TTA: the mean of the two views' probabilities. (Averaged logits, or the
    # plain probabilities again, give another loss.)
    tta = result["tta"]
    assert tta["method"] == "flip"
    assert tta["loss"] == pytest.approx(cross_entropy(labels, flip), abs=1e-5)
    assert abs(tta["loss"] - result["loss"]) > 1e-4  # the mirror changed something
    assert tta["accuracy"] == pytest.approx(np.mean(flip.argmax(1) == labels))
    assert tta["top5_accuracy"] is None and 0.0 <= tta["ece"] <= 1.0
    # Held-out data is not what metrics.json describes: no comparison with it.
    assert not any("Warning" in note for note in result["notes"])
    assert "warning:" not in results["held_out"]["stderr"]
    assert "/batch" not in results["held_out"]["stdout"]  # not a terminal: no progress bar
    assert "TTA flip: accuracy" in results["held_out"]["stdout"]

    # Interpretation: the highest-loss files, and the largest mistakes.
    loss = -np.log(plain[np.arange(18), labels])
    highest = [expected["files"][i] for i in np.argsort(-loss)[:10]]
    assert [t["path"] for t in result["top_losses"]] == highest
    first = result["top_losses"][0]
    i = expected["files"].index(first["path"])
    assert first["true"] == CLASSES[labels[i]] and first["predicted"] == CLASSES[plain[i].argmax()]
    assert first["true_probability"] == pytest.approx(plain[i, labels[i]], abs=1e-6)
    assert first["loss"] == pytest.approx(loss[i], abs=1e-5)
    for pair in result["most_confused"]:
        t, p = CLASSES.index(pair["true"]), CLASSES.index(pair["predicted"])
        assert t != p and pair["count"] == confusion[t, p] > 0
    assert sum(m["count"] for m in result["most_confused"]) == 18 - np.trace(confusion)

    markdown = open(os.path.join(run, "report_held_out", "report.md")).read()
    assert "## Plain vs TTA flip" in markdown and "## Most confused" in markdown
    assert f"| accuracy | {result['accuracy']:.4f} | {tta['accuracy']:.4f} |" in markdown
    assert f"| `{highest[0]}` |" in markdown


def test_classify_tta_is_the_mean_of_probabilities(evaluations, expected):
    _, arrays = evaluations
    assert list(arrays["paths"]) == expected["files"]
    np.testing.assert_array_equal(arrays["labels"], expected["labels"])
    np.testing.assert_allclose(arrays["plain"], expected["plain"], atol=1e-5)
    np.testing.assert_allclose(arrays["flip"], expected["flip"], atol=1e-5)
    assert np.abs(arrays["flip"] - arrays["plain"]).max() > 1e-3  # a mirror is another image


def test_labels_are_matched_by_class_name(run, evaluations, expected, data):
    results, _ = evaluations
    assert results["two"]["code"] == 0, results["two"]["stderr"][-3000:]
    result = report_of(os.path.join(run, "report_two"))
    # The data's classes are dark (0) and light (1); light is the model's 2.
    keep = expected["labels"] != 1
    labels, plain = expected["labels"][keep], expected["plain"][keep]
    confusion = np.array(result["confusion_matrix"])
    assert confusion.sum(axis=1).tolist() == [6, 0, 6]
    np.testing.assert_array_equal(confusion, confusion_of(labels, plain))
    assert result["accuracy"] == pytest.approx(np.mean(plain.argmax(1) == labels))
    assert result["loss"] == pytest.approx(cross_entropy(labels, plain), abs=1e-5)
    assert [row["support"] for row in result["per_class"]] == [6, 0, 6]
    assert any("'grey' has no image in this data (support 0)" in n for n in result["notes"])

    # Integer labels in a CSV are the model's indices, in any row order.
    assert results["integers"]["code"] == 0, results["integers"]["stderr"][-3000:]
    integers = report_of(os.path.join(data["root"], "integers"))  # its --out
    np.testing.assert_array_equal(
        integers["confusion_matrix"], confusion_of(expected["labels"], expected["plain"])
    )


def test_validation_split_as_before_with_a_progress_bar(run, evaluations):
    results, _ = evaluations
    validation = results["validation"]
    assert validation["code"] == 0, validation["stderr"][-3000:]
    result = report_of(os.path.join(run, "report"))
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    assert result["split"] == "validation" and result["data"] is None
    assert result["num_images"] == metrics["val_images"] == 6  # round(0.25 x 10) per class
    assert result["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert result["tta"] is None and "warning:" not in validation["stderr"]
    # The progress bar: 2 batches of (at most) 4, on the terminal.
    assert "2/2" in validation["stdout"] and "/batch" in validation["stdout"]


def test_bad_input_is_one_line_exit_2_and_nothing_written(run, evaluations, data):
    results, _ = evaluations
    assert error_of(results["unknown_tta"]) == "error: unknown --tta 'mirror'. Choose one of: none, flip."
    assert error_of(results["unwritable"]) == (
        f"error: --out {data['a_file']}/report is under {data['a_file']}, which is a file, "
        "not a folder; give a folder for the report."
    )
    # Both before any model work: TensorFlow was not even imported.
    assert not results["unknown_tta"]["tensorflow"] and not results["unwritable"]["tensorflow"]
    assert error_of(results["unknown_class"]) == (
        f"error: the data at {data['zebra']} has class 'zebra', which the model was not "
        "trained on (its classes: dark, grey, light)"
    )
    assert error_of(results["beyond"]) == (
        f"error: the data at {data['beyond']} has the integer label 3, but the model has 3 "
        "classes (labels 0..2: dark, grey, light); fix the label, or label by class name."
    )
    assert "'/no/such/folder' does not exist" in error_of(results["no_data"])
    written = sorted(n for n in os.listdir(run) if n.startswith("report"))
    assert written == ["report", "report_held_out", "report_two"]  # the successful cases'

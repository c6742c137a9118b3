"""`launch.export`, `launch.predict` and `launch.evaluate` end to end, and their errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, assert_depends_on_images, run_train, write_image_folder
from keras_ft import export


def run_module(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("launch.export", ["--workdir=/no/such/run"], "workdir /no/such/run does not exist"),
        ("launch.evaluate", ["--workdir=/no/such/run"], "workdir /no/such/run does not exist"),
        ("launch.predict", ["--export=/no/such/export", "a.png"], "no SavedModel at /no/such/export"),
    ],
)
def test_missing_input_is_one_line_and_exit_2(module, args, message):
    result = run_module(module, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(error_lines(result)) == 1 and message in error_lines(result)[0]


def test_workdir_without_checkpoint_is_exit_2(tmp_path):
    result = run_module("launch.evaluate", f"--workdir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result) == [f"error: {tmp_path} has no config.json: is it a keras_ft workdir?"]


@pytest.mark.slow
def test_export_predict_evaluate(tmp_path):
    classes = {"dark": 10, "light": 10}
    images = write_image_folder(tmp_path / "images", classes)
    workdir = tmp_path / "run"
    # A policy that crops: the TFLite model takes images the caller sized,
    # the SavedModel sizes them itself; both must agree on the crop. At the
    # tiny config's rate 0.01 this run diverges (every probability 0 or 1,
    # on which any two models agree); at 0.001 it trains.
    trained = run_train(
        workdir, f"--config.data.source=folder:{images}", "--config.data.resize=resize_then_crop",
        "--config.optimizer.learning_rate=0.001",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    # One pass of the 16 training images in whole batches of 4.
    assert "Re-estimated BatchNorm statistics on 4 training batches" in trained.stderr
    export_dir = workdir / "export"

    # ------------------------------------------------------------ export
    exported = run_module("launch.export", f"--workdir={workdir}", "--tflite")
    assert exported.returncode == 0, exported.stderr[-3000:] + exported.stdout
    assert {"saved_model.pb", "model.tflite", "labels.txt"} <= set(os.listdir(export_dir))
    assert not [n for n in os.listdir(workdir) if n.startswith(".")]  # no temporary leftovers
    assert (export_dir / "labels.txt").read_text().split() == ["dark", "light"]
    parity = re.search(
        r"TFLite parity: max \|probability difference\| (\S+) on 4 validation images",
        exported.stdout,
    )
    assert parity and float(parity.group(1)) <= 1e-4, exported.stdout
    # The same, apart from launch.export: squares of 37 px (32 / 0.875)
    # served, their central 32 x 32 (cropped here by index) to TFLite, on
    # outputs that differ from image to image (a parity of constants would
    # hold whatever either model did to the pixels).
    files = sorted(str(p) for p in (tmp_path / "images").glob("*/*"))
    squares = np.stack([
        tf.cast(tf.round(tf.image.resize(tf.io.decode_image(tf.io.read_file(f), channels=3),
                                         (37, 37), antialias=True)), tf.uint8).numpy()
        for f in files
    ])
    served = tf.saved_model.load(str(export_dir)).signatures["serving_uint8"]
    expected = served(images=tf.constant(squares))["probabilities"].numpy()
    # (a spread 50x the TFLite tolerance; a model blind to pixels gives ~1e-7)
    assert_depends_on_images(expected, at_least=50 * export.TFLITE_TOLERANCE)
    tflite = export.run_tflite(str(export_dir / "model.tflite"), squares[:, 2:34, 2:34])
    np.testing.assert_allclose(tflite, expected, atol=export.TFLITE_TOLERANCE)

    cli = run_module("tensorflow.python.tools.saved_model_cli", "show", "--dir", export_dir, "--all")
    assert cli.returncode == 0, cli.stderr[-3000:]
    for name, shape in (("serving_default", "(-1)"), ("serving_uint8", "(-1, -1, -1, 3)")):
        block = cli.stdout.split(f"signature_def['{name}']")[1].split("signature_def[")[0]
        assert f"shape: {shape}" in block  # the input, with a dynamic batch
        assert "outputs['probabilities']" in block and "shape: (-1, 2)" in block
        assert "outputs['classes']" in block

    # ----------------------------------------------------------- predict
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not a jpeg")
    dark, light = f"{images}/dark/000.png", f"{images}/light/002.png"
    predicted = run_module("launch.predict", f"--export={export_dir}", dark, corrupt, light, "--top_k=5")
    assert predicted.returncode == 2, predicted.stderr[-3000:]
    assert error_lines(predicted) == [
        f"error: skipped {corrupt}: cannot decode: a corrupt or truncated JPEG."
    ]
    lines = predicted.stdout.splitlines()
    assert [l for l in lines if not l.startswith(" ")] == [dark, light]
    ranked = [l.split() for l in lines if l.startswith(" ")]
    assert len(ranked) == 4  # top_k=5 clipped to the 2 classes, for each image
    for first, second in (ranked[:2], ranked[2:]):
        assert {first[1], second[1]} == {"dark", "light"}
        p1, p2 = float(first[2]), float(second[2])
        assert p1 >= p2 and abs(p1 + p2 - 1) < 2e-4

    # ---------------------------------------------------------- evaluate
    evaluated = run_module("launch.evaluate", f"--workdir={workdir}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report_dir = workdir / "report"
    for name in ("report.md", "report.json", "confusion_matrix.png", "reliability.png",
                 "training_curves.png"):
        assert (report_dir / name).stat().st_size > 0, name
    result = json.loads((report_dir / "report.json").read_text())
    confusion = np.array(result["confusion_matrix"])
    val_images = json.loads((workdir / "metrics.json").read_text())["val_images"]
    assert confusion.sum() == result["num_images"] == val_images == 4  # round(0.25 x 10) per class
    assert result["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    # The same split and checkpoint as the trainer's own evaluation.
    trained_accuracy = json.loads((workdir / "metrics.json").read_text())["val_accuracy"]
    assert result["accuracy"] == pytest.approx(trained_accuracy, abs=1e-6)
    assert [row["support"] for row in result["per_class"]] == confusion.sum(axis=1).tolist()
    assert result["top5_accuracy"] is None and "top5_note" in result
    assert 0.0 <= result["calibration"]["ece"] <= 1.0 and result["calibration"]["num_bins"] == 15
    markdown = (report_dir / "report.md").read_text()
    for name in classes:
        assert f"| {name} |" in markdown
    assert "mobilenet_v2" in markdown and "Top-5 accuracy omitted" in markdown

"""Report metrics against hand-computed values, and the figures and markdown."""

import numpy as np
import pytest

from keras_ft import report

# 3 classes, 6 images. Hand-worked below.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array([
    [0.70, 0.20, 0.10],  # predicted 0, right, confidence 0.70
    [0.10, 0.62, 0.28],  # predicted 1, wrong (true 0), confidence 0.62
    [0.05, 0.90, 0.05],  # predicted 1, right, confidence 0.90
    [0.28, 0.28, 0.44],  # predicted 2, wrong (true 1), confidence 0.44
    [0.19, 0.19, 0.62],  # predicted 2, right, confidence 0.62
    [0.50, 0.45, 0.05],  # predicted 0, wrong (true 2), confidence 0.50
])  # No confidence is a multiple of 1/15: no bin edge depends on rounding.


def test_confusion_matrix_rows_are_true_columns_predicted():
    confusion = report.confusion_matrix(LABELS, PROBABILITIES.argmax(1), 3)
    np.testing.assert_array_equal(confusion, [[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    # Asymmetric case: transposing rows and columns would fail here.
    np.testing.assert_array_equal(
        report.confusion_matrix([0, 0, 0, 1], [1, 1, 0, 1], 3), [[1, 2, 0], [0, 1, 0], [0, 0, 0]]
    )
    assert report.accuracy_from_confusion(confusion) == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match=r"predictions must be in \[0, 3\)"):
        report.confusion_matrix([0], [3], 3)


def test_precision_recall_f1_by_hand():
    # True 0: 3 as 0, 1 as 1; true 1: 2 as 1; true 2: 2 as 0 (never predicted).
    # Precision = diagonal / column sums (5, 3, 0); recall = diagonal / row sums (4, 2, 2).
    confusion = np.array([[3, 1, 0], [0, 2, 0], [2, 0, 0]])
    out = report.precision_recall_f1(confusion)
    np.testing.assert_allclose(out["precision"], [3 / 5, 2 / 3, 0.0])
    np.testing.assert_allclose(out["recall"], [3 / 4, 1.0, 0.0])
    f1_0 = 2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4)  # = 2/3
    np.testing.assert_allclose(out["f1"], [f1_0, 0.8, 0.0])
    np.testing.assert_array_equal(out["support"], [4, 2, 2])
    # A class with no images: recall 0, not NaN.
    empty = report.precision_recall_f1(np.array([[2, 0], [0, 0]]))
    np.testing.assert_array_equal(empty["recall"], [1.0, 0.0])
    np.testing.assert_array_equal(empty["precision"], [1.0, 0.0])


def test_top_k_accuracy_by_hand_and_ties_like_argmax():
    # Top-2 sets per image: {0,1} {1,2} {1,0} (0.05 tie -> lower index) {2,0}
    # (0.28 tie -> 0) {2,0} {0,1}; labels 0 0 1 1 2 2 are in: yes no yes no yes no.
    assert report.top_k_accuracy(LABELS, PROBABILITIES, 1) == pytest.approx(3 / 6)
    assert report.top_k_accuracy(LABELS, PROBABILITIES, 2) == pytest.approx(3 / 6)
    assert report.top_k_accuracy(LABELS, PROBABILITIES, 3) == 1.0
    # 0.30, 0.30, 0.40: top-2 is {2, 0} (the tie goes to 0).
    assert report.top_k_accuracy([1], [[0.3, 0.3, 0.4]], 2) == 0.0
    assert report.top_k_accuracy([0], [[0.3, 0.3, 0.4]], 2) == 1.0
    # Top-1 always equals argmax accuracy, ties included.
    tie = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert report.top_k_accuracy([0, 1], tie, 1) == 0.5
    with pytest.raises(ValueError, match="k must be in"):
        report.top_k_accuracy(LABELS, PROBABILITIES, 4)


def test_expected_calibration_error_by_hand():
    # 15 bins of width 1/15, bin b = (b/15, (b+1)/15]: confidence x goes to
    # bin floor(15x): 0.44 -> 6, 0.50 -> 7, 0.62 -> 9 (twice), 0.70 -> 10, 0.90 -> 13.
    bins = report.calibration_bins(LABELS, PROBABILITIES)
    counts = np.zeros(15, int)
    counts[[6, 7, 9, 10, 13]] = [1, 1, 2, 1, 1]
    np.testing.assert_array_equal(bins["count"], counts)
    assert bins["accuracy"][9] == 0.5 and bins["confidence"][9] == pytest.approx(0.62)
    # Bin share x |accuracy - confidence|: bin 6: 1/6 x 0.44, bin 7: 1/6 x 0.5,
    # bin 9: 2/6 x 0.12, bin 10: 1/6 x 0.3, bin 13: 1/6 x 0.1 -> 1.58 / 6.
    assert report.expected_calibration_error(LABELS, PROBABILITIES) == pytest.approx(1.58 / 6)
    # Two bins, and the right-closed edge: 0.5 falls in (0, 0.5] with 0.44
    # (accuracy 0, confidence 0.47); (0.5, 1] holds 0.62, 0.62, 0.7, 0.9
    # (accuracy 3/4, confidence 0.71).
    assert report.expected_calibration_error(LABELS, PROBABILITIES, 2) == pytest.approx(
        2 / 6 * 0.47 + 4 / 6 * 0.04
    )
    # Perfectly calibrated: confidence 1 and always right.
    assert report.expected_calibration_error([0, 1], [[1.0, 0.0], [0.0, 1.0]]) == 0.0


def test_evaluate_and_markdown(tmp_path):
    names = ["cat", "dog", "a|b"]
    result = report.evaluate(LABELS, PROBABILITIES, names)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["top5_accuracy"] is None and "only 3 classes" in result["top5_note"]
    assert result["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.1, 0.9, 0.28, 0.62, 0.05])))
    assert sum(row["support"] for row in result["per_class"]) == 6
    # Six classes: the least probable one is outside the top 5.
    six = np.array([[0.5, 0.2, 0.1, 0.1, 0.06, 0.04]] * 2)
    assert report.evaluate([5, 4], six, list("abcdef"))["top5_accuracy"] == 0.5

    result.update(workdir="/w", split="validation", checkpoint="ckpt", figures={},
                  recipe={"backbone": "resnet50"}, notes=["a note"])
    text = report.render_markdown(result)
    assert "| cat | 0.5000 | 0.5000 | 0.5000 | 2 |" in text
    assert "| a\\|b |" in text  # a "|" in a class name does not break the table
    assert "| backbone | resnet50 |" in text and "a note" in text


def test_figures_are_written(tmp_path):
    result = report.evaluate(LABELS, PROBABILITIES, ["cat", "dog", "bird"])
    rows = [dict(epoch=e, loss=1 / e, val_loss=1.2 / e, accuracy=0.2 * e,
                 val_accuracy=0.15 * e, stage=1 if e < 3 else 2) for e in (1, 2, 3, 4)]
    for path in (
        report.plot_confusion_matrix(result["confusion_matrix"], ["cat", "dog", "bird"],
                                     str(tmp_path / "c.png")),
        report.plot_reliability(result["calibration"], str(tmp_path / "r.png")),
        report.plot_history([{k: str(v) for k, v in r.items()} for r in rows], str(tmp_path / "h.png")),
    ):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_most_confused_by_hand():
    # Off-diagonal entries: (cat->dog) 3, (dog->cat) 1, (dog->bird) 3, (bird->cat) 2.
    confusion = np.array([[5, 3, 0], [1, 4, 3], [2, 0, 7]])
    names = ["cat", "dog", "bird"]
    assert report.most_confused(confusion, names, k=10) == [
        {"true": "cat", "predicted": "dog", "count": 3},  # the tie at 3: "cat" < "dog"
        {"true": "dog", "predicted": "bird", "count": 3},
        {"true": "bird", "predicted": "cat", "count": 2},
        {"true": "dog", "predicted": "cat", "count": 1},
    ]  # the diagonal (right answers) and the zeros are left out
    assert report.most_confused(confusion, names, k=2) == report.most_confused(confusion, names)[:2]
    # Ties by the predicted class's name once the true class is the same.
    tied = np.array([[0, 2, 2], [0, 0, 0], [0, 0, 0]])
    assert [m["predicted"] for m in report.most_confused(tied, ["x", "b", "a"])] == ["a", "b"]
    assert report.most_confused(np.diag([3, 4]), ["a", "b"]) == []


def test_top_losses_by_hand():
    # Losses -log p(true): 0.357, 2.303, 0.105, 1.273, 0.478, 2.996.
    paths = [f"{i}.png" for i in range(6)]
    names = ["cat", "dog", "bird"]
    top = report.top_losses(LABELS, PROBABILITIES, paths, names, k=3)
    assert [t["path"] for t in top] == ["5.png", "1.png", "3.png"]
    assert top[0] == {
        "path": "5.png", "true": "bird", "predicted": "cat", "probability": 0.50,
        "true_probability": 0.05, "loss": pytest.approx(-np.log(0.05)),
    }
    assert top[1]["predicted"] == "dog" and top[1]["true_probability"] == pytest.approx(0.10)
    # All of them: highest first, and their mean is the report's loss.
    every = report.top_losses(LABELS, PROBABILITIES, paths, names, k=10)
    assert [t["path"] for t in every] == ["5.png", "1.png", "3.png", "4.png", "0.png", "2.png"]
    assert np.mean([t["loss"] for t in every]) == pytest.approx(
        report.cross_entropy(LABELS, PROBABILITIES)
    )
    # Ties keep the input order; a probability of 0 is a finite loss.
    tie = report.top_losses([0, 0, 1], [[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]], ["a", "b", "c"],
                            ["x", "y"], k=3)
    assert [t["path"] for t in tie] == ["c", "a", "b"]
    assert tie[0]["loss"] == pytest.approx(-np.log(report.LOG_EPS))
    with pytest.raises(ValueError, match="2 paths, 6 labels"):
        report.top_losses(LABELS, PROBABILITIES, paths[:2], names)


def test_markdown_interpretation_and_tta_tables():
    names = ["cat", "dog", "bird"]
    result = report.evaluate(LABELS, PROBABILITIES, names)
    tta = report.evaluate(LABELS, [[0.9, 0.05, 0.05]] * 6, names)
    result.update(
        workdir="/w", split="held-out", data="folder:/d", checkpoint="ckpt", figures={},
        recipe={}, notes=[],
        tta={"method": "flip", **report.headline(tta)},
        most_confused=report.most_confused(result["confusion_matrix"], names),
        top_losses=report.top_losses(LABELS, PROBABILITIES, ["a|b.png"] + list("bcdef"), names),
    )
    text = report.render_markdown(result)
    assert "Split: **held-out** `folder:/d` (6 images" in text
    assert "| metric | plain | TTA flip |" in text
    # Plain accuracy 3/6; TTA (always "cat", right on the 2 cats) 2/6.
    assert "| accuracy | 0.5000 | 0.3333 |" in text
    assert f"| loss (cross-entropy) | {result['loss']:.4g} | {tta['loss']:.4g} |" in text
    assert "| cat | dog | 1 |" in text and "| bird | cat | 1 |" in text
    assert "| `f` | bird | cat | 0.5000 | 0.0500 | 2.996 |" in text  # the top loss first
    assert "| `a\\|b.png` |" in text
    clean = report.evaluate([0, 1], [[0.9, 0.1], [0.2, 0.8]], ["a", "b"])
    clean.update(workdir="/w", split="validation", checkpoint="c", figures={}, recipe={},
                 most_confused=[])
    assert "No image was misclassified." in report.render_markdown(clean)

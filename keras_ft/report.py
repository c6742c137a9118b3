"""Evaluation metrics, figures and the report of a trained classifier.

The metrics are small numpy functions of integer labels and predicted
probabilities, so they are easy to check by hand:

    confusion_matrix       counts [C, C], rows = true class, columns = predicted
    precision_recall_f1    per class, from a confusion matrix, with support
    top_k_accuracy         share of labels among the k most probable classes
    calibration_bins       per-confidence-bin counts, accuracy and confidence
    expected_calibration_error   ECE over equal-width confidence bins

and the interpretation of fastai's `ClassificationInterpretation`:

    most_confused          the largest off-diagonal confusion entries
    top_losses             the images of highest cross-entropy

The figures (confusion matrix, reliability diagram, training curves) use
matplotlib's "Agg" backend, imported only when a figure is drawn.
`render_markdown` turns the report dict written to `report.json` into
`report.md`.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # Guo et al. (2017), "On Calibration of Modern Neural Networks"
LOG_EPS = 1e-12  # probabilities are clipped to this before the log: a finite loss


# ---------------------------------------------------------------- metrics


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """Counts `[C, C]`: entry (i, j) is how many images of class i were predicted j."""
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(predictions, np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.shape} labels but {predictions.shape} predictions.")
    for name, v in (("labels", labels), ("predictions", predictions)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), got [{v.min()}, {v.max()}].")
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def accuracy_from_confusion(confusion: np.ndarray) -> float:
    """Share of the diagonal: correct predictions over all."""
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else 0.0


def precision_recall_f1(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix.

    A class never predicted has precision 0; a class with no images has
    recall 0; F1 is 0 where precision + recall is 0 (scikit-learn's
    `zero_division=0`).

    Returns:
        A dict of arrays [C]: `precision`, `recall`, `f1` (float) and
        `support` (int: images of the class).
    """
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    def ratio(a, b):  # a / b, and 0 where b is 0
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    precision = ratio(true_positive, predicted)
    recall = ratio(true_positive, support)
    f1 = ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def top_k_accuracy(labels, probabilities, k: int) -> float:
    """Share of images whose label is among the `k` most probable classes.

    Ties go to the lower class index, as `argmax` does, so `k=1` equals the
    accuracy of `argmax` predictions.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    if not 1 <= k <= probabilities.shape[1]:
        raise ValueError(f"k must be in [1, {probabilities.shape[1]}], got {k}.")
    if not len(labels):
        return 0.0
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def calibration_bins(labels, probabilities, num_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Top-1 confidence against accuracy in `num_bins` equal-width bins.

    Bin b holds the images whose confidence (the top probability) lies in
    (b/B, (b+1)/B]; a confidence of exactly 0 goes to the first bin.

    Returns:
        A dict of arrays [B]: `lower`, `upper` (bin edges), `count`,
        `accuracy` and `confidence` (means over the bin; 0 where empty).
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # right=True: edges[b] < c <= edges[b+1] lands in bin b.
    index = np.digitize(confidence, edges[1:-1], right=True)
    count = np.bincount(index, minlength=num_bins)
    safe = np.maximum(count, 1)
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "count": count,
        "accuracy": np.bincount(index, weights=correct, minlength=num_bins) / safe,
        "confidence": np.bincount(index, weights=confidence, minlength=num_bins) / safe,
    }


def expected_calibration_error(labels, probabilities, num_bins: int = ECE_BINS) -> float:
    """ECE = sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    bins = calibration_bins(labels, probabilities, num_bins)
    total = bins["count"].sum()
    if not total:
        return 0.0
    gaps = np.abs(bins["accuracy"] - bins["confidence"])
    return float(np.sum(bins["count"] / total * gaps))


def cross_entropy(labels, probabilities, eps: float = LOG_EPS) -> float:
    """Mean negative log-probability of the true class."""
    probabilities = np.asarray(probabilities, np.float64)
    picked = probabilities[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.maximum(picked, eps))))


def evaluate(labels, probabilities, class_names: list[str]) -> dict:
    """Every metric of the report, as JSON-able numbers.

    Top-5 accuracy needs at least 5 classes; with fewer it is None and
    `top5_note` says why (top-k with k = the number of classes is always 1).
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    num_classes = len(class_names)
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1), num_classes)
    per_class = precision_recall_f1(confusion)
    bins = calibration_bins(labels, probabilities)
    result = {
        "num_images": int(len(labels)),
        "class_names": list(class_names),
        "accuracy": accuracy_from_confusion(confusion),
        "top5_accuracy": None,
        "loss": cross_entropy(labels, probabilities),
        "confusion_matrix": confusion.tolist(),
        "per_class": [
            {
                "class": name,
                "precision": float(per_class["precision"][i]),
                "recall": float(per_class["recall"][i]),
                "f1": float(per_class["f1"][i]),
                "support": int(per_class["support"][i]),
            }
            for i, name in enumerate(class_names)
        ],
        "macro_avg": {k: float(np.mean(per_class[k])) for k in ("precision", "recall", "f1")},
        "calibration": {
            "ece": expected_calibration_error(labels, probabilities),
            "num_bins": ECE_BINS,
            "bins": [
                {k: (int(bins[k][b]) if k == "count" else float(bins[k][b])) for k in bins}
                for b in range(ECE_BINS)
            ],
        },
    }
    if num_classes >= 5:
        result["top5_accuracy"] = top_k_accuracy(labels, probabilities, 5)
    else:
        result["top5_note"] = (
            f"Top-5 accuracy omitted: there are only {num_classes} classes, and "
            f"top-{num_classes} accuracy is 1 by definition."
        )
    return result


def headline(result: dict) -> dict:
    """The figures two evaluations are compared by (plain vs test-time
    augmentation): accuracy, top-5 accuracy, loss and ECE of an `evaluate` result."""
    return {
        "accuracy": result["accuracy"],
        "top5_accuracy": result["top5_accuracy"],
        "loss": result["loss"],
        "ece": result["calibration"]["ece"],
    }


# --------------------------------------------------------- interpretation


def most_confused(confusion, class_names: list[str], k: int = 10) -> list[dict]:
    """The `k` most frequent mistakes: off-diagonal confusion entries.

    As fastai's `ClassificationInterpretation.most_confused(min_val=1)`:
    entries of 0 are left out; the largest count comes first, ties in order
    of the true class's name, then the predicted class's.

    Returns:
        Up to `k` dicts `{"true", "predicted", "count"}` (class names, images).
    """
    confusion = np.asarray(confusion)
    mistakes = confusion * (1 - np.eye(len(class_names), dtype=confusion.dtype))
    pairs = [
        (int(confusion[i, j]), class_names[i], class_names[j])
        for i, j in np.argwhere(mistakes > 0)  # at most one pair per image: no C^2 loop
    ]
    pairs.sort(key=lambda pair: (-pair[0], pair[1], pair[2]))
    return [{"true": t, "predicted": p, "count": n} for n, t, p in pairs[:k]]


def top_losses(labels, probabilities, paths, class_names: list[str], k: int = 10) -> list[dict]:
    """The `k` images the model is most wrong about: highest cross-entropy first.

    An image's loss is `-log p(true class)` (clipped at `LOG_EPS`, as in
    `cross_entropy`, whose mean it is); ties keep the input order.

    Args:
        labels: int `[N]`, the true classes.
        probabilities: `[N, C]`.
        paths: `N` names of the images (file paths), in the same order.
        class_names: the `C` class names.
        k: how many images to list (at most N).

    Returns:
        Up to `k` dicts `{"path", "true", "predicted", "probability" (of the
        predicted class), "true_probability", "loss"}`.
    """
    labels = np.asarray(labels, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    if not len(paths) == len(labels) == len(probabilities):
        raise ValueError(
            f"{len(paths)} paths, {len(labels)} labels and {len(probabilities)} "
            "rows of probabilities: give one of each per image."
        )
    true_probability = probabilities[np.arange(len(labels)), labels]
    loss = -np.log(np.maximum(true_probability, LOG_EPS))
    predicted = probabilities.argmax(axis=1)
    return [
        {
            "path": str(paths[i]),
            "true": class_names[labels[i]],
            "predicted": class_names[predicted[i]],
            "probability": float(probabilities[i, predicted[i]]),
            "true_probability": float(true_probability[i]),
            "loss": float(loss[i]),
        }
        for i in np.argsort(-loss, kind="stable")[:k]
    ]


# ---------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(confusion, class_names: list[str], path: str) -> str:
    """Counts in cells, class names on both axes, darker = more images."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    confusion = np.asarray(confusion)
    n = len(class_names)
    side = min(max(4.5, 0.45 * n + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(confusion, cmap="Blues", vmin=0, vmax=max(int(confusion.max()), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images",
                 ticks=MaxNLocator(integer=True))
    slanted = n > 4  # long names side by side would overlap
    ax.set_xticks(range(n), labels=class_names, rotation=45 if slanted else 0,
                  ha="right" if slanted else "center")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(confusion.sum())} images)")
    if n <= 30:  # beyond that the digits no longer fit their cells
        threshold = confusion.max() / 2.0
        font = 12 if n <= 10 else 8
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=font,
                        color="white" if confusion[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reliability(calibration: dict, path: str) -> str:
    """Accuracy per confidence bin against the diagonal, with bin sizes below."""
    plt = _pyplot()
    bins = calibration["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = bins[0]["upper"] - bins[0]["lower"]
    count = np.array([b["count"] for b in bins])
    accuracy = np.array([b["accuracy"] for b in bins])
    confidence = np.array([b["confidence"] for b in bins])
    filled = count > 0
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.bar(lower[filled], accuracy[filled], width=width, align="edge",
            edgecolor="black", color="tab:blue", label="accuracy in bin")
    # The gap from accuracy up (or down) to the bin's mean confidence.
    top.bar(lower[filled], (confidence - accuracy)[filled], bottom=accuracy[filled],
            width=width, align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red",
            hatch="//", label="gap to mean confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {calibration['ece']:.3f}, "
                  f"{calibration['num_bins']} bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(lower, count, width=width, align="edge", edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_history(rows: list[dict], path: str) -> str:
    """Loss and accuracy per epoch, train and validation; dotted lines mark stage changes."""
    plt = _pyplot()
    epochs = [int(float(r["epoch"])) for r in rows]

    def column(key):
        return [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, label, style in ((metric, "train", "o-"), (f"val_{metric}", "validation", "s--")):
            if rows and key in rows[0]:
                ax.plot(epochs, column(key), style, label=label)
        if rows and "stage" in rows[0]:
            stage = column("stage")
            for i in range(1, len(rows)):
                if stage[i] != stage[i - 1]:
                    ax.axvline(epochs[i] - 0.5, color="gray", linestyle=":")
                    # Above the plotting area, where no curve can hide it.
                    ax.text(epochs[i] - 0.5, 1.01, f"stage {int(stage[i])}", ha="center",
                            va="bottom", fontsize=8, color="dimgray",
                            transform=ax.get_xaxis_transform())
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        ax.grid(alpha=0.3)
    if rows and "accuracy" in rows[0]:
        axes[1].set_ylim(-0.02, 1.02)
    fig.suptitle("Training curves (dotted lines: freezing stage changes)")
    # One legend above both plots: inside, it would cover curves near 0 or 1.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.93),
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- markdown


def _number(x, digits=4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _probability(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.2e}"  # a confident mistake's p can be ~1e-9


def _cell(value) -> str:
    return str(value).replace("|", "\\|")  # a "|" would end the table cell


def render_markdown(report: dict) -> str:
    """The human-readable `report.md` of a report dict (see `launch.evaluate`)."""
    lines = [f"# Evaluation report: `{report['workdir']}`", ""]
    data = f" `{report['data']}`" if report.get("data") else ""
    lines += [
        f"Split: **{report['split']}**{data} ({report['num_images']} images, "
        f"{len(report['class_names'])} classes), model from `{report['checkpoint']}`.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_number(report['accuracy'])} |",
    ]
    if report["top5_accuracy"] is not None:
        lines.append(f"| top-5 accuracy | {_number(report['top5_accuracy'])} |")
    lines += [
        # Significant digits: a confident model's loss and ECE can be ~1e-5.
        f"| loss (cross-entropy) | {report['loss']:.4g} |",
        f"| expected calibration error ({report['calibration']['num_bins']} bins) "
        f"| {report['calibration']['ece']:.4g} |",
        f"| macro F1 | {_number(report['macro_avg']['f1'])} |",
        "",
    ]
    if report.get("top5_note"):
        lines += [f"_{report['top5_note']}_", ""]
    if report.get("tta"):
        lines += _tta_table(report)
    lines += ["## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for row in report["per_class"]:
        lines.append(
            f"| {_cell(row['class'])} | {_number(row['precision'])} | {_number(row['recall'])} "
            f"| {_number(row['f1'])} | {row['support']} |"
        )
    macro = report["macro_avg"]
    lines += [
        f"| _macro average_ | {_number(macro['precision'])} | {_number(macro['recall'])} "
        f"| {_number(macro['f1'])} | {report['num_images']} |",
        "",
    ]
    lines += _interpretation(report)
    lines += ["## Figures", ""]
    titles = {
        "confusion_matrix": "Confusion matrix (rows: true class, columns: predicted)",
        "reliability": "Reliability diagram",
        "training_curves": "Training curves",
    }
    for key, title in titles.items():
        if key in report["figures"]:
            lines += [f"### {title}", "", f"![{title}]({report['figures'][key]})", ""]
    lines += ["## Recipe", "", "| setting | value |", "|---|---|"]
    for key, value in report["recipe"].items():
        lines.append(f"| {key} | {_cell(value)} |")
    lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def _tta_table(report: dict) -> list[str]:
    """The plain figures beside those with test-time augmentation."""
    tta, plain = report["tta"], headline(report)
    rows = [("accuracy", "accuracy", _number), ("top-5 accuracy", "top5_accuracy", _number),
            ("loss (cross-entropy)", "loss", "{:.4g}".format),
            ("expected calibration error", "ece", "{:.4g}".format)]
    lines = [f"## Plain vs TTA {tta['method']}", "", f"| metric | plain | TTA {tta['method']} |",
             "|---|---|---|"]
    for title, key, shown in rows:
        if plain[key] is not None:
            lines.append(f"| {title} | {shown(plain[key])} | {shown(tta[key])} |")
    lines.append("")
    if tta.get("description"):
        lines += [f"_{tta['description']}_", ""]
    return lines


def _interpretation(report: dict) -> list[str]:
    """The most-confused class pairs and the top-loss images, if the report has them."""
    lines = []
    if "most_confused" in report:
        lines += ["## Most confused", ""]
        if report["most_confused"]:
            lines += ["| true class | predicted as | images |", "|---|---|---|"]
            lines += [f"| {_cell(m['true'])} | {_cell(m['predicted'])} | {m['count']} |"
                      for m in report["most_confused"]]
        else:
            lines.append("No image was misclassified.")
        lines.append("")
    if report.get("top_losses"):
        lines += [
            f"## Top losses (the {len(report['top_losses'])} images of highest cross-entropy)", "",
            "| image | true class | predicted | probability | true class's probability | loss |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| `{_cell(t['path'])}` | {_cell(t['true'])} | {_cell(t['predicted'])} "
            f"| {_probability(t['probability'])} | {_probability(t['true_probability'])} "
            f"| {t['loss']:.4g} |"
            for t in report["top_losses"]
        ]
        lines.append("")
    return lines

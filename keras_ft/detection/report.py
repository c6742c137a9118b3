"""The report of a detection evaluation: figures a reader checks a detector by.

    report.md      mAP@[.5:.95], AP50, AP75, AP by object size, AR@100, and
                   per-class AP with object counts
    report.json    the same numbers and the precision/recall curves
    pr_curves.png  precision against recall at IoU 0.5, one curve per class
    examples.png   validation images with their true boxes (dashed) and
                   the detections scoring `SHOWN_SCORE` or more, labelled

Every file is written whole or not at all (`keras_ft.workdir.write_atomic`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from keras_ft import report as report_lib, seg_metrics, workdir

EXAMPLES = 6  # validation images drawn
SHOWN_SCORE = 0.3  # detections drawn from this score
RECALLS = np.linspace(0.0, 1.0, 101)  # COCO's recall points
HEADLINE = (("map", "mAP@[.5:.95]"), ("ap50", "AP50"), ("ap75", "AP75"),
            ("ap_small", "AP small (< 32² px)"), ("ap_medium", "AP medium"),
            ("ap_large", "AP large (> 96² px)"), ("ar100", "AR@100"))


def write_report(out_dir: str, result: dict, val_set, class_names: list[str]) -> list[str]:
    """Writes the report of `result` (`metrics.coco_evaluate`'s dict, with
    the per-image `detections`) on `val_set` (a `sources.DetSet`) into
    `out_dir`; returns the paths written, report.md first."""
    os.makedirs(out_dir, exist_ok=True)
    labels = [np.asarray(c, np.int64).reshape(-1) for c in val_set.classes]
    counts = np.bincount(np.concatenate(labels or [np.zeros(0, np.int64)]), minlength=len(class_names))
    figures = {
        "pr_curves": seg_metrics._save(_plot_pr(result["pr50"]), os.path.join(out_dir, "pr_curves.png")),
    }
    if len(val_set):
        figures["examples"] = seg_metrics._save(
            _plot_examples(val_set, result["detections"], class_names),
            os.path.join(out_dir, "examples.png"))
    numbers = {k: v for k, v in result.items() if k != "detections"}
    numbers["objects"] = dict(zip(class_names, counts.tolist()))
    numbers["images"] = len(val_set)
    json_path = os.path.join(out_dir, "report.json")
    workdir.write_atomic(json_path, json.dumps(numbers, indent=2) + "\n")
    path = os.path.join(out_dir, "report.md")
    workdir.write_atomic(path, _markdown(numbers, class_names, figures))
    return [path, json_path, *figures.values()]


def _markdown(numbers: dict, class_names, figures: dict) -> str:
    lines = ["# Detection report", "",
             f"{numbers['images']} validation images, {sum(numbers['objects'].values())} objects, "
             f"{len(class_names)} classes; COCO box metrics by pycocotools.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {report_lib._number(numbers[key]) if numbers[key] is not None else 'n/a (no such object)'} |"
              for key, label in HEADLINE]
    lines += ["", "## Per class", "", "| class | AP@[.5:.95] | objects |", "|---|---|---|"]
    for name in class_names:
        ap = numbers["per_class"].get(name)
        lines.append(f"| {report_lib._cell(name)} | {report_lib._number(ap) if ap is not None else 'n/a (no object)'} "
                     f"| {numbers['objects'][name]} |")
    titles = {"pr_curves": "Precision and recall at IoU 0.5",
              "examples": f"Validation images: true boxes dashed, detections (score >= {SHOWN_SCORE}) solid"}
    lines += ["", "## Figures", ""]
    for key, path in figures.items():
        lines += [f"### {titles[key]}", "", f"![{titles[key]}]({os.path.basename(path)})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _plot_pr(pr50: dict):
    plt = report_lib._pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, precision in pr50.items():
        ax.plot(RECALLS, precision, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall at IoU 0.5")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def _plot_examples(val_set, detections: list[dict], class_names):
    from keras_ft.detection import stream

    plt = report_lib._pyplot()
    from matplotlib.patches import Rectangle

    n = min(EXAMPLES, len(val_set))
    colors = seg_metrics.palette(len(class_names) + 1)[1:] / 255.0
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i in range(n):
        ax = axes.ravel()[i]
        ax.imshow(stream.decoded_image(val_set, i))
        for box, cls in zip(val_set.boxes[i], val_set.classes[i]):
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False,
                                   linestyle="--", linewidth=1.2, edgecolor=colors[cls]))
        d = detections[i]
        for box, score, cls in zip(d["boxes"], d["scores"], d["classes"]):
            if score < SHOWN_SCORE:
                continue
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False,
                                   linewidth=1.6, edgecolor=colors[cls]))
            ax.text(box[0], box[1], f"{class_names[cls]} {score:.2f}", fontsize=6,
                    color="white", va="bottom", bbox=dict(facecolor=colors[cls], pad=0.5, linewidth=0))
    fig.tight_layout()
    return fig

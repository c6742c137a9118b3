"""Semantic segmentation: the per-pixel loss, the metrics and the report.

Labels are integer maps `[B, H, W]` (or `[B, H, W, 1]`) with values in
`[0, C)`, or `IGNORE_LABEL` (255) for pixels that carry no label (object
boundaries in PASCAL VOC, "void" in Cityscapes): those pixels add nothing to
the loss, to the metrics or to their gradients, whatever the model predicts
there. Any other label (a Cityscapes label id where a train id was meant)
is a data error: it makes the loss of its image and the metrics NaN rather
than being silently dropped. Predictions are logits `[B, H, W, C]`.

    PixelCrossentropy   the loss: per image, the mean over its labelled pixels
    MeanIoU             mean over classes of TP / (TP + FP + FN)
    PixelAccuracy       share of labelled pixels predicted right

The metrics accumulate one confusion matrix over the whole evaluation set
and compute their value from it, as the PASCAL VOC and Cityscapes
benchmarks do: the mean IoU of a set is not the mean of its batches' mean
IoUs. The same numbers from a numpy confusion matrix (`confusion_matrix`,
`iou_per_class`, `mean_iou`, `pixel_accuracy`) serve offline evaluation, and
`write_report` writes `report.md` and its figures. `colorize` and `overlay`
turn label maps into pictures with one fixed colour per class.
"""

from __future__ import annotations

import io
import os

import keras
import numpy as np
import tensorflow as tf

from keras_ft import report as report_lib
from keras_ft import workdir

IGNORE_LABEL = 255
# Light grey: the only greys of `palette` (classes 0, 56, 7, 63) are 0, 64, 128 and 192.
IGNORE_COLOR = (224, 224, 224)


def _check_num_classes(num_classes: int) -> int:
    if not 1 <= int(num_classes) <= IGNORE_LABEL:
        raise ValueError(
            f"num_classes must be in [1, {IGNORE_LABEL}] (label {IGNORE_LABEL} means "
            f"'ignore'), got {num_classes}."
        )
    return int(num_classes)


# ------------------------------------------------------------------- loss


@keras.saving.register_keras_serializable(package="keras_ft")
class PixelCrossentropy(keras.losses.Loss):
    """Softmax cross-entropy per pixel, from logits, ignoring label 255.

    The loss of image b, over its labelled pixels V_b (label ≠ 255):

        loss_b = Σ_{p ∈ V_b} w[y_p] · (−log softmax(logits_p)[y_p]) / |V_b|

    and 0 when V_b is empty (an image with no labelled pixel). The divisor is
    the number of labelled pixels, not the sum of their weights as in
    PyTorch's weighted `CrossEntropyLoss`: class weights change the loss's
    scale, so the learning rate tuned without them may want retuning. Every
    image counts the same whatever its number of labelled pixels.

    `loss_b` is the per-sample loss: Keras' reduction
    ("sum_over_batch_size") then averages it over the images of the batch,
    and keras_ft's train step divides that by the replicas in sync, as the
    optimizer sums gradients over replicas. A label outside [0, C) other
    than 255 makes its image's loss NaN (sparse cross-entropy alone raises
    on CPU and returns NaN on GPU), so a run on mislabelled data stops
    at once.

    Args:
        class_weights: optional C floats, the weight w of each class
            (default: all 1).

    Example:

        model.compile(optimizer="sgd",
                      loss=PixelCrossentropy(class_weights=[0.5, 2.0, 1.0]),
                      metrics=[MeanIoU(3), PixelAccuracy(3)])
    """

    def __init__(self, class_weights=None, name="pixel_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if not class_weights or min(class_weights) < 0:
                raise ValueError(
                    f"class_weights must be one non-negative float per class, got {class_weights}."
                )
        self.class_weights = class_weights

    def call(self, y_true, y_pred):
        logits = tf.cast(y_pred, tf.float32)  # float16 logits: the log-softmax in float32
        num_classes = logits.shape[-1]
        if self.class_weights is not None and num_classes is not None \
                and len(self.class_weights) != num_classes:
            raise ValueError(
                f"{len(self.class_weights)} class_weights for {num_classes} classes: give one per class."
            )
        batch = tf.shape(logits)[0]
        logits = tf.reshape(logits, [batch, -1, tf.shape(logits)[-1]])
        labels = tf.reshape(tf.cast(y_true, tf.int32), [batch, -1])  # [B, H, W] or [B, H, W, 1]
        in_range = (labels >= 0) & (labels < tf.shape(logits)[-1])
        # Any class at the others: finite values, and zero gradient there after the mask.
        safe = tf.where(in_range, labels, 0)
        pixel_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
        if self.class_weights is not None:
            pixel_loss = pixel_loss * tf.gather(tf.constant(self.class_weights, tf.float32), safe)
        pixel_loss = tf.where(in_range, pixel_loss, 0.0)
        valid = tf.reduce_sum(tf.cast(in_range, tf.float32), axis=1)
        per_image = tf.reduce_sum(pixel_loss, axis=1) / tf.maximum(valid, 1.0)
        bad = tf.reduce_any(~in_range & (labels != IGNORE_LABEL), axis=1)
        return tf.where(bad, tf.constant(np.nan, tf.float32), per_image)

    def get_config(self):
        return dict(super().get_config(), class_weights=self.class_weights)


# ---------------------------------------------------------------- metrics


@keras.saving.register_keras_serializable(package="keras_ft")
class ConfusionMatrix(keras.metrics.Metric):
    """Pixel counts `[C, C]` over every batch seen: entry (i, j) counts the
    labelled pixels of class i predicted j (argmax of the logits).

    The counts are int64: exact for any evaluation set (float32 stops
    counting at 2**24 pixels per entry, int32 overflows at 2**31 on a large
    set), summed over replicas as Keras sums every metric variable of a
    `tf.distribute` strategy, and int64 works on TPU, where float64 does not.
    Subclasses compute their value from the counts; `result()` here is the
    matrix itself, to read (`metric.result().numpy()`), not to `compile()`.
    Labels outside [0, C) other than 255 are counted apart and make every
    result NaN.

    Args:
        num_classes: C, at most 255.
        name: the metric's name in logs.
    """

    def __init__(self, num_classes: int, name="confusion_matrix", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = _check_num_classes(num_classes)
        c = self.num_classes
        self.matrix = self.add_variable(shape=(c, c), initializer="zeros", dtype="int64",
                                        name="matrix")
        self.out_of_range = self.add_variable(shape=(), initializer="zeros", dtype="int64",
                                              name="out_of_range")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(f"{type(self).__name__} counts pixels and takes no sample_weight; "
                             f"label pixels {IGNORE_LABEL} to leave them out.")
        c = self.num_classes
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        predicted = tf.reshape(tf.argmax(y_pred, axis=-1, output_type=tf.int32), [-1])
        in_range = (labels >= 0) & (labels < c)
        # Pixels without a class go to one extra bin, dropped: static shapes, for XLA.
        index = tf.where(in_range, labels * c + predicted, c * c)
        counts = tf.math.bincount(index, minlength=c * c + 1, maxlength=c * c + 1, dtype=tf.int64)
        self.matrix.assign_add(tf.reshape(counts[: c * c], [c, c]))
        stray = ~in_range & (labels != IGNORE_LABEL)
        self.out_of_range.assign_add(tf.reduce_sum(tf.cast(stray, tf.int64)))

    def result(self):
        return tf.convert_to_tensor(self.matrix)

    def _checked(self, value):
        value = tf.cast(value, self.dtype)
        return tf.where(tf.convert_to_tensor(self.out_of_range) > 0,
                        tf.constant(np.nan, self.dtype), value)

    def get_config(self):
        return dict(super().get_config(), num_classes=self.num_classes)


@keras.saving.register_keras_serializable(package="keras_ft")
class MeanIoU(ConfusionMatrix):
    """Mean over classes of TP / (TP + FP + FN), from the confusion matrix of
    every batch seen; classes absent from both labels and predictions
    (union 0) are left out of the mean. 0 before any labelled pixel.

    Unlike `keras.metrics.MeanIoU` it takes logits, ignores label 255 and
    leaves absent classes out (Keras' counts them in its mean with IoU 0
    unless `ignore_class` names one class).
    """

    def __init__(self, num_classes: int, name="mean_iou", dtype=None):
        super().__init__(num_classes, name=name, dtype=dtype)

    def result(self):
        matrix = tf.convert_to_tensor(self.matrix)
        true_positive = tf.linalg.diag_part(matrix)
        union = tf.reduce_sum(matrix, 0) + tf.reduce_sum(matrix, 1) - true_positive
        present = union > 0
        iou = tf.cast(true_positive, tf.float32) / tf.cast(tf.maximum(union, 1), tf.float32)
        total = tf.reduce_sum(tf.where(present, iou, 0.0))
        return self._checked(total / tf.maximum(tf.reduce_sum(tf.cast(present, tf.float32)), 1.0))


@keras.saving.register_keras_serializable(package="keras_ft")
class PixelAccuracy(ConfusionMatrix):
    """Labelled pixels predicted right over all labelled pixels, over every
    batch seen (so a batch counts by its labelled pixels). 0 before any."""

    def __init__(self, num_classes: int, name="pixel_accuracy", dtype=None):
        super().__init__(num_classes, name=name, dtype=dtype)

    def result(self):
        matrix = tf.convert_to_tensor(self.matrix)
        correct = tf.cast(tf.linalg.trace(matrix), tf.float32)
        total = tf.cast(tf.maximum(tf.reduce_sum(matrix), 1), tf.float32)
        return self._checked(correct / total)


# ------------------------------------------------ numpy, on a confusion matrix


def confusion_matrix(truth, prediction, num_classes: int) -> np.ndarray:
    """Pixel counts `[C, C]` (int64) of integer label maps of any equal
    shape, leaving out pixels labelled 255: what `ConfusionMatrix`
    accumulates, for predictions gathered offline.

    Raises:
        ValueError: for other labels outside [0, C), or mismatched shapes.
    """
    truth, prediction = np.asarray(truth), np.asarray(prediction)
    if truth.shape != prediction.shape:
        raise ValueError(f"{truth.shape} labels but {prediction.shape} predictions.")
    labelled = truth != IGNORE_LABEL
    return report_lib.confusion_matrix(
        truth[labelled], prediction[labelled], _check_num_classes(num_classes)
    ).astype(np.int64)


def iou_per_class(matrix) -> np.ndarray:
    """TP / (TP + FP + FN) per class (float64 `[C]`); NaN where the class is
    in neither labels nor predictions (union 0)."""
    matrix = np.asarray(matrix, np.float64)
    true_positive = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_positive
    return np.divide(true_positive, union, out=np.full_like(true_positive, np.nan),
                     where=union > 0)


def mean_iou(matrix) -> float:
    """The mean of `iou_per_class` over the classes present; 0 if none is."""
    iou = iou_per_class(matrix)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0


def pixel_accuracy(matrix) -> float:
    """Share of the diagonal: labelled pixels predicted right; 0 if none."""
    return report_lib.accuracy_from_confusion(np.asarray(matrix))


# ------------------------------------------------------------- pictures


def palette(num_classes: int) -> np.ndarray:
    """The colour of each class, uint8 `[C, 3]`: PASCAL VOC's colour map
    (class 0 black, 1 dark red, 2 dark green, ...), the one VOC's label PNGs
    use, so masks look as readers of segmentation papers expect."""
    classes = np.arange(_check_num_classes(num_classes))
    colors = np.zeros((len(classes), 3), np.int64)
    bits = classes.copy()
    for shift in range(7, -1, -1):  # the class's bits, three at a time, from the top bit down
        for channel in range(3):
            colors[:, channel] |= ((bits >> channel) & 1) << shift
        bits >>= 3
    return colors.astype(np.uint8)


def colorize(mask, num_classes: int) -> np.ndarray:
    """A label map `[H, W]` as a colour image uint8 `[H, W, 3]`: `palette`
    colours, `IGNORE_COLOR` (grey) for 255.

    Raises:
        ValueError: for labels outside [0, C) other than 255.
    """
    mask = np.asarray(mask)
    colors = palette(num_classes)
    labelled = mask != IGNORE_LABEL
    stray = labelled & ((mask < 0) | (mask >= num_classes))
    if stray.any():
        raise ValueError(f"Labels must be in [0, {num_classes}) or {IGNORE_LABEL}, "
                         f"got {sorted(np.unique(mask[stray]).tolist())[:10]}.")
    out = np.empty(mask.shape + (3,), np.uint8)
    out[labelled] = colors[mask[labelled].astype(np.int64)]
    out[~labelled] = IGNORE_COLOR
    return out


def overlay(image, mask, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """`image` (uint8 `[H, W, 3]`) with the class colours of `mask` blended
    in: `(1 - alpha) · image + alpha · colour` at labelled pixels; pixels
    labelled 255 show the image unchanged."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    image, mask = np.asarray(image), np.asarray(mask)
    if image.shape != mask.shape + (3,):
        raise ValueError(f"An image {image.shape} and a mask {mask.shape}: give [H, W, 3] and [H, W].")
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colorize(mask, num_classes)
    labelled = (mask != IGNORE_LABEL)[..., None]
    return np.where(labelled, np.round(blended), image).astype(np.uint8)


# ---------------------------------------------------------------- report


def write_report(out_dir: str, matrix, class_names: list[str], examples=None) -> list[str]:
    """Writes the report of a segmentation evaluation into `out_dir`.

    `report.md` (mean IoU, pixel accuracy, per-class IoU with pixel counts),
    `confusion.png` (the confusion matrix, each row divided by its class's
    pixels) and, given `examples`, `examples.png`: one row per image, the
    image, its ground truth and the prediction in `palette` colours (255
    grey). Each file is written whole or not at all (`workdir.write_atomic`).

    Args:
        out_dir: the folder (created if need be).
        matrix: pixel counts `[C, C]` (rows: true class), e.g. the `matrix`
            of a `ConfusionMatrix` metric or `confusion_matrix(...)`.
        class_names: the C class names.
        examples: optional `(images, truth, prediction)`: uint8
            `[N, H, W, 3]` and integer label maps `[N, H, W]`.

    Returns:
        The paths written, `report.md` first.
    """
    matrix = np.asarray(matrix)
    c = len(class_names)
    if matrix.shape != (c, c):
        raise ValueError(f"A confusion matrix {matrix.shape} for {c} class names.")
    os.makedirs(out_dir, exist_ok=True)
    figures = {"confusion": _save(_plot_confusion(matrix, class_names),
                                  os.path.join(out_dir, "confusion.png"))}
    if examples is not None:
        figures["examples"] = _save(_plot_examples(*examples, class_names),
                                    os.path.join(out_dir, "examples.png"))
    path = os.path.join(out_dir, "report.md")
    workdir.write_atomic(path, _markdown(matrix, class_names, figures))
    return [path, *figures.values()]


def _markdown(matrix, class_names, figures: dict) -> str:
    iou = iou_per_class(matrix)
    present = int(np.isfinite(iou).sum())
    lines = [
        "# Segmentation report", "",
        f"{int(matrix.sum())} labelled pixels (label {IGNORE_LABEL} left out), "
        f"{len(class_names)} classes, {present} of them in the labels or the predictions.", "",
        "| metric | value |", "|---|---|",
        f"| mean IoU (over the {present} classes present) | {report_lib._number(mean_iou(matrix))} |",
        f"| pixel accuracy | {report_lib._number(pixel_accuracy(matrix))} |", "",
        "## Per class", "",
        "| class | IoU | true pixels | predicted pixels | correct pixels |", "|---|---|---|---|---|",
    ]
    for i, name in enumerate(class_names):
        shown = report_lib._number(iou[i]) if np.isfinite(iou[i]) else "n/a (absent)"
        lines.append(f"| {report_lib._cell(name)} | {shown} | {int(matrix[i].sum())} "
                     f"| {int(matrix[:, i].sum())} | {int(matrix[i, i])} |")
    lines += ["", "## Figures", ""]
    titles = {"confusion": "Confusion matrix (rows: true class, each divided by its pixels)",
              "examples": "Examples (image | ground truth | prediction; grey: ignored)"}
    for key, path in figures.items():
        lines += [f"### {titles[key]}", "", f"![{titles[key]}]({os.path.basename(path)})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _save(fig, path: str) -> str:
    """A matplotlib figure as a PNG file, atomically; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    report_lib._pyplot().close(fig)
    workdir.write_atomic(path, buffer.getvalue())
    return path


def _plot_confusion(matrix, class_names):
    plt = report_lib._pyplot()
    n = len(class_names)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)
    side = min(max(4.5, 0.45 * n + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    slanted = n > 4  # long names side by side would overlap
    ax.set_xticks(range(n), labels=class_names, rotation=45 if slanted else 0,
                  ha="right" if slanted else "center")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} pixels, rows normalised)")
    if n <= 20:  # beyond that the digits no longer fit their cells
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center",
                        fontsize=10 if n <= 10 else 7,
                        color="white" if shares[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def _plot_examples(images, truth, prediction, class_names):
    images, truth, prediction = np.asarray(images), np.asarray(truth), np.asarray(prediction)
    if images.ndim != 4 or images.shape[-1] != 3 or truth.shape != images.shape[:3] \
            or prediction.shape != truth.shape:
        raise ValueError(f"examples: images {images.shape}, truth {truth.shape}, prediction "
                         f"{prediction.shape}; give [N, H, W, 3], [N, H, W] and [N, H, W].")
    plt = report_lib._pyplot()
    from matplotlib.patches import Patch

    c = len(class_names)
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n + 0.6), squeeze=False, layout="constrained")
    for row in range(n):
        pictures = (images[row], colorize(truth[row], c), colorize(prediction[row], c))
        for ax, picture, title in zip(axes[row], pictures, ("image", "ground truth", "prediction")):
            ax.imshow(picture.astype(np.uint8), interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    # A legend of the classes the pictures show, below them.
    shown = np.unique(np.concatenate([truth.ravel(), prediction.ravel()]))
    colors = palette(c) / 255.0
    handles = [Patch(facecolor=colors[k], edgecolor="black", label=class_names[k])
               for k in shown if k != IGNORE_LABEL]
    if (shown == IGNORE_LABEL).any():
        handles.append(Patch(facecolor=np.array(IGNORE_COLOR) / 255.0, edgecolor="black",
                             label=f"ignored ({IGNORE_LABEL})"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6),
               frameon=False)
    return fig

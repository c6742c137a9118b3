"""Single-label text classification on a BERT-family encoder: the second task.

Data: a text source (`keras_ft.text_sources`: a folder of .txt files per
class, a CSV/TSV with `text,label` columns, or topics of Debian's
`fortunes`), every text checked when read (non-UTF-8, empty, NUL bytes: a
one-line error naming the file), split by the source's own train/val
folders or by seed, as images are. Every text is tokenized once, up front,
with the encoder's own WordPiece tokenizer and packed to `data.max_length`
tokens (`[CLS] text [SEP]`, truncated or padded); the log gives the tokens
per text and the share truncated. Streams: the training stream is the
seeded order of `keras_ft.data.training_order` (so resume is exact), over
the tokenized arrays in memory.
Model: `keras_ft.text_model.TextClassifier` (encoder, its [CLS] pooler,
dropout, Dense head). Loss: sparse categorical cross-entropy (with
`train.label_smoothing`). Main metric: accuracy. Export: a SavedModel that
takes raw strings (`keras_ft.text_model.export_saved_model`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras_ft import data as data_lib, text_backbones, text_model, text_sources
from keras_ft.tasks import base, image_classification

_TOKENIZE_BATCH = 512  # texts tokenized per call, up front


def load_splits(data_spec, seed: int):
    """`(dataset, train_set, val_set, report)`: the texts of a run, split as
    every entry point must split them (the source's own split, else seeded
    and stratified; then `data.train_per_class`)."""
    dataset, report = text_sources.load_text_source(data_spec.source, data_spec.num_classes)
    train_set, val_set = data_lib.split_for_run(dataset, data_spec, seed)
    return dataset, train_set, val_set, report


def tokenize(preprocess, texts: list[str]) -> dict[str, np.ndarray]:
    """The packed int32 inputs `[N, max_length]` of `texts`."""
    parts = [text_model.pack(preprocess, tf.constant(texts[i:i + _TOKENIZE_BATCH]))
             for i in range(0, len(texts), _TOKENIZE_BATCH)]
    return {name: np.concatenate([p[name].numpy() for p in parts]) for name in text_model.INPUTS}


def token_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Tokens per text, [CLS] and [SEP] included, before truncation."""
    lengths = []
    for i in range(0, len(texts), _TOKENIZE_BATCH):  # eager KerasHub returns lists
        lengths += [len(tokens) for tokens in tokenizer(tf.constant(texts[i:i + _TOKENIZE_BATCH]))]
    return np.asarray(lengths, np.int64) + 2


class TextData(base.TaskData):
    """The texts of a run, split and tokenized, with their streams.

    Args:
        spec: the run's `RunSpec`.
        dataset, train_set, val_set, scan_report: from `load_splits`.
        tokenizer: the encoder's tokenizer (`text_backbones.load_tokenizer`).
    """

    def __init__(self, spec, dataset, train_set, val_set, scan_report, tokenizer):
        self._keep(spec, dataset, train_set, val_set, scan_report)
        preprocess = text_model.preprocessor(tokenizer, spec.data.max_length)
        self._inputs = {"train": tokenize(preprocess, train_set.texts),
                        "val": tokenize(preprocess, val_set.texts)}
        self._lengths = token_lengths(tokenizer, train_set.texts)

    def length_stats(self) -> dict:
        """Tokens per training text ([CLS], [SEP] included) and the share
        longer than `data.max_length` (truncated)."""
        n = self._lengths
        return {"median": float(np.median(n)), "p95": float(np.percentile(n, 95)),
                "max": int(n.max()), "truncated": float(np.mean(n > self._spec.data.max_length))}

    def describe(self) -> list[str]:
        d = self._spec.data
        s = self.length_stats()
        return [
            f"Data {d.source}: {self.train_size} train / {self.val_size} validation texts "
            f"({self._split_description()}), {len(self.class_names)} classes ({', '.join(self.class_names[:10])}).",
            f"Tokens per training text ([CLS] and [SEP] included): median {s['median']:.0f}, "
            f"95th percentile {s['p95']:.0f}, longest {s['max']}; data.max_length="
            f"{d.max_length} truncates {100 * s['truncated']:.1f}% of them.",
        ]

    def _split(self, split: str):
        if split not in ("train", "val"):
            raise ValueError(f"Unknown split {split!r}. Choose one of: train, val.")
        return self._inputs[split], (self.train_set if split == "train" else self.val_set).labels

    def train_stream(self, skip_batches: int = 0, features_of=None) -> tf.data.Dataset:
        if features_of is not None:
            raise ValueError("Text classification has no feature caching (data.cache_features).")
        inputs, labels = self._split("train")
        inputs = {k: tf.constant(v) for k, v in inputs.items()}
        labels = tf.constant(labels, tf.int32)
        order = data_lib.training_order(len(labels), self._batch, self._spec.seed, skip_batches)
        batches = order.map(lambda position, index: index).batch(self._batch, drop_remainder=True)
        return batches.map(
            lambda idx: ({k: tf.gather(v, idx) for k, v in inputs.items()}, tf.gather(labels, idx)),
            num_parallel_calls=tf.data.AUTOTUNE,
        ).prefetch(tf.data.AUTOTUNE)

    def eval_stream(self, split: str = "val", features_of=None) -> tf.data.Dataset:
        if features_of is not None:
            raise ValueError("Text classification has no feature caching (data.cache_features).")
        inputs, labels = self._split(split)
        return tf.data.Dataset.from_tensor_slices(
            (inputs, labels.astype(np.int32))).batch(self._batch).prefetch(tf.data.AUTOTUNE)

    def statistics_stream(self) -> tf.data.Dataset:
        # No augmentation to leave out: the training stream's first pass.
        return self.train_stream().take(max(self.train_size // self._batch, 1))

    def chance_level(self) -> float:
        return self._majority_share()

    def class_weight(self) -> dict[int, float] | None:
        return self._label_class_weights()


class TextClassification(base.Task):
    """Single-label text classification (see the module docstring)."""

    name = "text_classification"
    main_metric = "accuracy"

    def load_data(self, spec) -> TextData:
        tokenizer = text_backbones.load_tokenizer(spec.model.backbone)
        return TextData(spec, *load_splits(spec.data, spec.seed), tokenizer)

    def build_model(self, spec, class_names: list[str]) -> text_model.TextClassifier:
        m = spec.model
        backbone = text_backbones.load_backbone(m.backbone, pretrained=m.weights is not None)
        limit = int(backbone.max_sequence_length)
        if spec.data.max_length > limit:
            raise ValueError(f"data.max_length={spec.data.max_length} is above the {limit} "
                             f"positions of model.backbone='{m.backbone}'; set it <= {limit}.")
        return text_model.TextClassifier(
            backbone, len(class_names), dropout=m.dropout, backbone_name=m.backbone,
            class_names=class_names,
        )

    def loss_and_metrics(self, spec) -> tuple:
        smoothing = spec.train.label_smoothing
        if smoothing:
            return image_classification.SmoothedSparseCrossentropy(smoothing), ["accuracy"]
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]

    def export(self, model, path: str, class_names: list[str], spec) -> str:
        tokenizer = text_backbones.load_tokenizer(spec.model.backbone)
        return text_model.export_saved_model(
            model, path, class_names, tokenizer, spec.data.max_length)

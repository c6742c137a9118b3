"""Text classification's model and export: a BERT-family encoder, a new head.

`TextClassifier` is a `keras_ft.model.FineTuneModel`, so the shared recipe
(staged freezing by block, discriminative rates, L2-SP, BitFit, LoRA, the
written-out optimizers, exact resume) applies unchanged. Its blocks are the
encoder's (`keras_ft.text_backbones.block_map`): embeddings, each
transformer layer, pooler; the head trains in every stage.

The export serves raw strings: the tokenizer and the packing into
`[CLS] text [SEP]` of `data.max_length` tokens are in the SavedModel's
graph. Loading it needs `import tensorflow_text` first (KerasHub's WordPiece
tokenizer is a TensorFlow Text op).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from keras_ft import export as export_lib, model as model_lib, text_backbones

INPUTS = ("token_ids", "segment_ids", "padding_mask")


@keras.saving.register_keras_serializable(package="keras_ft")
class TextClassifier(model_lib.FineTuneModel):
    """Encoder + its [CLS] pooler + dropout + `Dense(num_classes)`, as
    BERT fine-tunes (Devlin et al., 2019).

    Inputs: a dict of int32 `[N, L]` tensors `token_ids`, `segment_ids` and
    `padding_mask` (1 for a token, 0 for padding), as KerasHub's
    `BertTextClassifierPreprocessor` packs a string. Outputs: logits.

    Args:
        backbone: a `keras_hub.models.BertBackbone`.
        num_classes: width of the new head.
        dropout: dropout rate before the head.
        backbone_name: `model.backbone`, kept for the config.
        class_names: optional names of the classes, in label order.
    """

    def __init__(self, backbone, num_classes: int, dropout: float = 0.1,
                 backbone_name: str | None = None, class_names: Sequence[str] | None = None,
                 **kwargs):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        inputs = {name: keras.Input(shape=(None,), dtype="int32", name=name) for name in INPUTS}
        pooled = backbone(inputs)["pooled_output"]
        x = keras.layers.Dropout(dropout, name="dropout")(pooled)
        # BERT's head initialisation; float32 logits under mixed precision.
        outputs = keras.layers.Dense(
            num_classes, name="head", dtype="float32",
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )(x)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.num_classes = num_classes
        self.dropout = dropout
        self.class_names = list(class_names) if class_names else None
        self.start_finetuning(backbone, backbone_name)

    def block_map(self):
        return text_backbones.block_map(self.backbone)

    def lora_layers(self, layers) -> list:
        return text_backbones.lora_layers(layers)

    def get_config(self):
        return {
            "name": self.name,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
            "dropout": self.dropout,
            "backbone_name": self.backbone_name,
            "class_names": self.class_names,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(config.pop("backbone"))
        return cls(backbone, **config)


def preprocessor(tokenizer, max_length: int):
    """KerasHub's packer of raw strings into the model's inputs:
    `[CLS] tokens [SEP]`, truncated or padded to `max_length`."""
    import keras_hub

    return keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=max_length)


def pack(preprocess, texts) -> dict:
    """The model's int32 inputs for a batch of strings."""
    packed = preprocess(texts)
    return {name: tf.cast(packed[name], tf.int32) for name in INPUTS}


def export_saved_model(model: TextClassifier, path: str, class_names: Sequence[str],
                       tokenizer, max_length: int) -> str:
    """Exports `model` with a `serving_default` that takes raw strings.

    Signature `serving_default`: `text` string [N] (UTF-8) -> `probabilities`
    float32 [N, C] and `classes` string [N] (top-1 class names), as the image
    export returns; `loaded.class_names[0]` holds every class name. Written
    atomically (`keras_ft.export.write_archive`).
    """
    names = tf.constant(list(class_names))
    preprocess = preprocessor(tokenizer, max_length)
    pack(preprocess, tf.constant([""]))  # builds it: ExportArchive tracks built layers only

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve_text(text):
        probabilities = tf.nn.softmax(model(pack(preprocess, text), training=False), axis=-1)
        return {"probabilities": probabilities,
                "classes": tf.gather(names, tf.argmax(probabilities, axis=-1))}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(preprocess)
    archive.add_endpoint("serving_default", serve_text)
    archive.add_variable_collection("class_names", export_lib.class_names_variable(names))
    return export_lib.write_archive(archive, path)

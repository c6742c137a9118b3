"""SavedModel export that serves raw images.

Signatures:
    serving_default  images: string [N], encoded JPEG/PNG/BMP/GIF of any size.
    serving_uint8    images: uint8 [N, H, W, 3], any H and W.
Both resize exactly as training and evaluation do (`data.resize_image`), run
the backbone's own preprocessing (inside the model), and return
`probabilities` float32 [N, C] and `classes` string [N] (top-1 class names).
Loading needs TensorFlow only: `tf.saved_model.load(path)`, TF Serving or
`saved_model_cli`.

The export is written into a temporary folder and renamed into place, so a
crash never leaves a half-written export under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

import keras
import tensorflow as tf

from keras_ft import data


def export_saved_model(
    model: keras.Model, path: str, class_names: Sequence[str], image_size: int
) -> str:
    """Exports `model` (logits out) with both serving signatures to `path`."""
    names = tf.constant(list(class_names))

    def predict(images):  # float [N, S, S, 3] in [0, 255]
        probabilities = tf.nn.softmax(model(images, training=False), axis=-1)
        classes = tf.gather(names, tf.argmax(probabilities, axis=-1))
        return {"probabilities": probabilities, "classes": classes}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_bytes(images):
        decoded = tf.map_fn(
            lambda b: data.resize_image(data.decode_image(b), image_size),
            images,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )
        return predict(decoded)

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
    )
    def serve_uint8(images):
        return predict(data.resize_image(images, image_size))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("serving_uint8", serve_uint8)

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        archive.write_out(tmp, verbose=False)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".export-old-", dir=parent)
            os.rename(path, os.path.join(old, "export"))
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

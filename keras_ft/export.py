"""SavedModel export that serves raw images.

Signatures:
    serving_default  images: string [N], encoded JPEG/PNG/BMP/GIF of any size.
    serving_uint8    images: uint8 [N, H, W, 3], any H and W.
An encoded image of more than `limits.MAX_PIXELS` decoded pixels (frames x
width x height, read from its headers; `data.decode_image`) fails the request with an
InvalidArgumentError naming the cap, before it is decoded: the server keeps
serving. Both size images exactly as training and evaluation did (`data.resize_image`
with the run's `data.resize` policy, built into the graph), run the
backbone's own preprocessing (inside the model), and return
`probabilities` float32 [N, C] and `classes` string [N] (top-1 class names).
All class names, in label order, are stored too: `loaded.class_names[0]`, a
string variable [C] (for top-k names). Loading needs TensorFlow only:
`tf.saved_model.load(path)`, TF Serving or `saved_model_cli`.

TFLite (`export_tflite`): float32 model of the uint8 path for images already
brought to S x S by the run's policy (any batch size), output
`probabilities` [N, C], with the class names in `labels.txt` next to it.
TFLite has no builtin for the antialiased resize, so the caller resizes;
`tflite_parity` checks it against the SavedModel.

Every file and folder is written under a temporary name and renamed into
place, so a crash never leaves a half-written export under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_ft import data, workdir


def export_saved_model(
    model: keras.Model,
    path: str,
    class_names: Sequence[str],
    image_size: int,
    resize: str = "resize",
) -> str:
    """Exports `model` (logits out) with both serving signatures to `path`.

    `resize` is the run's `data.resize` policy: the signatures size every
    image with it, as training and evaluation did.
    """
    data.check_resize(resize)
    names = tf.constant(list(class_names))

    def predict(images):  # float [N, S, S, 3] in [0, 255]
        probabilities = tf.nn.softmax(model(images, training=False), axis=-1)
        classes = tf.gather(names, tf.argmax(probabilities, axis=-1))
        return {"probabilities": probabilities, "classes": classes}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_bytes(images):
        decoded = tf.map_fn(  # decode_image checks the pixel cap before decoding
            lambda b: data.resize_image(data.decode_image(b), image_size, resize),
            images,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )
        return predict(decoded)

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
    )
    def serve_uint8(images):
        return predict(data.resize_image(images, image_size, resize))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("serving_uint8", serve_uint8)
    archive.add_variable_collection("class_names", class_names_variable(names))

    return write_archive(archive, path)


def class_names_variable(names: tf.Tensor) -> list:
    """The class names as a variable collection of an export: a variable, not
    a constant, survives loading as an attribute (`loaded.class_names[0]`),
    so a client can name the top-k classes without keras_ft."""
    return [tf.Variable(names, trainable=False, name="class_names")]


def write_archive(archive: keras.export.ExportArchive, path: str) -> str:
    """Writes `archive` as a SavedModel to `path`, atomically: under a
    temporary name, then renamed into place (an old export is replaced only
    once the new one is complete). Returns `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    workdir.sweep(parent)  # what an export killed before its rename left
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


# Float32 TFLite against TensorFlow: the kernels differ (XNNPACK, fused
# BatchNorm), measured ~1e-6 on MobileNetV2; 1e-4 leaves room for deeper nets.
TFLITE_TOLERANCE = 1e-4
TFLITE_FILE = "model.tflite"
LABELS_FILE = "labels.txt"


def export_tflite(
    model: keras.Model, path: str, class_names: Sequence[str], image_size: int
) -> str:
    """Writes a float32 TFLite model of the uint8 serving path to `path`.

    Input `images` uint8 [N, S, S, 3] (S = `image_size`; N is dynamic: resize
    the interpreter's input to the batch), already sized by the run's
    `data.resize` policy (`data.resize_image`), output `probabilities` float32
    [N, C]. Class names go to `labels.txt` in the same folder, one a line.

    The model is first written as a SavedModel with this one fixed-size
    signature and converted from there: converting the concrete function
    with the Keras model as `trackable_obj` gave NaN outputs (TF 2.21, Keras
    3.15.1: the TFLite READ_VARIABLE ops found no initialized variables).
    """
    @tf.function(
        input_signature=[
            tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")
        ]
    )
    def serve(images):
        logits = model(tf.cast(images, tf.float32), training=False)
        return {"probabilities": tf.nn.softmax(logits, axis=-1)}

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tflite-", dir=parent)
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serving_default", serve)
        archive.write_out(os.path.join(staging, "saved_model"), verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            os.path.join(staging, "saved_model")
        )
        flatbuffer = converter.convert()
        labels = "".join(f"{name}\n" for name in class_names)
        workdir.write_atomic(os.path.join(parent, LABELS_FILE), labels.encode())
        workdir.write_atomic(path, flatbuffer)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def run_tflite(path: str, images: np.ndarray) -> np.ndarray:
    """Probabilities [N, C] of the TFLite model at `path` on uint8 [N, S, S, 3]."""
    with warnings.catch_warnings():  # "use ai_edge_litert": not a dependency here
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=path)
    (inp,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(inp["index"], images.shape, strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.asarray(images, np.uint8))
    interpreter.invoke()
    (out,) = interpreter.get_output_details()
    return interpreter.get_tensor(out["index"])


def tflite_parity(
    tflite_path: str, saved_model_path: str, images: np.ndarray, served_images=None
) -> float:
    """Max |probability difference| of TFLite vs the SavedModel's `serving_uint8`.

    Args:
        tflite_path: a file written by `export_tflite`.
        saved_model_path: the SavedModel of the same model.
        images: uint8 [N, S, S, 3] at the model's input size, for TFLite.
        served_images: uint8 [N, H, W, 3] for the SavedModel, which its
            resize policy brings exactly to `images`; default `images`, right
            for policies that leave an S x S image as it is (all but
            "resize_then_crop": for it, squares of side
            `data.resize_side(S, policy)` whose central S x S are `images`).

    Returns:
        The largest absolute difference over all images and classes; compare
        it with `TFLITE_TOLERANCE`.
    """
    served = tf.saved_model.load(saved_model_path)
    served_images = images if served_images is None else served_images
    expected = served.signatures["serving_uint8"](images=tf.constant(served_images, tf.uint8))
    got = run_tflite(tflite_path, images)
    return float(np.max(np.abs(got - expected["probabilities"].numpy())))

"""The task interface: a task that is not image classification runs on the
unchanged trainer (data, head, loss, metric and export all its own), and
resumes exactly."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from keras_ft import data, model as model_lib, tasks, trainer


class _Scan:
    def lines(self):
        return ["toy data: nothing to scan"]

    def to_json(self):
        return json.dumps({"scanned": 0})


class BrightnessData(tasks.TaskData):
    """In-memory arrays; the label is whether an image is bright."""

    def __init__(self, spec):
        rng = np.random.default_rng(0)
        labels = np.arange(24) % 2
        images = rng.uniform(0, 120, (24, 32, 32, 3)) + 120 * labels[:, None, None, None]
        self.images, self.labels = images.astype(np.float32), labels.astype(np.int32)
        self.class_names = ["dark", "bright"]
        self.train_size, self.val_size, self.own_split = 16, 8, True
        self.scan_report = _Scan()
        self.batch, self.seed = spec.train.global_batch_size, spec.seed

    def describe(self):
        return ["Brightness: 16 train / 8 validation arrays."]

    def train_stream(self, skip_batches=0, features_of=None):
        if features_of is not None:
            raise ValueError("no feature caching here")
        x, y = tf.constant(self.images[:16]), tf.constant(self.labels[:16])
        # The seeded stream every task keeps: the same order on every run, and
        # `skip_batches` continues it where a run stopped.
        order = data.training_order(16, self.batch, self.seed, skip_batches)
        ds = order.map(lambda position, index: (tf.gather(x, index), tf.gather(y, index)))
        return ds.batch(self.batch, drop_remainder=True)

    def statistics_stream(self):
        return self.train_stream().take(16 // self.batch)  # one pass, not augmented

    def eval_stream(self, split="val", features_of=None):
        part = slice(0, 16) if split == "train" else slice(16, 24)
        return tf.data.Dataset.from_tensor_slices(
            (self.images[part], self.labels[part])
        ).batch(self.batch)


class MaxPoolClassifier(model_lib.FineTuneModel):
    """Another head on the shared machinery: max pooling, two Dense layers."""

    def __init__(self, backbone, backbone_name, num_classes, **kwargs):
        inputs = keras.Input(backbone.input_shape[1:])
        rescale = keras.layers.Rescaling(1 / 127.5, offset=-1)
        x = keras.layers.GlobalMaxPooling2D()(backbone(rescale(inputs)))
        x = keras.layers.Dense(8, activation="relu", name="hidden")(x)
        outputs = keras.layers.Dense(num_classes, name="logits")(x)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.start_finetuning(backbone, backbone_name, rescale)


class Brightness(tasks.Task):
    name = "brightness"
    main_metric = "acc"
    exported = []

    def load_data(self, spec):
        return BrightnessData(spec)

    def build_model(self, spec, class_names):
        from keras_ft import backbones

        backbone = backbones.build(spec.model.backbone, spec.model.image_size, weights=None)
        return MaxPoolClassifier(backbone, spec.model.backbone, len(class_names))

    def loss_and_metrics(self, spec):
        return (
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            [keras.metrics.SparseCategoricalAccuracy(name="acc")],
        )

    def export(self, model, path, class_names, spec):
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serving_default", lambda x: {"logits": model(x, training=False)},
            input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="x")],
        )
        archive.write_out(path, verbose=False)
        self.exported.append(path)
        return path


@pytest.fixture(scope="module")
def brightness():
    tasks.register(Brightness)
    return Brightness


def _config():
    config = tiny.get_config()
    config.task = "brightness"
    config.data.source = "brightness:arrays"  # the task reads what it wants
    config.model.dropout = 0.0
    config.freeze.batchnorm = "reestimate"  # real activations through a random backbone
    return config


def test_unknown_task_and_bad_registrations():
    config = tiny.get_config()
    config.task = "segmentation"
    with pytest.raises(ValueError, match="Unknown task 'segmentation'. Choose one of: image_"):
        trainer.train(config, "/nonexistent/never/written")
    with pytest.raises(ValueError, match="not a Task subclass with a name"):
        tasks.register(tasks.Task)


def test_a_second_task_trains_resumes_and_exports_on_the_same_recipe(tmp_path, brightness):
    workdir = str(tmp_path / "run")
    metrics = trainer.train(_config(), workdir)
    # Its own metric, named in metrics.json; the recipe's bookkeeping as always.
    assert metrics["main_metric"] == "val_acc" and metrics["task"] == "brightness"
    assert "val_accuracy" not in metrics and 0 <= metrics["val_acc"] <= 1
    assert metrics["steps"] == 6 and metrics["train_images"] == 16
    assert metrics["trainable_fraction"] < 1  # stage 2: the top two blocks and the head
    assert brightness.exported == [os.path.join(workdir, "export")]
    served = tf.saved_model.load(os.path.join(workdir, "export"))
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    logits = served.signatures["serving_default"](x=tf.constant(x))["logits"].numpy()
    assert logits.shape == (2, 2)
    with open(os.path.join(workdir, "history.csv")) as f:
        assert f.readline().startswith("epoch,acc,")

    # Resume: drop the last checkpoint, rerun, and end at the same weights.
    checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert checkpoints == ["ckpt-000000003", "ckpt-000000006"]
    import shutil

    shutil.rmtree(os.path.join(workdir, "checkpoints", checkpoints[-1]))
    resumed = trainer.train(_config(), workdir)
    assert resumed["resumed_from"].endswith("ckpt-000000003")
    assert resumed["weights_sha256"] == metrics["weights_sha256"]

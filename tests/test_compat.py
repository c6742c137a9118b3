"""keras_ft/compat.py: each private Keras API it relies on still exists, still
does what the workaround needs, and is used nowhere else in the package.

These tests are meant to fail on a Keras upgrade that changes any of it: then
update the workaround (or drop it) and `compat.TESTED_KERAS`.
"""

import ast
import inspect
import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from keras_ft import backbones, compat, imagenet_files, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "keras_ft")


# --- the version check ----------------------------------------------------------


def test_installed_keras_is_a_tested_release():
    # Fails on a Keras upgrade until the workarounds are checked against it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_keras_version(), keras.version()


def test_untested_keras_warns_and_names_the_module():
    with pytest.warns(RuntimeWarning, match=r"Keras 3\.99\.0.*tests/test_compat\.py"):
        assert not compat.check_keras_version("3.99.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_keras_version("3.15.7")


def test_a_missing_or_changed_private_names_its_workaround():
    class Old:
        def _hook(self, a, b=None):
            pass

    compat.require(Old, "_hook", ("a", "b"), "the hook workaround")
    with pytest.raises(compat.KerasCompatError, match=r"^the hook workaround: .*has no .*Old\._gone"):
        compat.require(Old, "_gone", ("a",), "the hook workaround")
    with pytest.raises(compat.KerasCompatError, match=r"^the hook workaround: .*takes \('a', 'b'\)"):
        compat.require(Old, "_hook", ("a",), "the hook workaround")


# --- each workaround ------------------------------------------------------------


def test_private_signatures_are_as_the_workarounds_expect():
    build = inspect.signature(keras.Model._maybe_symbolic_build)
    assert list(build.parameters) == ["self", "iterator", "data_batch"]
    index = inspect.signature(keras.optimizers.Optimizer._get_variable_index)
    assert list(index.parameters) == ["self", "variable"]


def test_variable_index_on_one_device():
    a = keras.Variable(np.zeros((2, 2), np.float32), name="a")
    b = keras.Variable(np.zeros(3, np.float32), name="b")
    sgd = optim.SGD(0.1)
    sgd.build([a, b])
    assert [compat.variable_index(sgd, v) for v in (b, a)] == [1, 0]
    assert [compat.variable_index(sgd, v.value) for v in (b, a)] == [1, 0]  # tf.Variables


# Run in a fresh interpreter: the CPU must be split into two logical devices
# before TensorFlow starts, which other tests in this process may have done.
_TWO_REPLICAS = r"""
import json
import numpy as np
import tensorflow as tf
from keras_ft import compat, distribute, optim

distribute.split_cpu(2)
import keras

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out = {}

# variable_index: each replica's component of a mirrored variable, as
# `update_step` receives it, maps to the variable's index.
with strategy.scope():
    a = keras.Variable(np.zeros((2, 2), np.float32), name="a")
    b = keras.Variable(np.zeros(3, np.float32), name="b")
    sgd = optim.SGD(0.1)
    sgd.build([a, b])
out["index"] = [
    [compat.variable_index(sgd, c) for c in strategy.experimental_local_results(v.value)]
    for v in (a, b)
]

# LocalBatchBuild: record every strategy.reduce during Keras' first-batch build.
reduces = []
real_reduce = strategy.reduce
def spy(op, value, axis):
    distributed = any(isinstance(v, tf.distribute.DistributedValues) for v in tf.nest.flatten(value))
    reduces.append([str(op), distributed])
    return real_reduce(op, value, axis)
strategy.reduce = spy


class Probe:
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        before = len(reduces)
        result = super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        self.log.append({"iterator": iterator is not None, "reduces": reduces[before:]})
        return result

    def _batch_for_build(self, data_batch):
        x = data_batch[0]
        distributed = isinstance(x, tf.distribute.DistributedValues)
        self.log.append({"batch": list(x.shape) if not distributed else None})
        return super()._batch_for_build(data_batch)


class WithWorkaround(Probe, compat.LocalBatchBuild, keras.Model):
    pass


class Plain(Probe, keras.Model):
    pass


def make(cls):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        inputs = keras.Input((4,))
        model = cls(inputs, keras.layers.Dense(3)(inputs))
        model.compile(optimizer="sgd", metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.log = []
    return model


x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
y = np.arange(16) % 3
for cls in (WithWorkaround, Plain):
    model = make(cls)
    history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=1, verbose=0)
    out[cls.__name__] = {"log": model.log, "history": history.history}
model = make(WithWorkaround)
model.train_on_batch(x[:8], y[:8])
out["train_on_batch"] = model.log
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_replicas():
    run = subprocess.run(
        [sys.executable, "-c", _TWO_REPLICAS], cwd=REPO, capture_output=True, text=True,
        timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_variable_index_under_mirrored_strategy(two_replicas):
    assert two_replicas["index"] == [[0, 0], [1, 1]]


def test_local_batch_build_avoids_the_eager_replica_reduce(two_replicas):
    """keras-team/keras#20585: Keras' first-batch build reduces the distributed
    batch with an eager `strategy.reduce("MEAN", ...)`, which fails under
    MultiWorkerMirroredStrategy. With the mixin Keras builds from the first
    replica's batch instead, and training is unchanged."""
    plain, fixed = two_replicas["Plain"], two_replicas["WithWorkaround"]
    # Keras still does what the workaround works around; if this fails, check
    # whether #20585 is fixed and the mixin can go.
    assert plain["log"] == [{"iterator": True, "reduces": plain["log"][0]["reduces"]}]
    assert ["MEAN", True] in plain["log"][0]["reduces"], plain["log"]
    # The mixin's batch reached Keras' build: one replica's half of the batch
    # of 8, and no MEAN reduce of distributed values.
    assert fixed["log"][0] == {"batch": [4, 4]}
    assert fixed["log"][1]["iterator"] is True
    assert not [r for r in fixed["log"][1]["reduces"] if r[0] == "MEAN"], fixed["log"]
    assert fixed["history"] == plain["history"] and "accuracy" in fixed["history"]
    # train_on_batch hands Keras a plain batch: the hook still sees it.
    assert two_replicas["train_on_batch"][0] == {"batch": [8, 4]}


# --- where the framework's private names came from ------------------------------


class _Recorded(Exception):
    pass


def _requested_file(name: str, image_size: int, monkeypatch) -> tuple:
    """What the keras.applications builder passes to Keras' `get_file`."""
    from keras.src.utils import file_utils  # the builders call it through this module

    def record(fname, origin, file_hash=None, cache_subdir="datasets", **kwargs):
        raise _Recorded(fname, origin, file_hash, cache_subdir)

    monkeypatch.setattr(file_utils, "get_file", record)
    spec = backbones.get(name)
    with pytest.raises(_Recorded) as recorded:
        spec.builder(include_top=False, weights="imagenet", input_shape=(image_size, image_size, 3))
    return recorded.value.args


# One backbone per family (fast); the rest carry the slow marker.
_FAST = {"resnet50", "resnet50_v2", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
         "efficientnet_v2_b0", "convnext_tiny", "densenet121", "xception", "inception_v3",
         "vgg16"}
_CASES = [
    pytest.param(name, size, marks=() if name in _FAST else pytest.mark.slow, id=f"{name}-{size}")
    for name in backbones.names()
    for size in ([32, 96, 160, 224] if name == "mobilenet_v2" else [backbones.get(name).min_size])
]


@pytest.mark.parametrize("name,image_size", _CASES)
def test_imagenet_file_is_what_the_keras_builder_downloads(name, image_size, monkeypatch):
    """`imagenet_files.imagenet_file` copies, per backbone, the file name, URL and
    hash that keras.applications' builders give `get_file`."""
    ours = imagenet_files.imagenet_file(name, image_size)
    assert (ours.fname, ours.origin, ours.file_hash, "models") == _requested_file(
        name, image_size, monkeypatch
    )


# --- no private Keras API outside compat.py ---------------------------------------


def _keras_private_names() -> set:
    """Private (single underscore) attribute names of the Keras objects
    keras_ft subclasses or touches, instance attributes included."""
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    objects = [
        model, *model.layers, model.optimizer, model.weights[0], keras.callbacks.Callback(),
        keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9), keras.layers.RandomFlip(),
        keras.layers.Dropout(0.1), keras.Sequential(), keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD()),
    ]
    names = set()
    for obj in objects:
        names |= {n for n in dir(obj) if n.startswith("_") and not n.startswith("__")}
    return names


_PRIVATE_MODULES = ("keras.src", "tensorflow.python")


def _private_uses(source: str, keras_private: set) -> list:
    """(line number, what) for each Keras-private use in `source`: an import
    of a private module, an attribute or method of that name (read, written
    or overridden), or the name given to getattr/setattr/hasattr. Our own
    module-level functions may share a name with a Keras attribute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, p) for m in modules for p in _PRIVATE_MODULES
                      if m == p or m.startswith(p + ".")]
        elif isinstance(node, ast.Attribute):
            if node.attr in keras_private or node.attr == "__internal__":
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.ClassDef):
            found += [(f.lineno, f.name) for f in node.body
                      if isinstance(f, ast.FunctionDef) and f.name in keras_private]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in keras_private):
            found.append((node.lineno, node.args[1].value))
    return sorted(found)


def test_the_check_finds_private_uses():
    keras_private = _keras_private_names()
    assert {"_flatten_layers", "_distribute_strategy", "_learning_rate",
            "_trainable_variables", "_maybe_symbolic_build", "_get_variable_index"} <= keras_private
    snippet = (
        "from keras.src.utils import file_utils\n"
        "import tensorflow.python.ops\n"
        "layers = model._flatten_layers()\n"
        "class C(keras.Model):\n"
        "    def _maybe_symbolic_build(self, iterator=None):\n"
        "        return tf.__internal__\n"
        "lr = getattr(optimizer, '_learning_rate')\n"
        "def _variables(): pass  # a module function of ours\n"
        "self._tunable_paths = []  # ours, not Keras'\n"
    )
    assert _private_uses(snippet, keras_private) == [
        (1, "keras.src"), (2, "tensorflow.python"), (3, "_flatten_layers"),
        (5, "_maybe_symbolic_build"), (6, "__internal__"), (7, "_learning_rate"),
    ]


def test_no_private_keras_api_outside_compat():
    keras_private = _keras_private_names()
    modules = sorted(f for f in os.listdir(PACKAGE) if f.endswith(".py"))
    assert "compat.py" in modules and "model.py" in modules
    found = []
    for module in modules:
        if module == "compat.py":
            continue
        with open(os.path.join(PACKAGE, module)) as f:
            found += [f"keras_ft/{module}:{n}: {what}" for n, what in _private_uses(f.read(), keras_private)]
    assert not found, "Private Keras API outside keras_ft/compat.py:\n" + "\n".join(found)

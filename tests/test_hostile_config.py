"""Hostile config values, workdirs, weights and checkpoints: each one line, exit 2.

`launch.*` prints `error: ...` and exits 2 for `cli.INPUT_ERRORS`; these
tests check the line as printed (`runs.printed`), in-process. The fuzz sets
every numeric key of configs/base.py to random types and extremes.
"""

import errno
import math
import os
import random

import keras
import numpy as np
import pytest

from configs import base
from keras_ft import checkpoint, spec, weights, workdir
from launch import cli
from runs import deadline, printed, resolve_error, tiny_config

# ------------------------------------------------------------------ stages


@pytest.mark.parametrize("stages, message", [
    ((1,), "freeze.stages[0] must be a dict such as dict(epochs=1, blocks=0), got 1."),
    ((dict(epochs="x"),), "freeze.stages[0].epochs must be an integer >= 0, got 'x'."),
    ((dict(epochs=1, blocks="a"),), "freeze.stages[0].blocks must be an integer >= -1 (-1 = all), got 'a'."),
    ((dict(epochs=1.5),), "freeze.stages[0].epochs must be an integer >= 0, got 1.5."),
    ((dict(epochs=1, lr_scale=math.nan),), "freeze.stages[0].lr_scale must be a number > 0, got nan."),
    ((dict(epochs=1, lr_scale=math.inf),), "freeze.stages[0].lr_scale must be a number > 0, got inf."),
    ((None,), "freeze.stages[0] must be a dict such as dict(epochs=1, blocks=0), got None."),
])
def test_malformed_stage_is_one_line_naming_it(stages, message):
    config = tiny_config()
    config.freeze.stages = stages
    assert resolve_error(config) == f"error: {message}"


# ---------------------------------------------------------- values, sizes


@pytest.mark.parametrize("key, value, message", [
    ("train.steps_per_epoch", -1, "train.steps_per_epoch must be an integer >= 0"),
    ("train.epochs", 0, "train.epochs must be an integer >= 1, got 0."),
    ("train.epochs", -1, "train.epochs must be an integer >= 1, got -1."),
    ("model.image_size", 100_000, "model.image_size must be an integer in [0, 4096]"),
    ("model.image_size", 16, "model.image_size=16 is too small for backbone 'mobilenet_v2': "
                             "it needs 32 to 4096 (0 = its default 224)."),
    ("schedule.decay_factor", math.nan, "schedule.decay_factor must be a number in (0, 1], got nan."),
    ("schedule.stlr_ratio", -1.0, "schedule.stlr_ratio must be a number >= 1, got -1.0."),
    ("schedule.decay_boundaries", (2.0,), "schedule.decay_boundaries must be increasing fractions in (0, 1], got (2.0,)."),
])
def test_bad_value_is_refused_at_start_up(key, value, message):
    assert resolve_error(tiny_config({key: value})).startswith(f"error: {message}")


def test_memory_estimate_refuses_what_cannot_fit():
    line = resolve_error(tiny_config({"model.image_size": 4096, "train.global_batch_size": 4096}))
    assert line.startswith("error: model.image_size=4096 with train.global_batch_size=4096 needs "
                           "at least 2,816 GiB for one training batch")
    assert "this machine has" in line and "lower either" in line


# -------------------------------------------------------------------- fuzz


def numeric_keys():
    """Every int or float key of configs/base.py (booleans aside)."""
    flat = workdir.flatten(base.get_config().to_dict())
    return sorted(k for k, v in flat.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool))


EXTREMES = [0, 1, -1, 2, 3, 7, 2**31, -(2**31), 2**63, 10**30, 0.5, -0.5, 1e-300, 1e308,
            -1e308, math.nan, math.inf, -math.inf, True, False, None, "x", "", [1], {"a": 1}]


def test_config_fuzz_is_a_one_line_error_or_a_checked_spec():
    rng = random.Random(0)
    keys = numeric_keys()
    assert len(keys) >= 25  # every numeric key, not a sample
    with deadline(60):
        fuzz(keys, rng)


def fuzz(keys, rng):
    for key in keys:
        for value in EXTREMES + [rng.uniform(-1e6, 1e6), rng.randint(-10**9, 10**9)]:
            saved = base.get_config().to_dict()
            *parents, leaf = key.split(".")
            node = saved
            for name in parents:
                node = node[name]
            node[leaf] = value
            # A config.json (any JSON type) read back, or a flag's value: one line.
            try:
                resolved = spec.resolve(saved)
            except cli.INPUT_ERRORS as e:
                line = printed(e)
                assert key in line, (key, value, line)
                continue
            flat = workdir.flatten(resolved.resolved)
            assert all(math.isfinite(v) for v in flat.values()
                       if isinstance(v, float)), (key, value)


# ------------------------------------------------------ workdirs and files


def input_error(call) -> str:
    """`call()` must raise one of `cli.INPUT_ERRORS`: the line printed for it."""
    with pytest.raises(cli.INPUT_ERRORS) as raised:
        call()
    return printed(raised.value)


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_unusable_workdir_is_one_line_naming_it(tmp_path, where):
    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    line = train_error_line(tiny_config(), target)
    assert str(target) in line and line.startswith("error: workdir ")
    assert sorted(os.listdir(tmp_path)) == ["f"]  # nothing written elsewhere


def train_error_line(config, target):
    from keras_ft import trainer

    return input_error(lambda: trainer.train(config, str(target)))


def test_read_only_workdir_is_one_line(tmp_path, monkeypatch):
    # Root ignores permissions: the file system's answer is simulated.
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(workdir, "write_atomic", read_only)
    line = train_error_line(tiny_config(), tmp_path / "run")
    assert line.startswith(f"error: workdir {tmp_path / 'run'} is not writable: ")
    assert "Read-only file system" in line


def test_lr_find_checks_the_workdir_before_its_sweep(tmp_path, monkeypatch):
    from keras_ft import job
    from launch import lr_find

    monkeypatch.setattr(job, "assemble", lambda *a: pytest.fail("the sweep started"))
    (tmp_path / "f").write_text("x")
    line = input_error(lambda: lr_find.run(tiny_config(), str(tmp_path / "f")))
    assert line.startswith(f"error: workdir {tmp_path / 'f' / 'lr_find'} is not writable: ")


def test_random_file_named_weights_h5_is_one_line(tmp_path):
    path = tmp_path / "x.weights.h5"
    path.write_bytes(os.urandom(2000))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    line = input_error(lambda: weights.load_weights(
        model, "mobilenet_v2", str(path), sha256=weights.sha256_file(str(path))))
    assert line.startswith(f"error: cannot load {path}: not a Keras .weights.h5 file (")


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('{"train": {"epochs": "x"}}', "train.epochs must be an integer, got 'x'."),
    ('["a list"]', "not a JSON object"),
])
def test_garbage_config_json_is_named(tmp_path, content, problem):
    (tmp_path / "config.json").write_text(content)
    line = input_error(lambda: spec.resolve(workdir.load_config(str(tmp_path))))
    assert str(tmp_path / "config.json") in line and problem in line


def test_leftovers_of_a_killed_run_are_swept_on_the_next(tmp_path):
    for name in (".export-abc", ".export-old-x", ".tflite-y"):
        os.makedirs(tmp_path / name / "variables")
    (tmp_path / ".metrics.json.tmp-123").write_text("{")
    (tmp_path / "export").mkdir()
    workdir.start(str(tmp_path), str(tmp_path), {"seed": 0}, resume=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "export"]


@pytest.mark.parametrize("state", ["", "{}", '{"class_names": 3}', "[]", "fifo"])
def test_corrupt_newest_state_falls_back_like_a_corrupt_checkpoint(tmp_path, state):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    manager = checkpoint.CheckpointManager(str(tmp_path), model=model)
    for step in (1, 2):
        model.layers[0].kernel.assign(np.full((4, 2), step, np.float32))
        manager.save(step, {"class_names": ["a", "b"], "epoch": step, "step": 0,
                            "steps_per_epoch": 1, "history": []})
    newest = os.path.join(manager.all()[-1], checkpoint.STATE_FILE)
    if state == "fifo":
        os.remove(newest)
        os.mkfifo(newest)
    else:
        with open(newest, "w") as f:
            f.write(state)
    with deadline():
        restored = manager.restore_latest()
    assert restored["global_step"] == 1
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), 1.0)


def test_committed_report_names_checkpoints_as_folders_are_named():
    """launch.evaluate once formatted the epoch where the folders carry the
    global step; the report committed in docs/ showed a folder that never exists."""
    import re

    from conftest import REPO

    text = open(os.path.join(REPO, "docs", "quickstart_report", "report.md")).read()
    named = re.findall(r"ckpt-\d+[^`]*", text)
    assert named and all(re.fullmatch(r"ckpt-\d{9} \(\d+ epoch\(s\) and \d+ step\(s\) done\)", n)
                         for n in named), named


def test_fifo_config_json_is_named_not_read(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    with deadline():
        line = input_error(lambda: workdir.load_config(str(tmp_path)))
    assert line == f"error: {tmp_path / 'config.json'} is not a regular file; restore it or use another workdir."


def test_evaluate_and_export_fall_back_past_a_corrupt_newest_state(tmp_path):
    """`job.load_trained` (launch.evaluate, launch.export) read the newest
    state.json's class names directly: `error: 'class_names'`."""
    from keras_ft import job, tasks

    resolved = spec.resolve(tiny_config())
    workdir.write_json(str(tmp_path / "config.json"), resolved.resolved)
    model = job.build_model(resolved, tasks.get(resolved.task), ["a", "b"], 1)
    manager = checkpoint.CheckpointManager(
        str(tmp_path / "checkpoints"), **checkpoint.model_objects(model, model.snapshot_reference()))
    for step in (1, 2):
        manager.save(step, {"class_names": ["a", "b"], "epoch": step, "step": 0, "history": []})
    with open(os.path.join(manager.all()[-1], checkpoint.STATE_FILE), "w") as f:
        f.write("{}")
    _, state, _ = job.load_trained(str(tmp_path))
    assert state["global_step"] == 1 and state["class_names"] == ["a", "b"]

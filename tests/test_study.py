"""Studies (keras_ft.study, keras_ft.study_stats, launch.study): the arms,
the interval and recommendation maths, and a real study that resumes."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from keras_ft import stages, study, study_stats


def _record(arm, seed, acc, seconds=10.0, status="ok"):
    return {"arm": arm, "seed": seed, "status": status, "main_metric": "val_accuracy",
            "val_accuracy": acc, "val_loss": None if acc is None else 1.0 - acc, "train_seconds": seconds,
            "trainable_params": 100, "images_per_sec": 50.0, "peak_rss_mb": 500.0,
            "error": "" if status == "ok" else "ValueError: bad"}


def test_interval_is_students_t_by_hand():
    i = study_stats.interval([0.80, 0.84, 0.82])
    # mean 0.82, s = 0.02, t(0.975, 2) = 4.303: half = 4.303 * 0.02 / sqrt(3)
    assert i["mean"] == pytest.approx(0.82)
    assert i["half"] == pytest.approx(4.303 * 0.02 / np.sqrt(3))
    assert study_stats.interval([0.5])["half"] is None
    assert study_stats.t975(40) == 1.96


def test_paired_differences_and_recommendation_by_hand():
    arms = [study.Arm("all", {}, "", reference="all"), study.Arm("head", {}, "", reference="all"),
            study.Arm("last_1", {}, "", reference="all")]
    records = {}
    for seed, (a, h, l) in enumerate([(0.90, 0.85, 0.895), (0.80, 0.77, 0.80)]):
        records["all", seed] = _record("all", seed, a, seconds=100)
        records["head", seed] = _record("head", seed, h, seconds=10)
        records["last_1", seed] = _record("last_1", seed, l, seconds=40)
    rows = study_stats.summarize(arms, records, "val_accuracy")
    head = rows[1]
    # Paired: (0.85 - 0.90, 0.77 - 0.80) = (-0.05, -0.03): mean -0.04, s = 0.01414
    assert head["paired_diff"]["mean"] == pytest.approx(-0.04)
    assert head["paired_diff"]["half"] == pytest.approx(12.706 * np.std([-0.05, -0.03], ddof=1) / np.sqrt(2))
    assert rows[0]["paired_diff"] is None  # the reference itself
    rec = study_stats.recommend(rows, "val_accuracy")
    # all: 0.85 ± 0.635 (wide, 2 seeds): both others inside; last_1 (0.8475)
    # is within one point at 40 s vs 100 s; head (0.81) is not.
    assert rec["best"] == "all" and set(rec["tied"]) == {"head", "last_1"}
    assert rec["cheapest"] == "last_1" and rec["time_ratio"] == pytest.approx(2.5)
    assert "2.5x less training time" in rec["text"]
    table = study_stats.table(rows, "val_accuracy")
    assert "| head | 0.810 ± " in table and "-0.040 ± " in table


def test_failed_runs_are_left_out_and_named():
    arms = [study.Arm("a", {}, "", reference="a")]
    records = {("a", 0): _record("a", 0, 0.7), ("a", 1): _record("a", 1, None, status="failed")}
    row = study_stats.summarize(arms, records, "val_accuracy")[0]
    assert row["val_accuracy"] == {"mean": 0.7, "half": None, "n": 1}
    assert row["failed"] == {"1": "ValueError: bad"}
    assert "a seed 1 failed: ValueError: bad" in study_stats.table([row], "val_accuracy")


def test_crossover_is_the_first_size_where_scratch_is_within_a_point():
    arms, records = [], {}
    for n, (p, s) in {10: (0.8, 0.3), 100: (0.9, 0.7), 1000: (0.95, 0.945)}.items():
        arms += [study.Arm(f"pretrained_{n}", {}, "", "pretrained", n, f"pretrained_{n}"),
                 study.Arm(f"scratch_{n}", {}, "", "scratch", n, f"pretrained_{n}")]
        for seed in (0, 1):
            records[f"pretrained_{n}", seed] = _record(f"pretrained_{n}", seed, p)
            records[f"scratch_{n}", seed] = _record(f"scratch_{n}", seed, s)
    cross = study_stats.crossover(study_stats.summarize(arms, records, "val_accuracy"), "val_accuracy")
    assert cross["at"] == 1000 and "10/class: -0.500" in cross["text"]


def test_arms_are_the_recipes_they_claim():
    config = tiny.get_config()
    config.train.epochs = 3
    asked = {}

    def rates(name, overrides):
        asked[name] = overrides
        return {"lr_head": 0.02, "lr_all": 0.002, "scratch": 0.5, "peft_full": 0.001,
                "peft_bitfit": 0.02, "peft_bn_only": 0.05, "peft_lora_r2": 0.004,
                "peft_lora_r8": 0.003}[name]

    depth = {a.name: a for a in study.plan("depth", config, study.Options(), rates)}
    assert list(depth) == ["head", "last_1", "last_2", "last_4", "all", "gradual", "lp_ft"]
    assert depth["last_2"].overrides["freeze.stages"] == stages.last_k_blocks(2, 3, 0.1)
    assert depth["head"].overrides["data.cache_features"] is True  # flips only: cacheable
    assert depth["all"].overrides["data.cache_features"] is False
    lr = {a.name: a for a in study.plan("lr", config, study.Options(), rates)}
    assert lr["head_x1"].x == 0.02 and lr["all_x10"].overrides["optimizer.learning_rate"] == pytest.approx(0.02)
    assert lr["all_x0.1"].reference == "all_x1"
    scratch = {a.name: a for a in study.plan("scratch", config, study.Options(), rates, steps_per_epoch=5)}
    fair = scratch["scratch_x3"].overrides
    # A fair scratch baseline: random init, every layer and BatchNorm trainable
    # from step 0 (one all-blocks stage), its own range-tested rate, 3x the steps.
    assert fair["model.weights"] == "none" and fair["freeze.batchnorm"] == "trainable"
    assert fair["freeze.stages"] == stages.all_blocks(9, 1.0) and fair["train.epochs"] == 9
    assert fair["optimizer.learning_rate"] == 0.5 and scratch["scratch_x3"].x == 45
    assert asked["scratch"]["freeze.stages"] == stages.all_blocks(3, 1.0)
    assert scratch["pretrained"].overrides == {}
    size = {a.name: a for a in study.plan("size", config, study.Options(sizes=(5, 20)), rates, 7)}
    assert size["scratch_5"].overrides["data.train_per_class"] == 5
    assert size["pretrained_20"].overrides["train.steps_per_epoch"] == 7  # same steps at every size
    peft = {a.name: a for a in study.plan("peft", config, study.Options(lora_ranks=(2, 8)), rates)}
    assert list(peft) == ["full", "bitfit", "bn_only", "lora_r2", "lora_r8"]
    assert peft["lora_r8"].overrides["freeze.lora_rank"] == 8
    # Each method at its own range-tested rate, found on its own all-blocks
    # stage (LoRA at its rank): the stage's lr_scale times the config's 0.01.
    assert asked["peft_lora_r8"]["freeze.method"] == "lora"
    assert asked["peft_lora_r8"]["freeze.lora_rank"] == 8
    assert asked["peft_bitfit"]["freeze.stages"] == stages.all_blocks(3, 1.0)
    assert peft["lora_r8"].overrides["freeze.stages"] == stages.lp_ft(1, 0.3, 2)
    assert peft["full"].overrides["freeze.stages"] == stages.lp_ft(1, 0.1, 2)
    assert peft["bn_only"].overrides["freeze.method"] == "bn_only"


@pytest.mark.parametrize("make, match", [
    (lambda: study.parse_studies("deep"), "Unknown study 'deep'"),
    (lambda: study.Options(seeds=1).check(), "--seeds=1: a 95% interval needs at least 2"),
    (lambda: study.Options(lr_grid=(1.0, 3.0)).check(), "does not bracket the suggestion"),
    (lambda: study.Options(sizes=(0,)).check(), "--sizes"),
])
def test_bad_study_input_is_one_line(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _tiny_config():
    config = tiny.get_config()
    config.data.source = "sample:lfw_faces"
    config.train.steps_per_epoch = 2
    return config


def test_too_large_a_size_is_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match=r"--sizes=5,500: 500 images per class asked, but the "
                                         r"smallest class has 75"):
        study.run(_tiny_config(), str(tmp_path), ["size"], study.Options(seeds=2, sizes=(5, 500)))


@pytest.mark.slow
def test_a_study_reports_its_arms_and_resumes_without_rerunning(tmp_path, monkeypatch):
    arms = [study.Arm("head", {"freeze.stages": stages.head(2)}, "head only", reference="head"),
            study.Arm("broken", {"model.image_size": 8}, "too small an image", reference="head")]
    monkeypatch.setattr(study, "plan", lambda *a, **k: arms)
    workdir = str(tmp_path / "s")
    result = study.run(_tiny_config(), workdir, ["depth"], study.Options(seeds=2))
    depth = result["studies"]["depth"]
    runs = {(r["arm"], r["seed"]): r for r in depth["runs"]}
    assert runs["broken", 0]["status"] == "failed" and "image_size" in runs["broken", 0]["error"]
    # The figures are the arms' own metrics.json values.
    accs = []
    for seed in (0, 1):
        with open(os.path.join(workdir, "depth", "head", f"seed_{seed}", "metrics.json")) as f:
            accs.append(json.load(f)["val_accuracy"])
    head = depth["arms"][0]
    assert head["val_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert head["seeds_ok"] == [0, 1]
    with open(os.path.join(workdir, "study.md")) as f:
        md = f.read()
    assert f"| head | {np.mean(accs):.3f} ± " in md and "broken seed 0 failed: ValueError" in md
    assert os.path.getsize(os.path.join(workdir, "depth_params.png")) > 1000
    # A killed study: one run's record is gone (it was running). Only it reruns.
    os.remove(os.path.join(workdir, "depth", "head", "seed_1.json"))
    ran = []
    real = study.run_arm
    monkeypatch.setattr(study, "run_arm", lambda c, arm, seed, d: ran.append((arm.name, seed)) or real(c, arm, seed, d))
    again = study.run(_tiny_config(), workdir, ["depth"], study.Options(seeds=2))
    assert ran == [("head", 1)]
    assert again["studies"]["depth"]["arms"][0]["val_accuracy"] == head["val_accuracy"]
    # Another base config in the same folder is refused.
    other = _tiny_config()
    other.train.epochs = 3
    with pytest.raises(ValueError, match="holds a study of another config .*train.epochs"):
        study.run(other, workdir, ["depth"], study.Options(seeds=2))


def test_launch_study_bad_input_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-m", "launch.study", "--config=configs/tiny.py", "--study=depth,deep",
         f"--workdir={tmp_path / 's'}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: Unknown study 'deep'" in done.stderr
    assert not os.path.exists(tmp_path / "s")  # nothing written
